"""Class-conditional MNIST: a ScoreNet with a class embedding and self-attention at the 5x5 and
2x2 feature maps, trained with label dropout for classifier-free guidance ('cond' recipe).

  python examples/mnist_cond.py --out runs/mnist_cond                          # train
  tinydiff sample runs/mnist_cond --labels 9 --guidance 2 --out nines.npz      # draw nines
  tinydiff evaluate runs/mnist_cond --samples 1000 --guidance 0,0.5,1,2,4      # the sweep

The same as `tinydiff train --preset mnist-cond ...`; every flag is documented in docs/cli.md.
Grids (samples/epoch_NNN.png, samples_em.png) have one row per digit.
"""
import sys

from tinydiff import cli


def main(argv=None):
    return cli.train_main(argv, preset="mnist-cond", prog="mnist_cond.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
