"""Fashion-MNIST with the scalable U-Net (unet-28s: residual blocks, attention at 7x7 and in the
middle), conditional by default ('unet' recipe: AdamW, warm-up, cosine then constant, clipping,
EMA); real images of the same classes are drawn beneath every per-class grid.

  python examples/fashion_mnist.py --out runs/fashion_cond                      # conditional
  python examples/fashion_mnist.py --preset fashion-mnist --out runs/fashion    # unconditional
  tinydiff sample runs/fashion_cond --labels 1 --guidance 2 --out trousers.npz  # trousers
  tinydiff evaluate runs/fashion_cond --guidance 0,1,2,4 --sampler heun --steps 18

The same as `tinydiff train --preset fashion-mnist-cond ...`; every flag is in docs/cli.md.
"""
import sys

from tinydiff import cli


def main(argv=None):
    return cli.train_main(argv, preset="fashion-mnist-cond", prog="fashion_mnist.py",
                          description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
