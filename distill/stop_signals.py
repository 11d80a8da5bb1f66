"""Graceful stop on SIGTERM / SIGINT: finish the optimizer step, write a checkpoint, exit non-zero.

Job schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job, and Ctrl-C sends SIGINT. The
first signal only sets a flag; the training loop reads it after each optimizer step, every process agrees on it (one
process may be signalled alone), they write a checkpoint together and stop. A second signal exits at once, without a
checkpoint. Copies of one signal that arrive within ``DUPLICATE_WINDOW_S`` count once: a launcher (torchrun,
``accelerate launch``) forwards the SIGTERM it receives to its workers, which SLURM may already have signalled too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 0.5


class TrainingStopped(Exception):
    """Raised by the trainer once the checkpoint a stop signal asked for is written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Records the first stop signal; a later one (outside the duplicate window) ends the process immediately."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self.last_checkpoint: Path | None = None  # named in the message of an immediate exit

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def handle(self, signum: int, frame=None) -> None:
        """Signal handler: flag the first signal, exit on a second one."""
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            print(f"{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
                  "(send it again to exit at once).", file=sys.stderr, flush=True)
            return
        if now - self._first_at < DUPLICATE_WINDOW_S:
            return
        where = f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        print(f"{signal.Signals(signum).name} received again: exiting now without a checkpoint; {where}.",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


@contextmanager
def stop_signals_handled():
    """Install a :class:`StopRequest` for SIGTERM and SIGINT while the block runs (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
