"""Reward functions for GRPO on Lean tasks.

Every reward function has one signature:

    fn(tasks: list[LeanTask], completions: list[str], *, step: int = 0, rows: range | None = None) -> list[float]

returning one float per completion. `rows` are the completions' row indices in
the step's whole generation batch (the same however many processes share it;
None: 0, 1, ...); a function of yours without a `rows` parameter is called
without it. A reward object may also expose `details`,
a list with one dict per completion of its last call (e.g. {"passed": False,
"reason": "uses sorry"}), which the trainer writes to its audit log.

`build_reward(spec, options)` picks one: a built-in name (`lean`, `toy`,
`random`, `zero`) or your own: "path/to/file.py:function" (a file, no PYTHONPATH needed)
or "module:function" (importable, or a module in the working directory). For "module:function",
a function gets `options` bound as keyword arguments; a class is instantiated
with them and the instance is the reward. Every reward is called through
trainers/infra/reward_calls.py, which turns what a reward does wrong (raises,
returns NaN, the wrong count, not numbers) into one line naming it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import random
import re
import sys
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.lean_workbook import LeanTask, extract_proof, keeps_statement, program_to_check
from twophase.data.prompts import GRPO_FORMATS, check_format_name
from twophase.trainers.infra.reward_calls import CheckedReward, accepts_keyword


def _check_lengths(tasks: list, completions: list) -> None:
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions; pass one task per completion")


def zero_reward(tasks: list[LeanTask], completions: list[str], *, step: int = 0, rows: range | None = None) -> list[float]:
    """0.0 for everything: a run with this reward must not change the policy's behaviour."""
    _check_lengths(tasks, completions)
    return [0.0] * len(completions)


def toy_reward(tasks: list[LeanTask], completions: list[str], *, step: int = 0, rows: range | None = None) -> list[float]:
    """The share of characters that are lowercase ASCII letters or "_" (0.0 for an empty completion).

    A stand-in for `lean`, not a measure of proof quality: it is dense and
    deterministic, so a tiny random model on CPU visibly learns it within ~20
    GRPO steps, which is what the demo and the tests need to show training works.
    """
    _check_lengths(tasks, completions)
    return [_lowercase_share(text) for text in completions]


def _lowercase_share(text: str) -> float:
    if not text:
        return 0.0
    return sum(1 for ch in text if "a" <= ch <= "z" or ch == "_") / len(text)


class RandomReward:
    """Uniform rewards in [0, 1), a function of (seed, step) and the row in the step's batch only.

    Seeding per step, not once per run, makes a resumed run see exactly the
    rewards the uninterrupted run would have seen.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, tasks: list[LeanTask], completions: list[str], *, step: int = 0, rows: range | None = None) -> list[float]:
        _check_lengths(tasks, completions)
        rows = range(len(completions)) if rows is None else rows
        rng = random.Random(f"{self.seed}/{step}")
        draws = [rng.random() for _ in range(rows.stop)]  # row r gets draw r, whoever scores it
        return draws[rows.start : rows.stop]


# An `axiom` declared by the answer could state the theorem itself.
_AXIOM_DECLARATION = re.compile(r"^\s*(?:private\s+)?axiom\s", re.MULTILINE)


class LeanReward:
    """1.0 when Lean accepts the proof, else 0.0; `details` holds the reason for each.

    Lean runs in a local pool of REPLs (`project_dir`: a Lake project with Mathlib and the REPL built) or
    behind a server of the Kimina Lean Server API (`server`: its URL, e.g. `twophase lean serve` on a CPU
    node; trainers/infra/lean_server.py); the verdict rules are the same. `pool_size` is the number of
    proofs checked at once. Before Lean sees it, a program is screened: a chat answer must have a lean4
    block that still states the task's theorem (it rewrites the whole theorem, so it could prove an easier
    one), and no program may declare an `axiom`. The checker starts here, so a wrong project_dir or an
    unreachable server fails at once.

    `prefetch(task, completion)` starts a check before the call that scores it (as each row of a rollout
    finishes: trainers/infra/streamed_rewards.py); every check goes through a cache keyed by the checker's
    Lean and Mathlib versions and the text checked, so a repeated proof is checked once.
    """

    def __init__(
        self,
        project_dir: str | None = None,
        server: str | None = None,
        pool_size: int = 4,
        timeout: float = 60.0,
        command: list[str] | None = None,
        prompt_format: str = "raw",
        import_timeout: float = 600.0,
        retries: int = 4,
    ):
        if bool(project_dir) == bool(server):
            raise UserError(
                "the 'lean' reward needs exactly one of the options project_dir (a Lake project with Mathlib and "
                "the REPL built, checked here) and server (the URL of a Lean server, e.g. twophase lean serve)"
            )
        check_format_name(prompt_format, GRPO_FORMATS, where="the lean reward's prompt_format")
        checker = _lean_checker(project_dir, server, pool_size, timeout, command, import_timeout, retries)
        self._use(checker, pool_size, prompt_format)

    @classmethod
    def around(cls, checker, workers: int, prompt_format: str = "raw") -> "LeanReward":
        """The reward on a checker of your own (`check_one(text) -> (passed, reason)`, `version`, `close()`), e.g. a
        fake Lean of known latency in a benchmark."""
        reward = cls.__new__(cls)
        reward._use(checker, workers, prompt_format)
        return reward

    def _use(self, checker, workers: int, prompt_format: str) -> None:
        from twophase.trainers.infra.streamed_rewards import CheckCache

        self.prompt_format, self.checker = prompt_format, checker
        self.cache = CheckCache(checker.check_one, checker.version, workers=workers)
        self.details: list[dict] = []

    def screen(self, task: LeanTask, completion: str, program: str) -> str | None:
        """Why `program` fails without asking Lean, or None if Lean should decide."""
        if self.prompt_format == "chat":
            if not extract_proof(completion, "chat").strip():
                return "no lean4 block"
            if not keeps_statement(task, program):
                return "statement changed"
        if _AXIOM_DECLARATION.search(program):
            return "declares an axiom"
        return None

    def prefetch(self, task: LeanTask, completion: str):
        """The future (passed, reason) of one completion: screened at once, else checked (or found in the cache)."""
        from twophase.trainers.infra.streamed_rewards import done_future

        program = program_to_check(task, completion, self.prompt_format)
        reason = self.screen(task, completion, program)
        return self.cache.submit(program) if reason is None else done_future((False, reason))

    def __call__(self, tasks: list[LeanTask], completions: list[str], *, step: int = 0, rows: range | None = None) -> list[float]:
        _check_lengths(tasks, completions)
        futures = [self.prefetch(task, completion) for task, completion in zip(tasks, completions)]
        outcomes = [future.result() for future in futures]
        self.details = [{"passed": passed, "reason": reason} for passed, reason in outcomes]
        return [1.0 if passed else 0.0 for passed, _ in outcomes]

    def close(self) -> None:
        self.cache.close()
        self.checker.close()


def _lean_checker(project_dir, server, pool_size, timeout, command, import_timeout, retries):
    """The local REPL pool or the server's client: either has check_one(program) -> (passed, reason) and version."""
    if server:
        from twophase.trainers.infra.lean_server import LeanServerClient

        return LeanServerClient(str(server), timeout=timeout, request_timeout=timeout + import_timeout,
                                retries=retries)  # fmt: skip
    from twophase.trainers.infra.lean_repl import LeanReplPool

    return LeanReplPool(project_dir, size=pool_size, timeout=timeout, command=command, import_timeout=import_timeout)


# Built-in name → factory taking the options as keyword arguments.
BUILTIN_REWARDS = {
    "lean": LeanReward,
    "random": RandomReward,
    "toy": lambda: toy_reward,
    "zero": lambda: zero_reward,
}


def build_reward(spec: str, options: dict | None = None):
    """The reward callable named by `spec`: a built-in name or "module:function".

    Options a built-in does not take, an unknown name or an unimportable
    "module:function" raise UserError saying what is valid.
    """
    options = dict(options or {})
    if spec in BUILTIN_REWARDS:
        factory = BUILTIN_REWARDS[spec]
        _check_options(spec, factory, options)
        return CheckedReward(spec, factory(**options))
    if ":" in spec:
        return CheckedReward(spec, _import_reward(spec, options))
    names = ", ".join(sorted(BUILTIN_REWARDS))
    raise UserError(f"unknown reward '{spec}'; use one of: {names}, or 'module:function' for your own")


def _check_options(name: str, factory, options: dict) -> None:
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise UserError(f"reward '{name}' does not take option(s) {', '.join(unknown)}; it takes: {takes}")


def _import_reward(spec: str, options: dict):
    module_name, _, attribute = spec.rpartition(":")
    module = _load_reward_module(spec, module_name)
    target = getattr(module, attribute, None)
    if target is None or not callable(target):
        raise UserError(f"reward '{spec}': module '{module_name}' has no callable '{attribute}'")
    reward = target(**options) if inspect.isclass(target) else functools.partial(target, **options) if options else target
    return reward if accepts_keyword(reward, "rows") else _WithoutRows(reward)


class _WithoutRows:
    """A reward of yours written before `rows` existed: called without it."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tasks, completions, *, step: int = 0, rows: range | None = None):
        return self.fn(tasks, completions, step=step)

    def __getattr__(self, name):  # its `details` and `close`, if it has them
        return getattr(self.fn, name)


def _load_reward_module(spec: str, module_name: str):
    """A reward's module: a .py file by its path, or a module importable from PYTHONPATH or the working directory."""
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        return _module_from_file(spec, Path(module_name).expanduser())
    if os.getcwd() not in sys.path and "" not in sys.path:
        # `python -m` puts the working directory on the path and a console script does not; a reward
        # module next to the config should be found either way.
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward '{spec}': cannot import module '{module_name}' ({err}); pass a file path "
                        f"(path/to/reward.py:function) or a module in the working directory or on PYTHONPATH") from None


def _module_from_file(spec: str, path: Path):
    if not path.is_file():
        raise UserError(f"reward '{spec}': no such file '{path}'")
    name = "twophase_reward_" + path.stem
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # the user's code: any error is theirs to see in one line
        del sys.modules[name]
        raise UserError(f"reward '{spec}': importing {path} failed ({type(err).__name__}: {err})") from None
    return module
