"""Train the reference ScoreNet (Song's score-SDE MNIST tutorial) on MNIST and draw digits.

  python examples/mnist_uncond.py --out runs/mnist            # train with the 'fast' recipe
  python examples/mnist_uncond.py --out runs/mnist --resume   # continue (e.g. with --epochs 10)
  python examples/mnist_uncond.py --out runs/mnist --sample-only --sampler pc

Outputs in --out: checkpoint.npz, config.json, loss_steps.csv, loss_epochs.csv, loss.png,
samples/epoch_NNN.png (after each epoch) and samples_<sampler>.png / .npz (final samples).
Data: $TINYDIFF_DATA/mnist, then ~/.cache/tinydiff/mnist, then a verified download.
Settings come from the recipe, then (with --resume / --sample-only) the checkpoint, then flags.
"""
import argparse
import contextlib
import os
import sys

import numpy as np

import tinydiff as td
from tinydiff import data, nn, optim, train
from tinydiff.models import ScoreNet
from tinydiff.sde import VESDE

RECIPES = {   # 'reference' is the tutorial's recipe; 'fast' gives recognisable digits in ~4 epochs
    "reference": dict(lr=1e-4, batch_size=32, epochs=50, warmup=0, ema=0.0, ema_warmup=False, clip=None),
    "fast": dict(lr=3e-3, batch_size=64, epochs=4, warmup=300, ema=0.999, ema_warmup=True, clip=None),
}
DEFAULTS = dict(recipe="fast", backend="numpy", seed=0, sampler="em", sample_steps=500,
                num_samples=64, sample_every=1, sigma=25.0, channels="32,64,128,256",
                embed_dim=256, dataset="mnist", limit=None, nonfinite="stop")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    opt = lambda *a, **k: p.add_argument(*a, default=argparse.SUPPRESS, **k)   # noqa: E731
    opt("--recipe", choices=sorted(RECIPES), help="fast (default): warm-up over 300 steps to lr 3e-3, "
        "batch 64, EMA 0.999 with a ramp, 4 epochs; reference: Adam lr 1e-4, batch 32, 50 epochs, no EMA")
    opt("--backend", choices=["numpy", "cupy"], help="numpy = CPU (default), cupy = NVIDIA GPU")
    opt("--epochs", type=int, help="total epochs (a resumed run continues up to this)")
    opt("--batch-size", type=int, help="images per training step")
    opt("--lr", type=float, help="peak learning rate of Adam")
    opt("--warmup", type=int, help="steps of linear learning-rate warm-up (0: none)")
    opt("--ema", type=float, help="decay of the EMA of the weights used for sampling (0: none)")
    opt("--ema-warmup", type=lambda v: v.lower() in ("1", "true", "yes"), help="ramp the EMA "
        "decay up as min(decay, (1+n)/(10+n)) so early grids are not averages of untrained weights")
    opt("--clip", type=float, help="max global gradient norm (default per recipe)")
    opt("--seed", type=int, help="seed of the initial weights, data order and noise (default 0)")
    opt("--sampler", choices=["em", "pc", "ode"], help="Euler-Maruyama (default), "
        "predictor-corrector, or probability-flow ODE")
    opt("--sample-steps", type=int, help="sampler steps (default 500; ignored by ode)")
    opt("--num-samples", type=int, help="images per sample grid (default 64)")
    opt("--sample-every", type=int, help="draw a sample grid every N epochs (default 1)")
    opt("--channels", help="the four ScoreNet widths (default 32,64,128,256)")
    opt("--embed-dim", type=int, help="time-embedding width (default 256)")
    opt("--sigma", type=float, help="sigma of the VE SDE (default 25)")
    opt("--dataset", choices=["mnist", "fashion-mnist"], help="training set (default mnist)")
    opt("--limit", "--subset", dest="limit", type=int, help="train on the first N images only")
    opt("--nonfinite", choices=["stop", "skip"], help="on a NaN/Inf loss or gradient: stop "
        "(default) or skip the step")
    p.add_argument("--out", default="runs/mnist_uncond", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--sample-only", action="store_true", help="only sample from --out's checkpoint")
    p.add_argument("--data", help="folder holding mnist/ (default $TINYDIFF_DATA, then the cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--bpd", type=int, default=0, help="then report bits/dim of N test images")
    return p.parse_args(argv)


def build_config(args):
    """Recipe, then the checkpoint's settings (with --resume / --sample-only), then explicit flags."""
    explicit = {k: v for k, v in vars(args).items() if k in DEFAULTS or k in RECIPES["fast"]}
    saved = args.resume or args.sample_only
    return train.resolve_config(RECIPES, DEFAULTS, explicit, args.out if saved else None)


def run(args):
    config = build_config(args)
    backend = td.get_backend(config["backend"])        # fails early and clearly without a GPU
    sde = VESDE(config["sigma"])
    nn.manual_seed(config["seed"])
    channels = tuple(int(c) for c in str(config["channels"]).split(","))
    model = ScoreNet(sde.marginal_std, channels=channels, embed_dim=config["embed_dim"]).to(backend)
    sample_fn = train.make_sample_fn(sde, config["sampler"], config["sample_steps"],
                                     (config["num_samples"], 1, 28, 28))
    ema = None
    if args.sample_only:   # the EMA weights when the run kept them
        state = train.load_model_weights(os.path.join(args.out, train.CHECKPOINT), model)
        print(f"sampling from {args.out} (epoch {state['epoch']}, step {state['step']})")
    else:
        images, _ = data.load_dataset(config["dataset"], "train", args.data, config["limit"])
        opt = optim.Adam(model.parameters(), lr=config["lr"])
        n = config["warmup"]   # linear warm-up from lr / n to lr over n steps
        warmup = optim.linear_warmup(n, start_factor=1.0 / n) if n else optim.constant()
        ema = optim.EMA(model, config["ema"], warmup=config.get("ema_warmup", False)) \
            if config["ema"] else None
        trainer = train.Trainer(
            model, opt, train.score_matching_loss(sde), images, out_dir=args.out,
            epochs=config["epochs"], batch_size=config["batch_size"], seed=config["seed"], ema=ema,
            scheduler=optim.LRScheduler(opt, warmup), clip_grad=config["clip"], sample_fn=sample_fn,
            sample_every=config["sample_every"], on_nonfinite=config["nonfinite"], config=config,
            progress=not args.no_progress)
        trainer.fit(resume=args.resume)
    prefix = os.path.join(args.out, f"samples_{config['sampler']}")
    train.sample_and_save(model, sample_fn, prefix, train.derived_seed(config["seed"], 4), ema=ema,
                          sampler=config["sampler"], sample_steps=config["sample_steps"])
    if args.bpd:   # test-set bits/dim along the probability-flow ODE (with the EMA weights)
        from tinydiff.sampling import bits_per_dim
        test, _ = data.load_dataset(config["dataset"], "test", root=args.data, limit=args.bpd)
        rng = backend.default_rng(config["seed"])
        with (ema.average_parameters(model) if ema else contextlib.nullcontext()):
            bpd = np.concatenate([bits_per_dim(model, x, sde, rng) for x, _ in data.batches(
                test, 250, shuffle=False, backend=backend)])
        sem = bpd.std() / len(bpd) ** 0.5
        print(f"test bits/dim ({len(bpd)} images): {bpd.mean():.3f} +- {sem:.3f}")

def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (td.BackendError, data.DataError, train.CheckpointError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
