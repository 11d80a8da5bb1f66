"""python -m distill.demo: the built-in default job (see distill/demo/run.py)."""

import sys

from .run import main

sys.exit(main())
