"""CIFAR-10 with the scalable U-Net (unet-32s; unet-32l is DDPM's model, for a GPU), conditional
by default, with random horizontal flips and the report's recipe (AdamW, cosine annealing then a
constant rate, warm-up, clipping, EMA). The loss plot draws the gradient norm of every step
beside the loss, so a run about to blow up shows it; a NaN never costs the last checkpoint.

  python examples/cifar10.py --out runs/cifar10_cond                            # conditional
  python examples/cifar10.py --preset cifar10 --out runs/cifar10                # unconditional
  python examples/cifar10.py --model unet-32l --backend cupy --out runs/c10l    # on a GPU
  tinydiff evaluate runs/cifar10_cond --samples 1000 --sampler heun --steps 18

The same as `tinydiff train --preset cifar10-cond ...`; every flag is in docs/cli.md.
"""
import sys

from tinydiff import cli


def main(argv=None):
    return cli.train_main(argv, preset="cifar10-cond", prog="cifar10.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
