"""``python -m distill.evaluate [flags]`` (console script ``distill-eval``): see ``cli.py`` or ``--help``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
