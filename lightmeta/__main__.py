"""``python -m lightmeta``: see :mod:`lightmeta.cli`."""
import sys

from lightmeta.cli import main

if __name__ == "__main__":
    sys.exit(main())
