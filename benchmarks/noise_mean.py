"""How much of the noise's per-image mean a trained score model sees: the diagnostic that found
the blank and saturated samples of the Fashion-MNIST U-Net (docs/unet-runs.md).

A noisy image x = m(t) (x0 + sigma z) (eq. 1 of docs/design.md; m = 1 for the VE SDE) has a mean
brightness that is the data's mean plus sigma times the mean of z, whose std is 1/sqrt(C H W)
(1/28 for MNIST-sized images). A model that cannot estimate that mean leaves it in its denoised
image D = (x + std(t)^2 s(x, t)) / m(t) (Tweedie's formula), an error of about sigma / 28 in
brightness, 0.36 at sigma = 10, and a sampler that follows such a model ends on black or white
images. For real test images (with their labels for a conditional run), at each noise level:

- slope: the regression slope of the mean of the model's noise estimate, -std(t) s(x, t), on the
  mean of the true z (the best estimate has a slope near 1 wherever the noise's mean is larger
  than the spread of the data's, i.e. at large sigma; 0 means the model does not see it);
- |D - x0| brightness: the mean absolute error of the denoised image's mean brightness;
- if ignored: the same for a model that gets everything right but the noise's mean, sigma |mean z|.

With ``--samples N`` it also draws N samples (``heun-sde``, 25 steps, seed 0; a conditional run N / 10
of each class at ``--guidance``) and counts those whose mean brightness is under 0.05 (black) or
over 0.55 (saturated), beside the same fractions of the training images.

    python3 benchmarks/noise_mean.py runs/fashion_cond [--images 200] [--sigmas 0.5,2,5,9]
    python3 benchmarks/noise_mean.py runs/fashion_cond --samples 80 --guidance 2
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinydiff import argtypes as A  # noqa: E402

BLACK, SATURATED = 0.05, 0.55          # mean brightness of a black / a saturated image


def brightness_rows(score_fn, sde, x0, sigmas, seed=0):
    """Per sigma: (sigma, slope, |D - x0| brightness error, the error if the noise's mean were
    ignored), on host arrays: x0 (N, C, H, W) in [0, 1], score_fn(x, t) -> score (N, C, H, W).
    Noise levels above the SDE's sigma(T) are skipped (no model was trained there)."""
    rng = np.random.default_rng(seed)
    top = float(sde.scaled_std(float(sde.T)))
    rows = []
    for sigma in sigmas:
        if sigma > top:
            continue
        t = float(sde.time_of_scaled_std(float(sigma)))
        m, std = float(sde.marginal_mean_coeff(t)), float(sde.marginal_std(t))
        z = rng.standard_normal(x0.shape).astype(x0.dtype)
        x = m * x0 + std * z                                           # eq. 1
        s = np.asarray(score_fn(x, np.full(len(x0), t, x0.dtype)), np.float64)
        z_hat = -std * s
        denoised = (x + std ** 2 * s) / m                              # Tweedie
        zm, zhm = z.mean((1, 2, 3)), z_hat.mean((1, 2, 3))
        slope = float(np.cov(zm, zhm)[0, 1] / zm.var(ddof=1))
        err = float(np.abs(denoised.mean((1, 2, 3)) - x0.mean((1, 2, 3))).mean())
        rows.append((float(sigma), slope, err, float(sigma * np.abs(zm).mean())))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=A.existing_dir, help="a run folder of tinydiff train")
    ap.add_argument("--images", type=A.positive_int, default=200, help="test images (default 200)")
    ap.add_argument("--sigmas", type=A.float_list, default=[0.5, 1, 2, 5, 9],
                    help="noise levels sigma = std / m (default 0.5,1,2,5,9)")
    ap.add_argument("--samples", type=A.nonnegative_int, default=0, help="also draw this many "
                    "samples and count the black and saturated ones (default 0: none)")
    ap.add_argument("--guidance", type=A.nonnegative_float, default=2.0,
                    help="guidance weight of those samples (conditional runs; default 2)")
    ap.add_argument("--data", default=None, help="folder of the data sets ($TINYDIFF_DATA)")
    args = ap.parse_args(argv)
    from tinydiff import data, experiments as E, sampling
    run = E.load_run(args.run)
    if run.autoencoder is not None:
        raise SystemExit("noise_mean.py: a latent run denoises codes, not images; pass a pixel run")
    x, y = data.load_dataset(run.config["dataset"], "test", root=args.data, verbose=False)
    x0 = E.to_unit(x[:args.images]).astype(np.float32)
    labels = np.asarray(y[:args.images], np.int64) if run.config.get("conditional") else None
    score_fn = sampling.model_score_fn(run.model, labels=labels)
    groups = ""
    if run.config["model"].startswith("unet"):
        from tinydiff.models.unet import GROUP_CHANNELS
        groups = f", group_channels {run.config.get('group_channels') or GROUP_CHANNELS}"
    print(f"{args.run}: {E.model_title(run.config)}, {len(x0)} test images{groups}")
    print("| sigma | slope (1: sees the noise's mean) | brightness error of D | if ignored |")
    print("|---|---|---|---|")
    for sigma, slope, err, ignored in brightness_rows(score_fn, run.sde, x0, args.sigmas):
        print(f"| {sigma:g} | {slope:.2f} | {err:.3f} | {ignored:.3f} |")
    if args.samples:
        cond = bool(run.config.get("conditional"))
        labels = E.sample_labels(args.samples)[0] if cond else None
        images, _ = E.draw_samples(run.model, run.sde, args.samples, "heun-sde", 25, seed=0,
                                   batch_size=100, labels=labels, guidance=args.guidance if cond else 0.0)
        train_x, _ = data.load_dataset(run.config["dataset"], "train", root=args.data, verbose=False)
        for name, imgs in ((f"{args.samples} samples", images),
                           ("training images", E.to_unit(train_x[:10000]))):
            black, saturated = dark_and_bright(imgs)
            print(f"{name}: {100 * black:.1f} % black (mean < {BLACK}), "
                  f"{100 * saturated:.1f} % saturated (mean > {SATURATED})")
    return 0


def dark_and_bright(images):
    """The fractions of images whose mean brightness is under BLACK and over SATURATED."""
    means = np.asarray(images, np.float64).reshape(len(images), -1).mean(1)
    return float((means < BLACK).mean()), float((means > SATURATED).mean())


if __name__ == "__main__":
    sys.exit(main())
