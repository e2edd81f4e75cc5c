"""Progress for a person at a terminal or for a log file: every bar and printed line of a run goes through here.

On a terminal (stderr is a TTY) `progress` is a tqdm bar. Off one (a pipe, an sbatch log) a bar's
redraws are carriage returns and escape codes that the log keeps, one per redraw, so `progress` is
a `PlainProgress` instead, with the bar's surface (update, set_postfix, close, write, iteration): it
prints one plain line at most every TWOPHASE_PROGRESS_SECONDS seconds (default 30) and one at the
end, e.g.

    train: step 40/80 (50%) | loss 0.6931 | 3.2 steps/s | ETA 12s

`say` prints a line of its own without breaking a bar. TQDM_DISABLE=1 (set for the ranks other than
0 under torchrun) silences both kinds of progress.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable

from tqdm.auto import tqdm

from twophase.data.base.errors import UserError

SECONDS_VARIABLE = "TWOPHASE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "batch",
             initial: int = 0, leave: bool = True, disable: bool = False):  # fmt: skip
    """A tqdm bar on a terminal, else a `PlainProgress`; over `iterable` when given (its len, if any, is the total)."""
    disable = disable or _disabled_by_environment()
    if disable or on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, disable=disable,
                    dynamic_ncols=True)  # fmt: skip
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave)


def say(message: str) -> None:
    """One line on stdout, at once: above a terminal's bars (tqdm.write), and flushed (stdout may be a file)."""
    if on_terminal():
        tqdm.write(message)
        sys.stdout.flush()
    else:
        print(message, flush=True)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _disabled_by_environment() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def interval_seconds() -> float:
    """Seconds between two plain lines, from TWOPHASE_PROGRESS_SECONDS (default 30; 0: a line per update)."""
    value = os.environ.get(SECONDS_VARIABLE, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise UserError(f"{SECONDS_VARIABLE}={value!r}: give the seconds between two progress lines, a number >= 0")
    return seconds


class PlainProgress:
    """A progress bar for a log file: plain lines on stderr, at most one every `interval_seconds()` and one at
    the end (none when `leave` is False: an inner bar whose caller says when it is done)."""

    def __init__(self, iterable=None, *, desc: str, total: int | None = None, unit: str = "batch", initial: int = 0,
                 leave: bool = True, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.desc, self.total, self.unit, self.leave = desc, total, unit, leave
        self.n = self.initial = initial
        self.postfix: dict[str, str] = {}
        self.clock = clock
        self.interval = interval_seconds()
        self.started = self.last_line = clock()
        self.printed_n = initial
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_line >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        self.postfix = {str(key): str(value) for key, value in {**(ordered_dict or {}), **values}.items()}

    @staticmethod
    def write(message: str) -> None:
        say(message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.n != self.printed_n:
            self._print()

    def line(self) -> str:
        """`desc: unit n/total (pct%) | postfix | rate | ETA`, the parts it can know."""
        count = f"{self.unit} {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        parts = [f"{self.desc}: {count}"] + [f"{key} {value}" for key, value in self.postfix.items()]
        elapsed = self.clock() - self.started
        done = self.n - self.initial
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {plural(self.unit)}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        if self.total and self.n >= self.total:
            parts.append(f"took {duration(elapsed)}")
        return " | ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last_line = self.clock()
        self.printed_n = self.n


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: whole seconds, the two largest units."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
