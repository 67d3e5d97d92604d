"""``python -m flatness``: see :mod:`flatness.cli`."""

import sys

from flatness.cli import main

if __name__ == "__main__":
    sys.exit(main())
