"""SIGTERM as Ctrl-C: what a cluster's stop (or `kill`) does to a twophase command.

Without this, SIGTERM ends the process at once: no "interrupted" line, no
manifest, a half-written merge left behind. With it, SIGTERM raises
KeyboardInterrupt like Ctrl-C, so every command stops the same way (training
writes its checkpoint first: trainers/infra/run.py, DeferredInterrupts).
"""

from __future__ import annotations

import signal


class sigterm_as_interrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (in the main thread; elsewhere signals are not ours)."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not in the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt
