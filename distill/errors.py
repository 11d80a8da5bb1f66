"""User-facing errors."""


class DistillError(Exception):
    """An error the user caused (bad path, bad dataset, bad flag); the message names the problem and the fix."""
