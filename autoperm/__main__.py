"""``python -m autoperm``: the same command line as the ``autoperm`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
