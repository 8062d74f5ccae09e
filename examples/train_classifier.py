"""Train the feature classifier of tinydiff.metrics with tinydiff, and write its weights.

The exact recipe that made the shipped weights (seed 0, float32, numpy backend, 2 CPU cores):

    python3 examples/train_classifier.py --dataset mnist
    python3 examples/train_classifier.py --dataset fashion-mnist
    python3 examples/train_classifier.py --dataset cifar-10

(AdamW lr 2e-3 without weight decay, cosine decay to 0, batch 128, 4 epochs on MNIST and 8 on
Fashion-MNIST, 10 on CIFAR-10.) It prints the test accuracy and the
SHA-256 of the written file; to ship a re-created file, paste that SHA-256 into
SHIPPED_SHA256 in tinydiff/models/classifier.py.
"""
import argparse
import time

import numpy as np

import tinydiff as td
from tinydiff import data, nn
from tinydiff.models.classifier import (Classifier, accuracy, canonical_dataset, fit,
                                        save_classifier, shipped_weights_path)

EPOCHS = {"mnist": 4, "fashion-mnist": 8, "cifar-10": 10}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or cifar-10")
    p.add_argument("--epochs", type=int, default=None, help="default: 4 / 8 / 20 by data set")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="numpy", help="numpy or cupy")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--test-limit", type=int, default=None, help="test on the first N images only")
    p.add_argument("--data-root", default=None, help="folder with the data sets (else TINYDIFF_DATA)")
    p.add_argument("--out", default=None, help="output .npz (default: the shipped weights file)")
    args = p.parse_args(argv)

    name = canonical_dataset(args.dataset)
    epochs = args.epochs or EPOCHS[name]
    train_x, train_y = data.load_dataset(name, "train", root=args.data_root, limit=args.limit)
    test_x, test_y = data.load_dataset(name, "test", root=args.data_root, limit=args.test_limit)
    channels, size = (1, train_x.shape[-1]) if train_x.ndim == 3 else train_x.shape[1:3]

    nn.manual_seed(args.seed)
    model = Classifier(in_channels=channels, image_size=size, num_classes=10, dataset=name)
    print(f"{name}: {len(train_x)} train / {len(test_x)} test images, {model.num_parameters()} "
          f"parameters, {epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    start = time.perf_counter()
    fit(model, train_x, train_y, epochs, args.batch_size, args.lr, seed=args.seed,
        backend=args.backend, log=lambda s: print(s, flush=True))
    train_time = time.perf_counter() - start
    acc = accuracy(model, test_x, test_y)
    print(f"test accuracy {100 * acc:.2f}% on {len(test_x)} images; training took {train_time:.0f}s")

    out = args.out or shipped_weights_path(name)
    recipe = {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "optimizer": "AdamW(weight_decay=0), cosine decay", "train_images": len(train_x)}
    sha = save_classifier(model, out, test_accuracy=acc, test_images=len(test_x), recipe=recipe,
                          train_seconds=round(train_time), tinydiff_version=td.__version__)
    print(f"wrote {out} ({np.round(__import__('os').path.getsize(out) / 1024)} KiB), sha256 {sha}")
    return acc


if __name__ == "__main__":
    main()
