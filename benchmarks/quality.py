"""Sample quality of a trained diffusion checkpoint, as one Markdown table row.

    python3 benchmarks/quality.py runs/mnist/checkpoint.npz --sampler em --steps 500 --samples 1000 --header
    python3 benchmarks/quality.py runs/mnist/checkpoint.npz --sampler ode --samples 1000 --bpd 100

It reads a checkpoint written by tinydiff.train (EMA weights when the run kept them), draws
``--samples`` images with the chosen sampler (seeded), and prints

    | data set | model | sampler | steps (NFE) | samples | Fréchet dist. (floor) | classes | bits/dim | sampling time |

- Fréchet dist.: in the penultimate features of the shipped classifier of the data set, between
  the samples and ``--samples`` test images; the floor in brackets is train vs test measured with
  the same code, count, classifier and seed (what a perfect model would score). ``--ceilings``
  also prints test vs blurred test and test vs noise.
- classes: for an unconditional model, the entropy of the predicted classes in bits (log2 10 = 3.32
  is balanced) and how many classes occur; for a class-conditional model (balanced labels
  0, 1, ..., 9, 0, ...) the conditional accuracy.
- bits/dim: on the first ``--bpd`` test images picked with the seed (0: skipped; it solves the
  likelihood ODE, which is slow on a CPU).
Numbers are only comparable at the same sample count, classifier and seed (and, for PC, batch
size: its Langevin step uses the batch's mean score norm).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import tinydiff as td  # noqa: E402
from tinydiff import data, metrics, sampling, train  # noqa: E402
from tinydiff.models import ScoreNet  # noqa: E402
from tinydiff.models.classifier import load_classifier  # noqa: E402
from tinydiff.sde import VESDE  # noqa: E402

HEADER = ("| data set | model | sampler | steps (NFE) | samples | Fréchet dist. (floor) | classes "
          "| bits/dim | sampling time |\n|---|---|---|---|---|---|---|---|---|")


def load_score_model(path, backend, use_ema=True):
    """(model in eval mode, sde, config) from a tinydiff.train checkpoint."""
    config = train.read_config(path)
    state = train.load_checkpoint(path)
    label_embed = state["model"].get("label_embed.weight")
    num_classes = None if label_embed is None else label_embed.shape[0] - 1
    channels = config.get("channels", "32,64,128,256")
    channels = tuple(int(c) for c in (channels.split(",") if isinstance(channels, str) else channels))
    in_channels = state["model"]["conv1.weight"].shape[1]
    sde = VESDE(float(config.get("sigma", 25.0)))
    model = ScoreNet(sde.marginal_std, channels=channels, embed_dim=int(config.get("embed_dim", 256)),
                     in_channels=in_channels, num_classes=num_classes).to(backend)
    train.load_model_weights(path, model, use_ema=use_ema)
    return model.eval(), sde, config


def draw(model, sde, sampler, steps, n, shape, seed, batch, labels=None, rtol=1e-5):
    """n host samples (float32, unclipped) in batches; returns (samples, NFE per sample, seconds)."""
    be = model.backend
    out, nfe = [], 0
    start = time.perf_counter()
    for i in range(0, n, batch):
        m = min(batch, n - i)
        y = None if labels is None else be.asarray(np.asarray(labels[i:i + m], np.int64))
        score_fn = sampling.model_score_fn(model, labels=y)
        rng = be.default_rng(train.derived_seed(seed, i))
        kw = dict(rng=rng, backend=be.name)
        if sampler == "em":
            x, nfe = sampling.euler_maruyama(score_fn, sde, (m, *shape), num_steps=steps, **kw), steps
        elif sampler == "pc":   # one corrector step per predictor step: two score evaluations
            x, nfe = sampling.predictor_corrector(score_fn, sde, (m, *shape), num_steps=steps, **kw), 2 * steps
        else:
            x, k = sampling.ode_sampler(score_fn, sde, (m, *shape), rtol=rtol, atol=rtol, **kw)
            nfe = max(nfe, k)
        out.append(be.to_host(x))
    be.synchronize()
    return np.concatenate(out).astype(np.float32), nfe, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.npz written by tinydiff.train")
    p.add_argument("--sampler", choices=["em", "pc", "ode"], default="em")
    p.add_argument("--steps", type=int, default=500, help="time steps of em / pc (ode: adaptive)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ode tolerance (rtol = atol)")
    p.add_argument("--samples", type=int, default=1000, help="samples drawn and test images compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500, help="samples drawn at once")
    p.add_argument("--bpd", type=int, default=0, help="test images for bits/dim (0: skip)")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--classifier", default=None, help="classifier .npz (default: the shipped one)")
    p.add_argument("--data", default=None, help="folder holding the data sets")
    p.add_argument("--ceilings", action="store_true", help="also print blurred / noise distances")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--save", default=None, help="write the samples to this .npz")
    args = p.parse_args(argv)

    backend = td.get_backend(args.backend)
    model, sde, config = load_score_model(args.checkpoint, backend, use_ema=not args.no_ema)
    dataset = args.dataset or config.get("dataset", "mnist")
    classifier = load_classifier(dataset, path=args.classifier, backend=backend)
    train_x, _ = data.load_dataset(dataset, "train", root=args.data, verbose=False)
    test_x, _ = data.load_dataset(dataset, "test", root=args.data, verbose=False)
    shape = (model.in_channels,) + tuple(test_x.shape[-2:])

    labels = None if model.num_classes is None else np.arange(args.samples) % model.num_classes
    samples, nfe, seconds = draw(model, sde, args.sampler, args.steps, args.samples, shape,
                                 args.seed, args.batch, labels, args.rtol)
    if args.save:
        np.savez(args.save, samples=samples, labels=labels if labels is not None else np.zeros(0))

    n, seed = args.samples, args.seed
    fd = metrics.frechet_classifier_distance(samples, test_x, classifier, n, seed)
    floor = metrics.frechet_classifier_distance(train_x, test_x, classifier, n, seed)
    if labels is None:
        classes = str(metrics.class_coverage(samples, classifier, n, seed))
    else:
        classes = f"cond. acc. {100 * metrics.conditional_accuracy(samples, labels, classifier, n, seed):.1f}%"
    bpd = "–"
    if args.bpd:
        mean, err = metrics.bits_per_dim_on_test_set(model, sde, test_x, args.bpd, seed,
                                                     batch_size=min(args.bpd, 100), backend=backend)
        bpd = f"{mean:.3f} ± {err:.3f} (n={args.bpd})"
    steps = f"rtol {args.rtol:g} ({nfe})" if args.sampler == "ode" else f"{args.steps} ({nfe})"
    name = f"ScoreNet {'cond.' if labels is not None else 'uncond.'} {os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}"
    if args.header:
        print(HEADER)
    print(f"| {dataset} | {name} | {args.sampler} | {steps} | {n} (seed {seed}) | {fd:.2f} ({floor:.2f}) "
          f"| {classes} | {bpd} | {seconds:.0f} s ({1000 * seconds / n:.0f} ms/sample, {backend.name}) |")
    if args.ceilings:
        ref = metrics.reference_distances(train_x, test_x, classifier, n, seed)
        print(f"reference points at n={n}, seed={seed}: " +
              ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    return fd


if __name__ == "__main__":
    main()
