"""``python -m distill <method> [flags]``: the command line of any registered method (flags: ``<method> --help``).

    accelerate launch -m distill lcm --pretrained_teacher_model=<folder or Hub id> --train_data_dir=<images> ...
"""

from __future__ import annotations

import sys

from distill.cli import main
from distill.methods import METHODS


def usage() -> str:
    """The one-screen usage: the registered method names."""
    return (f"usage: python -m distill <method> [flags]\n\nmethods: {', '.join(METHODS)}\n"
            "every flag of a method: python -m distill <method> --help")


def run(argv: list[str]) -> int:
    """Hand ``<method> [flags]`` to that method's command line; usage for no, or an unknown, method."""
    if argv and argv[0] in METHODS:
        return main(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    problem = f"unknown method {argv[0]!r}" if argv else "no method given"
    print(f"{usage()}\nerror: {problem}; pass one of: {', '.join(METHODS)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
