"""Train the reference ScoreNet on MNIST with the 'fast' recipe under any SDE (issue 11's evidence).

  python examples/mnist_sdes.py --sde vp --out runs/sde_vp --bpd 500
  python examples/mnist_sdes.py --sde subvp --out runs/sde_subvp --bpd 500
  python examples/mnist_sdes.py --sde vp --out runs/sde_vp --sample-only --bpd 500

The same settings as examples/mnist_uncond.py's default run (recipe 'fast': Adam lr 3e-3 with a
300-step warm-up, batch 64, EMA 0.999 with a ramp, 4 epochs, seed 0; EM 500 steps for the grids),
with the SDE recorded in the run's config (sde, sigma / beta_min, beta_max) so that
benchmarks/quality.py rebuilds it. A stand-in until the shared command line takes --sde.
"""
import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import tinydiff as td  # noqa: E402
from tinydiff import argtypes, data, nn, optim, train  # noqa: E402
from tinydiff.models import ScoreNet  # noqa: E402
from tinydiff.sde import SDES, make_sde, sde_from_config  # noqa: E402

FAST = dict(lr=3e-3, batch_size=64, epochs=4, warmup=300, ema=0.999, ema_warmup=True, clip=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sde", choices=sorted(SDES), default="ve")
    p.add_argument("--sigma", type=argtypes.positive_float, default=None, help="VE (default 25)")
    p.add_argument("--beta-min", type=argtypes.nonnegative_float, default=None, help="VP / sub-VP (0.1)")
    p.add_argument("--beta-max", type=argtypes.positive_float, default=None, help="VP / sub-VP (20)")
    p.add_argument("--sampler", choices=train.SAMPLERS, default="em")
    p.add_argument("--sample-steps", type=argtypes.positive_int, default=500)
    p.add_argument("--out", required=True)
    p.add_argument("--sample-only", action="store_true")
    p.add_argument("--bpd", type=argtypes.nonnegative_int, default=0, help="bits/dim of the first N test images")
    p.add_argument("--data", default=None)
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in ("sigma", "beta_min", "beta_max") if getattr(args, k) is not None}
    sde = make_sde(args.sde, **given)
    ckpt = os.path.join(args.out, train.CHECKPOINT)
    if args.sample_only:
        saved = sde_from_config(train.read_config(ckpt))
        if saved != sde and (given or args.sde != saved.name):
            sys.exit(f"error: {ckpt} was trained with {saved!r}, not {sde!r}")
        sde = saved
    config = {**FAST, **sde.config(), "seed": 0, "channels": "32,64,128,256", "embed_dim": 256,
              "dataset": "mnist", "sampler": args.sampler, "sample_steps": args.sample_steps}
    backend = td.get_backend("numpy")
    nn.manual_seed(0)
    model = ScoreNet(sde.marginal_std).to(backend)
    sample_fn = train.make_sample_fn(sde, args.sampler, args.sample_steps, (64, 1, 28, 28))
    opt = optim.Adam(model.parameters(), lr=FAST["lr"])
    ema = optim.EMA(model, FAST["ema"], warmup=True)
    if args.sample_only:
        state = train.load_model_weights(ckpt, model)
        ema = None   # load_model_weights already put the EMA weights in
        print(f"sampling from {args.out} (epoch {state['epoch']}, step {state['step']})")
    else:
        images, _ = data.load_dataset("mnist", "train", args.data)
        n = FAST["warmup"]
        trainer = train.Trainer(
            model, opt, train.score_matching_loss(sde), images, out_dir=args.out,
            epochs=FAST["epochs"], batch_size=FAST["batch_size"], seed=0, ema=ema,
            scheduler=optim.LRScheduler(opt, optim.linear_warmup(n, start_factor=1.0 / n)),
            sample_fn=sample_fn, config=config, progress=False)
        trainer.fit()
    prefix = os.path.join(args.out, f"samples_{args.sampler}")
    train.sample_and_save(model, sample_fn, prefix, train.derived_seed(0, 4), ema=ema,
                          sampler=args.sampler, sample_steps=args.sample_steps)
    if args.bpd:   # as examples/mnist_uncond.py --bpd: first N test images, batches of 250, seed 0
        from tinydiff.sampling import bits_per_dim
        test, _ = data.load_dataset("mnist", "test", root=args.data, limit=args.bpd)
        rng = backend.default_rng(0)
        with (ema.average_parameters(model) if ema else contextlib.nullcontext()):
            bpd = np.concatenate([bits_per_dim(model, x, sde, rng) for x, _ in data.batches(
                test, 250, shuffle=False, backend=backend)])
        print(f"test bits/dim ({len(bpd)} images): {bpd.mean():.3f} +- {bpd.std() / len(bpd) ** 0.5:.3f}")


if __name__ == "__main__":
    main()
