"""``python -m tiling``: see :mod:`tiling.cli`."""

from tiling.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
