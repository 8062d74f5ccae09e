"""Latent against pixel diffusion on Fashion-MNIST (docs/latent.md): the cost of one training
step and of sampling one image, both models timed in this one process, interleaved, so that the
same machine state hits both.

- pixel: the score model of ``--preset fashion-mnist-cond`` (the unet-28s U-Net on 1x28x28,
  class-conditional), optionally at another width (--pixel-base);
- latent: the score model of ``--preset fashion-latent-cond`` (unet-latent on 2x7x7 codes),
  optionally at another width (--latent-base), plus the autoencoder's decoder for sampling.

A training step is the Trainer's work on one batch of 64: the eq. 5 loss (docs/design.md) with label dropout,
backward, the recipe's AdamW step and EMA update. The latent run's codes are encoded once per run
and cached (docs/latent.md), so its training step does not include the encoder. Sampling one
image is NFE score evaluations with classifier-free guidance (one batched call on 2N each, as
`tinydiff.sampling.model_score_fn` does) at batch 500 (the samplers' default), plus, for the
latent model, decoding the codes. Per epoch: the step time times the 938 steps of 60,000 images.

    python3 benchmarks/latent_speed.py [--pixel-base 16] [--latent-base 32] [--ae-base 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tinydiff as td  # noqa: E402
from tinydiff import argtypes as A  # noqa: E402
from tinydiff import experiments as E  # noqa: E402
from tinydiff import train as T  # noqa: E402
from tinydiff.backend import get_backend  # noqa: E402

STEPS_PER_EPOCH = 938          # 60,000 Fashion-MNIST training images in batches of 64


def build(preset, base, backend, model=None):
    """The preset's score model (at ``base`` channels / as configuration ``model`` if given) with
    its recipe's optimizer, EMA and loss."""
    explicit = {"preset": preset}
    if base:
        explicit["base_channels"] = base
    if model:
        explicit["model"] = model
    config = E.resolve_config(explicit)
    if config.get("latent"):
        config["image_shape"] = [2, 7, 7]        # the default autoencoder's code shape
    sde = E.build_sde(config)
    model = E.build_model(config, backend.name, sde)
    opt, scheduler, ema = E.build_optimizer(model, config, STEPS_PER_EPOCH)
    loss_fn = T.score_matching_loss(sde, use_labels=bool(config["conditional"]), label_dropout=float(config["p_uncond"]),
                                    noise=E.build_training_noise(config))
    return config, sde, model, opt, ema, loss_fn


def train_step(backend, model, opt, ema, loss_fn, shape, batch=64):
    rng = backend.default_rng(0)
    x = backend.asarray(np.random.default_rng(1).random((batch, *shape), dtype=np.float32))
    y = backend.asarray(np.arange(batch, dtype=np.int64) % 10)

    def step():
        opt.zero_grad()
        loss = loss_fn(model, x, y, rng)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
    return step


def guided_eval(backend, model, shape, batch):
    """One guided score evaluation of ``batch`` samples (what a sampler step costs)."""
    from tinydiff import sampling
    x = backend.asarray((np.random.default_rng(2).standard_normal((batch, *shape)) * 3)
                        .astype(np.float32))
    t = backend.asarray(np.full(batch, 0.5, np.float32))
    y = backend.asarray(np.arange(batch, dtype=np.int64) % 10)
    score_fn = sampling.model_score_fn(model, labels=y, guidance=2.0)

    def call():
        with td.no_grad():
            score_fn(x, t)
    return call


def timed(fns, repeats, warmup=1):
    """Seconds per call of each callable: the median of ``repeats`` rounds, interleaved."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixel-base", type=A.positive_int, help="base channels of the pixel U-Net "
                    "(default: unet-28s's 32)")
    ap.add_argument("--latent-base", type=A.positive_int, help="base channels of the latent U-Net "
                    "(default: unet-latent's 32)")
    ap.add_argument("--ae-base", type=A.positive_int, default=32, help="base channels of the "
                    "autoencoder whose decoder turns codes into images (default 32)")
    ap.add_argument("--repeats", type=A.positive_int, default=5)
    ap.add_argument("--sample-batch", type=A.positive_int, default=500)
    ap.add_argument("--nfe", type=A.positive_int, default=49, help="score evaluations per sample "
                    "(default 49: heun-sde with 25 steps)")
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    args = ap.parse_args(argv)
    backend = get_backend(args.backend)
    from tinydiff.models.autoencoder import Autoencoder

    pix = build("fashion-mnist-cond", args.pixel_base, backend)
    lat = build("fashion-latent-cond", args.latent_base, backend)
    ae = Autoencoder(base_channels=args.ae_base).to(backend)     # its decoder's cost
    ae.eval()
    pixel_shape, latent_shape = (1, 28, 28), (2, 7, 7)
    steps = [train_step(backend, pix[2], pix[3], pix[4], pix[5], pixel_shape),
             train_step(backend, lat[2], lat[3], lat[4], lat[5], latent_shape)]
    t_train = timed(steps, args.repeats)
    b = args.sample_batch
    codes = backend.asarray(np.random.default_rng(3).standard_normal((b, *latent_shape))
                            .astype(np.float32))

    def decode():
        with td.no_grad():
            ae.decode_normalised(codes)
    evals = [guided_eval(backend, pix[2], pixel_shape, b), guided_eval(backend, lat[2], latent_shape, b),
             decode]
    t_eval, t_lat_eval, t_decode = timed(evals, max(2, args.repeats // 2))
    per_image = [args.nfe * t_eval / b, (args.nfe * t_lat_eval + t_decode) / b]
    threads = os.environ.get("TINYDIFF_NUM_THREADS", "default")
    print(f"threads {threads}, backend {backend.name}, train batch 64, sampling batch {b}, "
          f"NFE {args.nfe} (guided: one batched call on 2N)")
    print("| model | parameters | train step | epoch (938 steps) | sampling, per image |")
    print("|---|---|---|---|---|")
    for (config, _, model, *_), t, s in zip((pix, lat), t_train, per_image):
        n = sum(int(p.data.size) for p in model.parameters())
        what = f"{config['model']} base {config.get('base_channels') or 'default'}"
        print(f"| {what} on {'2x7x7 codes' if config.get('latent') else '1x28x28 pixels'} | "
              f"{n:,} | {1000 * t:.0f} ms | {t * STEPS_PER_EPOCH / 60:.1f} min | {1000 * s:.1f} ms |")
    print(f"latent / pixel: training {t_train[0] / t_train[1]:.1f}x faster per step (and per epoch), "
          f"sampling {per_image[0] / per_image[1]:.1f}x faster per image (decoding included: "
          f"{1000 * t_decode / b:.2f} ms per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
