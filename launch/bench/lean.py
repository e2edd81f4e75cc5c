"""`twophase bench lean`: what checking proofs with Lean adds to a GRPO step, with a fake Lean of stated latency.

The step is the shipped shape, 2 prompts × 8 completions of up to 512 new tokens, timed from the H200
measurement of `twophase bench grpo --completion-lengths mixed` (BENCHMARKS.md, 2026-12-01): the batch
generates for 2.93 s (the rows decode side by side; half run to 512 tokens, the others end at a length
drawn uniformly from [64, 512), and a row ending at L tokens ends at L / 512 of that time), then the update
takes 1.68 s. The random reward's step is those two. The Lean condition's step runs the real reward code
(trainers/rewards: LeanReward, its cache and prefetch; trainers/infra/lean_server.py for the remote rows)
around a fake checker whose every proof sleeps a latency drawn per proof:

* log-normal with a median of `median` seconds (2 s) and σ = `sigma` (1.0), and
* with probability `timeout_share` (5 %), the full `timeout` (60 s, the shipped timeout) instead.

The median and the 60 s tail are issue 21's statement of the problem (a check takes from under a second to
the timeout); σ and the 5 % share are assumptions, options here. For scale: the Kimina Lean Server's
authors report ≈ 100 checks/s on 64 cores for short proofs, ≈ 0.64 core-seconds a proof.

Modes: `after` (local pool, every proof checked once generation ends, as before issue 21), `streamed`
(local pool, each row checked as it ends) and `remote` (streamed, through `LeanCheckServer` over HTTP on
localhost). Sleeps are multiplied by `time_scale` so the CPU run takes seconds; figures are divided by it.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import threading
import time

import click

GENERATION_S, UPDATE_S, MAX_NEW_TOKENS = 2.93, 1.68, 512  # BENCHMARKS.md, H200, 2026-12-01 (mixed lengths)
MODES = ("after", "streamed", "remote")


class FakeLean:
    """`check_one(text)` and the pool's `answer(text, timeout)`: sleeps a latency drawn from the text's hash."""

    def __init__(self, median, sigma, timeout_share, timeout, time_scale, workers):
        self.median, self.sigma, self.timeout_share, self.timeout = median, sigma, timeout_share, timeout
        self.time_scale, self.size, self.version = time_scale, workers, "fake lean"
        self._slots = threading.Semaphore(workers)  # `workers` REPLs: more proofs wait

    def latency(self, text: str) -> float:
        rng = random.Random(hashlib.sha256(text.encode()).hexdigest())
        if rng.random() < self.timeout_share:
            return self.timeout
        return min(self.timeout, self.median * math.exp(self.sigma * rng.gauss(0, 1)))

    def answer(self, text: str, timeout: float | None = None) -> dict:
        with self._slots:
            time.sleep(self.latency(text) * self.time_scale)
        return {"env": 0}

    def check_one(self, text: str) -> tuple[bool, str]:
        self.answer(text)
        return True, "ok"

    def close(self) -> None:
        pass


def fake_lean_reward(spec: str):
    """The `lean` reward on a FakeLean in real time, for `bench grpo --fake-lean MEDIAN,SIGMA,SHARE,TIMEOUT,WORKERS`."""
    from twophase.data.base.errors import UserError
    from twophase.trainers.infra.reward_calls import CheckedReward

    try:
        median, sigma, share, timeout, workers = (float(part) for part in spec.split(","))
    except ValueError:
        raise UserError(f"--fake-lean {spec!r}: give MEDIAN,SIGMA,SHARE,TIMEOUT,WORKERS, e.g. 2,1,0.05,60,8") from None
    fake = FakeLean(median, sigma, share, timeout, time_scale=1.0, workers=int(workers))
    return CheckedReward("lean", _lean_reward("streamed", fake, int(workers))[0])


def _row_ends(step: int, rows: int) -> list[float]:
    """Unscaled seconds into generation at which each row ends (the `mixed` lengths of bench grpo)."""
    rng = random.Random(f"lengths/{step}")
    lengths = [MAX_NEW_TOKENS if row % 2 == 0 else rng.randrange(MAX_NEW_TOKENS // 8, MAX_NEW_TOKENS) for row in range(rows)]
    return [GENERATION_S * length / MAX_NEW_TOKENS for length in lengths]


def _lean_reward(mode: str, fake: FakeLean, workers: int):
    """The real LeanReward around the fake checker (over HTTP for `remote`), and what to close after."""
    from twophase.trainers.infra.lean_server import LeanCheckServer, LeanServerClient
    from twophase.trainers.rewards import LeanReward

    if mode != "remote":
        return LeanReward.around(fake, workers), None
    server = LeanCheckServer(fake, "127.0.0.1", 0, log=lambda line: None)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    return LeanReward.around(LeanServerClient(server.url, timeout=fake.timeout, retries=0), workers), server


def _one_step(step, mode, reward, tasks, scale) -> float:
    """Unscaled seconds of one step: generation (rows ending on schedule), the reward, the update."""
    started = time.perf_counter()
    completions = [f"  simp -- step {step} row {row}\n```" for row in range(len(tasks))]
    if mode == "random":
        time.sleep(GENERATION_S * scale)
    else:
        for row, end in sorted(enumerate(_row_ends(step, len(tasks))), key=lambda pair: pair[1]):
            time.sleep(max(0.0, started + end * scale - time.perf_counter()))
            if mode != "after":
                reward.prefetch(tasks[row], completions[row])
        time.sleep(max(0.0, started + GENERATION_S * scale - time.perf_counter()))
        reward(tasks, completions, step=step)
    time.sleep(UPDATE_S * scale)
    return (time.perf_counter() - started) / scale


def bench_lean(steps=20, workers=8, median=2.0, sigma=1.0, timeout_share=0.05, timeout=60.0, time_scale=0.01,
               rows=16, modes=MODES) -> dict:  # fmt: skip
    """Mean unscaled step seconds of the random condition and of the Lean condition in each mode."""
    from twophase.data.lean_workbook import LeanTask

    tasks = [LeanTask(id=f"t{row // 8}", statement=f"theorem t{row // 8} : True := by\n", header="", informal="")
             for row in range(rows)]  # fmt: skip
    latency = f"log-normal median {median:g} s, sigma {sigma:g}; {timeout_share:.0%} at the {timeout:g} s timeout"
    random_steps = [_one_step(s, "random", None, tasks, time_scale) for s in range(steps)]
    result = {"benchmark": "lean", "steps": steps, "workers": workers, "completions_per_step": rows, "latency": latency,
              "time_scale": time_scale, "random_step_s": _mean(random_steps)}  # fmt: skip
    for mode in modes:
        fake = FakeLean(median, sigma, timeout_share, timeout, time_scale, workers)
        reward, server = _lean_reward(mode, fake, workers)
        try:
            seconds = [_one_step(s, mode, reward, tasks, time_scale) for s in range(steps)]
        finally:
            reward.cache.close()
            if server is not None:
                server.shutdown()
                server.server_close()
        result[f"{mode}_step_s"] = _mean(seconds)
        result[f"{mode}_vs_random"] = round(result[f"{mode}_step_s"] / result["random_step_s"], 2)
    return result


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 2)


@click.command("lean")
@click.option("--steps", default=20, show_default=True, help="Steps per mode (each step's proofs are new).")
@click.option("--workers", default=8, show_default=True, help="REPLs (local) or server workers (remote).")
@click.option("--median", default=2.0, show_default=True, help="Median seconds of a check (log-normal).")
@click.option("--sigma", default=1.0, show_default=True, help="σ of the log-normal.")
@click.option("--timeout-share", default=0.05, show_default=True, help="Share of proofs that run to the timeout.")
@click.option("--timeout", default=60.0, show_default=True, help="The check's timeout, seconds.")
@click.option("--time-scale", default=0.01, show_default=True, help="Real seconds slept per modelled second.")
@click.option("--mode", "modes", type=click.Choice(MODES), multiple=True, default=MODES, show_default=True)
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def bench_lean_command(steps, workers, median, sigma, timeout_share, timeout, time_scale, modes, out):
    """FV step time against the random reward's, with a fake Lean of stated latency (CPU; seconds, not minutes)."""
    from twophase.launch.bench.training import emit

    emit(bench_lean(steps, workers, median, sigma, timeout_share, timeout, time_scale, modes=modes), out)
