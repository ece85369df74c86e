"""``python -m camfn``: the ``camfn`` command line (see :mod:`camfn.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
