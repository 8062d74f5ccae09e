"""Sample quality of a trained run as Markdown table rows: `tinydiff evaluate` under its old name.

    python3 benchmarks/quality.py runs/mnist_uncond --sampler em --steps 500 --samples 1000 --header --ceilings
    python3 benchmarks/quality.py runs/mnist_cond --samples 1000 --guidance 0,0.5,1,2,4

Every flag is `tinydiff evaluate`'s (docs/cli.md): the run folder or its checkpoint.npz, the
sampler and its steps, the sample count and seed, --bpd N for test-set bits/dim, and for
conditional runs the guidance weight(s). Each row gives the Fréchet distance in the shipped
classifier's features beside its floor (train vs test at the same count and seed), the class
coverage (unconditional) or conditional accuracy, bits/dim when asked, and the sampling time.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from tinydiff import cli  # noqa: E402


def main(argv=None):
    return cli.main(["evaluate", *(sys.argv[1:] if argv is None else argv)], prog="quality.py")


if __name__ == "__main__":
    sys.exit(main())
