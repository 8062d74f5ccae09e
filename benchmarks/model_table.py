"""The parameter count and the cost of one training step of every named score model, as the
presets build them: the table of the README's U-Net section.

A training step is the Trainer's work on one batch of 64 (the eq. 5 loss of docs/design.md with
the preset's training noise and label dropout, backward, the recipe's optimizer step and EMA
update), timed in this one process, the rows one after another, each the median of --repeats
steps after one warm-up step. Threads: TINYDIFF_NUM_THREADS (the launcher sets the BLAS threads
from it). The epoch column is the step time times the steps of one epoch of the preset's data
set (60,000 or 50,000 images in batches of 64).

    TINYDIFF_NUM_THREADS=2 python3 benchmarks/model_table.py [--repeats 3] [--skip-large]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tinydiff import argtypes as A  # noqa: E402
from tinydiff import experiments as E  # noqa: E402
from tinydiff.backend import get_backend  # noqa: E402
from latent_speed import build, timed, train_step  # noqa: E402

TRAIN_IMAGES = {"mnist": 60000, "fashion-mnist": 60000, "cifar-10": 50000}

# (preset, base channels (None: the configuration's), model override): the shipped rows
ROWS = [("mnist", None, None), ("mnist-cond", None, None),
        ("fashion-mnist-cond", 32, None), ("fashion-mnist-cond", 16, None),
        ("cifar10-cond", 32, None), ("cifar10-cond", 16, None),
        ("fashion-latent-cond", None, None), ("cifar10-cond", None, "unet-32l")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=A.positive_int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="leave out unet-32l (a GPU model: "
                    "tens of seconds a step on a CPU)")
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    args = ap.parse_args(argv)
    backend = get_backend(args.backend)
    print(f"threads {os.environ.get('TINYDIFF_NUM_THREADS', 'default')}, backend {backend.name}, "
          f"batch 64, median of {args.repeats} steps")
    print("| preset | model | parameters | train step | epoch |")
    print("|---|---|---|---|---|")
    for preset, base, model_name in ROWS:
        if args.skip_large and model_name == "unet-32l":
            continue
        config, _, model, opt, ema, loss_fn = build(preset, base, backend, model=model_name)
        shape = E.sample_shape(config)
        step = train_step(backend, model, opt, ema, loss_fn, shape)
        (t,) = timed([step], args.repeats if model_name != "unet-32l" else 1)
        n = sum(int(p.data.size) for p in model.parameters())
        steps = math.ceil(TRAIN_IMAGES[config["dataset"]] / 64)
        what = config["model"] + (f" base {config['base_channels']}" if base else "")
        where = "2x7x7 codes" if config.get("latent") else "x".join(map(str, shape))
        print(f"| {preset} | {what} on {where} | {n:,} | {1000 * t:,.0f} ms | "
              f"{t * steps / 60:.1f} min |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
