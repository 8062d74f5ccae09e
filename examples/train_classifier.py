"""Train the feature classifier of tinydiff.metrics with tinydiff, and write its weights.

A trial run writes to runs/classifier_<dataset>.npz (or --out), never into the installed package:
the metrics check the shipped files' SHA-256, so overwriting one would break every score. The
exact recipe that made the shipped weights (seed 0, float32, numpy backend, 2 CPU cores):

    python3 examples/train_classifier.py --dataset mnist --ship
    python3 examples/train_classifier.py --dataset fashion-mnist --ship
    python3 examples/train_classifier.py --dataset cifar-10 --ship

(AdamW lr 2e-3 without weight decay, cosine decay to 0, batch 128, 4 epochs on MNIST and 8 on
Fashion-MNIST, 10 on CIFAR-10.) It prints the test accuracy and the SHA-256 of the written file;
to ship a re-created file (--ship writes it into tinydiff/weights/), paste that SHA-256 into
SHIPPED_SHA256 in tinydiff/models/classifier.py.
"""
import argparse
import os
import sys
import time

import tinydiff as td
from tinydiff import argtypes as A
from tinydiff import data, nn
from tinydiff.models.classifier import (Classifier, accuracy, canonical_dataset, fit,
                                        save_classifier, shipped_weights_path)

EPOCHS = {"mnist": 4, "fashion-mnist": 8, "cifar-10": 10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", type=canonical_dataset, choices=sorted(EPOCHS),
                   help="mnist, fashion-mnist or cifar-10")
    p.add_argument("--epochs", type=A.positive_int, default=None,
                   help="default: " + ", ".join(f"{n} on {d}" for d, n in EPOCHS.items()))
    p.add_argument("--batch-size", type=A.positive_int, default=128, help="default: %(default)s")
    p.add_argument("--lr", type=A.positive_float, default=2e-3, help="default: %(default)s")
    p.add_argument("--seed", type=A.nonnegative_int, default=0, help="default: %(default)s")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--limit", type=A.positive_int, default=None, help="train on the first N images only")
    p.add_argument("--test-limit", type=A.positive_int, default=None, help="test on the first N images only")
    p.add_argument("--data", type=A.existing_dir, default=None,
                   help="folder with the data sets (default $TINYDIFF_DATA, then the cache)")
    p.add_argument("--data-root", dest="data", type=A.existing_dir, help=argparse.SUPPRESS)  # old name
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=A.out_file(".npz"), default=None,
                       help="output .npz (default: runs/classifier_<dataset>.npz)")
    where.add_argument("--ship", action="store_true",
                       help="write into the installed package (tinydiff/weights/), replacing the "
                            "shipped file; then update SHIPPED_SHA256")
    return p.parse_args(argv)


def run(args):
    name = args.dataset
    epochs = args.epochs or EPOCHS[name]
    out = (shipped_weights_path(name) if args.ship else
           args.out or os.path.join("runs", f"classifier_{name.replace('-', '_')}.npz"))
    backend = td.get_backend(args.backend)             # fails early and clearly without a GPU
    train_x, train_y = data.load_dataset(name, "train", root=args.data, limit=args.limit)
    test_x, test_y = data.load_dataset(name, "test", root=args.data, limit=args.test_limit)
    channels, size = (1, train_x.shape[-1]) if train_x.ndim == 3 else train_x.shape[1:3]

    nn.manual_seed(args.seed)
    model = Classifier(in_channels=channels, image_size=size, num_classes=10, dataset=name)
    print(f"{name}: {len(train_x)} train / {len(test_x)} test images, {model.num_parameters()} "
          f"parameters, {epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    start = time.perf_counter()
    fit(model, train_x, train_y, epochs, args.batch_size, args.lr, seed=args.seed,
        backend=backend.name, log=lambda s: print(s, flush=True))
    train_time = time.perf_counter() - start
    acc = accuracy(model, test_x, test_y)
    print(f"test accuracy {100 * acc:.2f}% on {len(test_x)} images; training took {train_time:.0f}s")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    recipe = {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "optimizer": "AdamW(weight_decay=0), cosine decay", "train_images": len(train_x)}
    sha = save_classifier(model, out, test_accuracy=acc, test_images=len(test_x), recipe=recipe,
                          train_seconds=round(train_time), tinydiff_version=td.__version__)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KiB), sha256 {sha}")
    if args.ship:
        print("to ship it, set SHIPPED_SHA256[" + repr(name) + f"] = {sha!r} in "
              "tinydiff/models/classifier.py")
    return acc


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (td.BackendError, data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
