"""Train the reference ScoreNet (Song's score-SDE MNIST tutorial) on MNIST and draw digits.

  python examples/mnist_uncond.py --out runs/mnist            # train with the 'fast' recipe
  python examples/mnist_uncond.py --out runs/mnist --resume   # continue (e.g. with --epochs 10)
  python examples/mnist_uncond.py --out runs/mnist --sample-only --sampler pc

The same as `tinydiff train --preset mnist ...`; every flag is documented in docs/cli.md.
Outputs in --out: checkpoint.npz, config.json, loss_steps.csv, loss_epochs.csv, loss.png,
samples/epoch_NNN.png (after each epoch) and samples_<sampler>.png / .npz (final samples).
Data: $TINYDIFF_DATA/mnist, then ~/.cache/tinydiff/mnist, then a verified download.
Settings come from the preset and recipe, then (with --resume / --sample-only) the checkpoint,
then the flags.
"""
import sys

from tinydiff import cli


def main(argv=None):
    return cli.train_main(argv, preset="mnist", prog="mnist_uncond.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
