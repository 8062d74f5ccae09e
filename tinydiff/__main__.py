"""``python -m tinydiff train | sample | evaluate`` (see tinydiff/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
