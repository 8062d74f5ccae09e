"""Kernel launches and host syncs per training step and per sampling step, counted on the CPU.

A GPU step of these small models is bound by the host time of its kernel launches (a few
microseconds each) and by every wait for the device, not by arithmetic. Both can be counted
without a GPU: the strict CuPy stand-in (tinydiff.testing.strict_cupy) counts one launch for every
array operation that would launch a kernel on CuPy (its docstring gives the rule), every host sync,
and every host-to-device upload. Counts do not depend on the batch size (batch 8 here).

    python3 benchmarks/launches.py                 # both models, one table each
    python3 benchmarks/launches.py --kinds 12      # and the most frequent kinds of launch
    python3 benchmarks/launches.py --model scorenet --log-every 10

What is counted, per model:
- one Trainer.train_step (the library's training step: zero_grad, loss, backward, gradient norm
  or clipping, the finiteness check and its host read, optimizer, EMA, LR schedule), and its
  phases counted one by one in the same order (their sum is the step);
- the data batch (upload of the uint8 images and the labels, the scaling to [0, 1]);
- one Euler-Maruyama step of the sampler (the difference of a 4-step and a 3-step run), for the
  conditional model with classifier-free guidance (w = 2, one forward pass of 2N samples).

Models: the reference ScoreNet with the "fast" recipe (Adam, EMA with warm-up, no clipping: the
norm is still computed and logged) and the class-conditional ScoreNet of the mnist-cond preset
(attention at 5x5 and 2x2, 10 classes, label dropout 0.1) with its "cond" recipe (AdamW, EMA,
clipping at 1.0); with --model unets (or all) also the U-Nets of the fashion-mnist-cond and
cifar10-cond presets (at 16 base channels, as they are run on a CPU) and of fashion-latent-cond,
each with its preset's recipe.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tinydiff as td  # noqa: E402
from tinydiff import data, nn, optim, sampling, train  # noqa: E402
from tinydiff.models import ScoreNet  # noqa: E402
from tinydiff.sde import VESDE  # noqa: E402
from tinydiff.testing import strict_cupy  # noqa: E402

COND = dict(num_classes=10, attention=(5, 2), num_heads=4)


# the U-Nets, as their presets build them (model, recipe, training noise): --model PRESET
PRESET_MODELS = ("fashion-mnist-cond", "cifar10-cond", "fashion-latent-cond")


def build_preset(preset, batch, log_every):
    """A Trainer on the strict backend for a preset's score model with its recipe, and batches."""
    from tinydiff import experiments as E
    config = E.resolve_config({"preset": preset, "base_channels": 16} if preset != "fashion-latent-cond"
                              else {"preset": preset})
    if config.get("latent"):
        config["image_shape"] = [2, 7, 7]
    sde = E.build_sde(config)
    model = E.build_model(config, "strict", sde)
    opt, sched, ema = E.build_optimizer(model, config, 1000)   # steps per epoch: the schedule's length
    shape = E.sample_shape(config)
    rng = np.random.default_rng(0)
    if config.get("latent"):         # the cached codes are float32
        images = rng.standard_normal((32 * batch, *shape)).astype(np.float32)
    else:
        images = rng.integers(0, 256, (32 * batch, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, 32 * batch).astype(np.int64)
    loss_fn = train.score_matching_loss(sde, use_labels=True, label_dropout=float(config["p_uncond"]),
                                        noise=E.build_training_noise(config))
    extra = {"log_every": log_every} if log_every is not None else {}
    trainer = train.Trainer(model, opt, loss_fn, images, labels, out_dir=tempfile.mkdtemp(),
                            epochs=1, batch_size=batch, seed=0, ema=ema, scheduler=sched,
                            clip_grad=config["clip"], progress=False, **extra)
    batches = data.batches(images, batch, rng=np.random.default_rng(1), backend="strict",
                           labels=labels)
    title = (f"{E.model_title(config)} of --preset {preset}"
             f"{' (base 16)' if not config.get('latent') else ''}, recipe {config['recipe']}")
    return sde, trainer, batches, tuple(shape), title


def build(model_name, batch, log_every):
    """A Trainer on the strict backend with the model's recipe, and one batch (x, y)."""
    cond = model_name == "cond"
    sde = VESDE(25.0)
    nn.manual_seed(0)
    model = ScoreNet(sde.marginal_std, **(COND if cond else {})).to("strict")
    if cond:
        opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    else:
        opt = optim.Adam(model.parameters(), lr=3e-3)
    sched = optim.LRScheduler(opt, optim.linear_warmup(300, start_factor=1 / 300))
    ema = optim.EMA(model, 0.999, warmup=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32 * batch, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 32 * batch).astype(np.int64) if cond else None
    loss_fn = train.score_matching_loss(sde, use_labels=cond, label_dropout=0.1 if cond else 0.0)
    extra = {}
    if log_every is not None and "log_every" in inspect.signature(train.Trainer).parameters:
        extra["log_every"] = log_every
    trainer = train.Trainer(model, opt, loss_fn, images, labels, out_dir=tempfile.mkdtemp(),
                            epochs=1, batch_size=batch, seed=0, ema=ema, scheduler=sched,
                            clip_grad=1.0 if cond else None, progress=False, **extra)
    batches = data.batches(images, batch, rng=np.random.default_rng(1), backend="strict",
                           labels=labels)
    return sde, trainer, batches


def count(fn):
    with strict_cupy.counting() as c:
        out = fn()
    return c, out


def training_counts(trainer, batches, steps):
    """Counts of one whole train_step (mean over ``steps``) and of its phases."""
    for _ in range(2):                                  # optimizer state, EMA buffers, ...
        trainer.train_step(*next_batch(batches, trainer))
    x, y = next_batch(batches, trainer)

    def loop_step():                # as Trainer._run_epoch: the deferred log read every N steps
        if trainer.train_step(x, y) is None and len(trainer._pending) >= trainer.log_every:
            trainer.flush_log()
    whole, _ = count(lambda: [loop_step() for _ in range(steps)])
    model, opt = trainer.model, trainer.optimizer
    params = list(model.parameters())
    phases = []
    c, _ = count(opt.zero_grad)
    phases.append(("zero_grad", c))
    c, loss = count(lambda: trainer.loss_fn(model, x, y, trainer.rng))
    phases.append(("forward + loss (incl. noise upload)", c))
    c, _ = count(loss.backward)
    phases.append(("backward", c))
    if trainer.clip_grad is not None:
        c, norm = count(lambda: optim.clip_grad_norm_(params, trainer.clip_grad, return_array=True))
        phases.append(("gradient norm + clipping", c))
    else:
        norm_fn = getattr(optim, "grad_norm", None) or trainer._grad_norm   # as train_step does
        c, norm = count(lambda: norm_fn(params))
        phases.append(("gradient norm", c))
    c, _ = count(opt.step)
    phases.append(("optimizer step", c))
    if trainer.ema is not None:
        c, _ = count(trainer.ema.update)
        phases.append(("EMA update", c))
    opt.zero_grad()
    return whole, phases


def next_batch(batches, trainer):
    try:
        return next(batches)
    except StopIteration:
        raise SystemExit("ran out of batches") from None


def sampling_counts(sde, model, cond, batch, image_shape=(1, 28, 28)):
    shape = (batch, *image_shape)
    y = trainer_labels = None
    if cond:
        trainer_labels = strict_cupy.asarray(np.arange(batch) % 10)
        y = trainer_labels
    score_fn = sampling.model_score_fn(model, labels=y, guidance=2.0 if cond else 0.0)
    model.eval()
    runs = {}
    for n in (3, 4):
        c, _ = count(lambda: sampling.euler_maruyama(score_fn, sde, shape, num_steps=n,
                                                     rng=td.get_backend("strict").default_rng(0)))
        runs[n] = c
    model.train()
    return runs[4].launches - runs[3].launches, runs[4].syncs - runs[3].syncs, \
        runs[4].uploads - runs[3].uploads, runs[4]


def report(model_name, batch, steps, kinds, log_every):
    if model_name in PRESET_MODELS:
        sde, trainer, batches, image_shape, title = build_preset(model_name, batch, log_every)
    else:
        sde, trainer, batches = build(model_name, batch, log_every)
        image_shape = (1, 28, 28)
        title = ("ScoreNet (reference), fast recipe: Adam, EMA" if model_name == "scorenet" else
                 "conditional ScoreNet (attention (5, 2), 10 classes), cond recipe: AdamW, EMA, clip 1.0")
    n_params = len(list(trainer.model.parameters()))
    print(f"\n{title}; {trainer.model.num_parameters():,} parameters in {n_params} arrays, batch {batch}")
    c_batch, _ = count(lambda: next(batches))
    whole, phases = training_counts(trainer, batches, steps)
    print(f"{'':44s} {'launches':>9s} {'syncs':>7s} {'uploads':>8s}")
    for name, c in phases:
        print(f"  {name:42s} {c.launches:9d} {c.syncs:7d} {c.uploads:8d}")
    counted = sum(c.launches for _, c in phases)
    per_step = whole.launches / steps
    print(f"  {'the rest (finite check, log read)':42s} {per_step - counted:9.1f}"
          f" {whole.syncs / steps - sum(c.syncs for _, c in phases):7.2f}"
          f" {whole.uploads / steps - sum(c.uploads for _, c in phases):8.1f}")
    le = getattr(trainer, "log_every", 1)
    print(f"{'training step (mean of ' + str(steps) + ')':44s} {per_step:9.1f}"
          f" {whole.syncs / steps:7.2f} {whole.uploads / steps:8.1f}   (log_every={le})")
    print(f"{'data batch (data.batches)':44s} {c_batch.launches:9d} {c_batch.syncs:7d} "
          f"{c_batch.uploads:8d}")
    cond = model_name != "scorenet"
    launches, syncs, uploads, run = sampling_counts(sde, trainer.model, cond, batch, image_shape)
    what = "Euler-Maruyama step" + (" (guidance w = 2: one forward of 2N)" if cond else "")
    print(f"{what:44s} {launches:9d} {syncs:7d} {uploads:8d}")
    if kinds:
        _, ph = training_counts(trainer, batches, 1)
        for name, c in ph:
            if name.startswith(("forward", "backward", "optimizer")):
                top = ", ".join(f"{k} {v}" for k, v in c.kinds.most_common(kinds))
                print(f"  most frequent in {name}: {top}")
    return per_step, launches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["scorenet", "cond", "both", "unets", "all", *PRESET_MODELS],
                    default="both", help="both: the two ScoreNets; unets: the U-Nets of the "
                    "presets (pixel ones at base 16); all: every model")
    ap.add_argument("--batch", type=int, default=8, help="batch size (counts do not depend on it)")
    ap.add_argument("--steps", type=int, default=10, help="training steps averaged")
    ap.add_argument("--log-every", type=int, default=None,
                    help="Trainer(log_every=N) where the Trainer has it (default: its default)")
    ap.add_argument("--kinds", type=int, default=0, help="also print the N most frequent kinds")
    ap.add_argument("--fused", choices=["off", "on", "both"], default="both",
                    help="the fused kernels (TINYDIFF_FUSED; group norm, col2im, Adam, EMA): count "
                    "with them off (the default of the library), on, or both (default)")
    args = ap.parse_args(argv)
    from tinydiff.optim import fused
    print(f"tinydiff {td.__version__}: launches, syncs and uploads counted by the strict CuPy "
          "stand-in (no GPU involved)")
    for switch in (["off", "on"] if args.fused == "both" else [args.fused]):
        fused.ENABLED = switch == "on"
        print(f"\n== fused kernels {switch}" + (" (each counted as one launch; none has run on a "
                                                 "GPU yet, so the library keeps them off)"
                                                 if switch == "on" else " (the default)"))
        _report_all(args)


def _report_all(args):
    groups = {"both": ["scorenet", "cond"], "unets": list(PRESET_MODELS),
              "all": ["scorenet", "cond", *PRESET_MODELS]}
    for name in groups.get(args.model, [args.model]):
        report(name, args.batch, args.steps, args.kinds, args.log_every)


if __name__ == "__main__":
    main()
