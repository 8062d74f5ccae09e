"""Latent diffusion on Fashion-MNIST (the report's section VII; docs/latent.md): an autoencoder
(1x28x28 -> 2x7x7 codes), then a class-conditional U-Net on its normalised codes, then trousers
(class 1, the report's Fig. 21) and a per-class grid, decoded. Two `tinydiff train` runs:

  tinydiff train --preset fashion-ae --out runs/fashion_ae
  tinydiff train --preset fashion-latent-cond --autoencoder runs/fashion_ae --out runs/fashion_latent_cond
  tinydiff sample runs/fashion_latent_cond --labels 1 --guidance 2 --out trousers.npz

  python examples/fashion_latent.py [--root runs] [train flags for both runs, e.g. --limit 6000]

An autoencoder already trained in ROOT/fashion_ae is reused. Every flag is in docs/cli.md.
"""
import os
import sys

from tinydiff import cli


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    root = argv.pop(argv.index("--root") + 1) if "--root" in argv else "runs"
    argv = [a for a in argv if a != "--root"]
    ae, latent = os.path.join(root, "fashion_ae"), os.path.join(root, "fashion_latent_cond")
    if not os.path.exists(os.path.join(ae, "checkpoint.npz")):
        rc = cli.main(["train", "--preset", "fashion-ae", "--out", ae, *argv])
        if rc:
            return rc
    rc = cli.main(["train", "--preset", "fashion-latent-cond", "--autoencoder", ae, "--out", latent,
                   *argv])
    steps = argv[argv.index("--sample-steps") + 1] if "--sample-steps" in argv else "500"
    quiet = ["--no-progress"] if "--no-progress" in argv else []
    for what in (["--labels", "1", "--out", os.path.join(latent, "trousers.npz")],
                 ["--per-class", "8", "--out", os.path.join(latent, "per_class.npz")]):
        rc = rc or cli.main(["sample", latent, "--steps", steps, "--guidance", "2", *what, *quiet])
    return rc


if __name__ == "__main__":
    sys.exit(main())
