"""``python -m autoperm.zoo``: see :func:`autoperm.zoo.main`."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
