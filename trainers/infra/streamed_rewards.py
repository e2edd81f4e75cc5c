"""Scoring that starts while the rollout is still generating, and never checks the same proof twice.

The generator calls `on_finished(row, completion)` the moment a row stops (eval/engine/generation.py).
`row_finished_callback(rewards, tasks)` makes that callback: every reward with a `prefetch(task, text)`
method (the `lean` reward) is handed the row then, and starts checking it in the background. After
generation the step calls every reward as always; a reward that prefetched finds its checks running or
done and waits only for what is left. Rewards without `prefetch` are simply called after generation.

The results cannot differ from checking after generation: prefetching only fills `CheckCache`, and
the call after generation reads the verdicts from it, in row order, whatever order the checks end in.

`CheckCache` is content-addressed: the key is (checker version, the Lean text checked), and the text
holds the task's header and statement and the proof, so a repeated (statement, proof) pair is checked
once per run, and a verdict is never reused under another Lean or Mathlib.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class CheckCache:
    """Verdicts of `check_one(text)` by content, computed by `workers` threads, each text once."""

    def __init__(self, check_one: Callable[[str], tuple[bool, str]], version: str, workers: int,
                 max_entries: int = 100_000):  # fmt: skip
        self.check_one, self.version, self.max_entries = check_one, version, max_entries
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lean-check")
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.checks = self.hits = 0

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.version}\x00{text}".encode("utf-8")).hexdigest()

    def submit(self, text: str) -> Future:
        """The future verdict of `text`: the one already asked for, or a new check."""
        key = self.key(text)
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                self.hits += 1
                self._futures.move_to_end(key)
                return future
            self.checks += 1
            future = self._futures[key] = self._executor.submit(self.check_one, text)
            self._forget_oldest()
        # A check that failed (an unreachable server) is not a verdict: the next ask tries again.
        future.add_done_callback(lambda done: self._forget_if_failed(key, done))
        return future

    def _forget_if_failed(self, key: str, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            return
        with self._lock:
            if self._futures.get(key) is future:
                del self._futures[key]

    def _forget_oldest(self) -> None:
        while len(self._futures) > self.max_entries:
            oldest = next(iter(self._futures))
            if not self._futures[oldest].done():
                break  # still wanted by the step that asked for it
            del self._futures[oldest]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def done_future(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def row_finished_callback(rewards: dict, tasks: list) -> Callable | None:
    """The generator's `on_finished(row, completion)`: each reward that can start early gets the row's task and
    text; None when no reward can (the generator then calls nothing)."""
    early = [prefetch for fn in rewards.values() if callable(prefetch := getattr(fn, "prefetch", None))]
    if not early:
        return None

    def row_finished(row: int, completion) -> None:
        for prefetch in early:
            try:
                prefetch(tasks[row], completion.text)
            except Exception:  # noqa: BLE001 - the reward's call after generation meets it again and says it in one line
                pass

    return row_finished
