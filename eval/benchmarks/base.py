"""What a benchmark is, and the helpers benchmarks share.

A benchmark is a small declarative unit: where its data lives (`default_source`
on the hub, `local_file` under --data-dir), how to read one row
(`load`), and how to turn model outputs into metrics (`evaluate`). It never
touches the model: it sends requests to the engines in `EvalContext`, asks the
judge, and writes one audit record per item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twophase.data.base.errors import UserError
from twophase.data.base.rows import read_local_file, read_rows  # noqa: F401 (the benchmarks' row reader)
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine
from twophase.eval.engine.generation import GenerationEngine, GenerationRequest
from twophase.eval.judges import Judge
from twophase.eval.benchmarks.metrics import Metric, proportion


@dataclass
class EvalContext:
    generator: GenerationEngine
    scorer: LoglikelihoodEngine
    judge: Judge
    format_prompt: Callable[[str, str | None], str]  # (user message, system prompt) -> model input text
    audit: Callable[[dict], None]  # append one record to the benchmark's audit JSONL
    limit: int | None
    seed: int
    options: dict  # benchmark-specific settings, e.g. {"samples_per_question": 100}
    details: dict = field(default_factory=dict)  # extra report a benchmark wants in its result JSON


class Benchmark:
    """One benchmark; subclasses set the class attributes and implement load/evaluate."""

    name: str = ""
    default_source: str = ""  # hub id (or URL)
    split: str = "train"  # hub split
    local_file: str = ""  # file name under --data-dir
    option_names: tuple[str, ...] = ()  # the --option keys it reads (anything else given to it is an error)
    description: str = ""
    # The prompt format of a benchmark that writes its own prompts (few-shot text, code to
    # complete); None for the benchmarks that ask questions in the run's --prompt-format.
    own_prompt_format: str | None = None
    needs_scoring_judge = False  # without a 0-100 judge the benchmark is skipped as "no judge configured"
    metric_names: tuple[str, ...] = ()  # the metrics it reports: a skipped run still gets its rows in tables
    metric_labels: dict[str, str] = {}  # what a table should say beside a metric's name

    def load(self, source: str | None, limit: int | None) -> list[dict]:
        raise NotImplementedError

    def evaluate(self, items: list[dict], ctx: EvalContext) -> dict[str, Metric]:
        raise NotImplementedError

    def check_ready(self, options: dict) -> None:
        """Raise UserError if this machine cannot run the benchmark; called before the model loads."""

    def settings(self, options: dict) -> dict:
        """The options that change this benchmark's results; they go into the settings hash.

        By default every option given counts. A benchmark narrows this to the
        options it reads (so an unrelated global option does not force a rerun)
        and leaves out those that change no result (e.g. parallel workers).
        """
        return dict(options)


# --------------------------------------------------------------------------- loading


def split_files(root: Path, split: str) -> list[Path]:
    """A split's files in one folder of a hub dataset's copy: `{split}.jsonl|json|parquet` or `{split}-*.parquet`."""
    names = [f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet"]
    return sorted(path for name in names for path in root.glob(name))


def read_split_rows(root: Path, split: str, config: str = "all") -> list[dict]:
    """Every row of `split` in a local copy of a hub dataset: in root, else in root/config.

    A snapshot of a hub repository keeps one folder per config (cais/mmlu has
    all/ and one per subject; truthful_qa has multiple_choice/ and generation/).
    """
    files = split_files(root, split) or split_files(root / config, split)
    return [row for path in files for row in read_local_file(path)]


def column(row: dict, names: tuple[str, ...], what: str, source: str) -> str:
    """The first of `names` present in the row: schemas differ between hub and original files."""
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise UserError(f"{source}: no {what} column; expected one of {', '.join(names)} (found {', '.join(row)})")


def first(items: list, limit: int | None) -> list:
    return items if limit is None else items[: max(0, limit)]


def stratified_first(items: list[dict], key: str, limit: int | None) -> list[dict]:
    """The first `limit` items, keeping each group's share (so a small limit still sees every group).

    Files sorted by group (XSTest lists all safe prompts first) would otherwise
    give a limit of 10 only one group.
    """
    if limit is None or limit >= len(items):
        return items
    groups: dict = {}
    for item in items:
        groups.setdefault(item[key], []).append(item)
    quotas = {g: int(limit * len(rows) / len(items)) for g, rows in groups.items()}
    for g in sorted(groups, key=lambda g: -len(groups[g])):  # hand out what rounding left over
        if sum(quotas.values()) >= limit:
            break
        quotas[g] += 1
    chosen = {id(row) for g, rows in groups.items() for row in rows[: quotas[g]]}
    return [item for item in items if id(item) in chosen]


# --------------------------------------------------------------------------- evaluating


DEFAULT_MAX_NEW_TOKENS = 256


def generate_answers(items: list[dict], ctx: EvalContext, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """One greedy answer per item's `prompt` (with its optional `system`)."""
    max_new = int(ctx.options.get("max_new_tokens") or default_max_new_tokens)
    inputs = [ctx.format_prompt(item["prompt"], item.get("system")) for item in items]
    requests = [GenerationRequest(text, max_new_tokens=max_new) for text in inputs]
    return [texts[0] for texts in ctx.generator.generate(requests)]


def refusal_metrics(refused: list[bool]) -> dict[str, Metric]:
    """Refusal rate and attack success rate (ASR = 1 - refusal rate)."""
    k, n = sum(refused), len(refused)
    return {"refusal_rate": proportion(k, n), "asr": proportion(n - k, n)}


class JudgeCallCounter:
    """Tells "the judge is down" (every call failed) from "some answers were unscorable".

    with JudgeCallCounter(judge): ... raises UserError when every call made
    inside the block failed, so the benchmark is reported failed with the
    judge's last error instead of showing metrics computed from nothing.
    """

    def __init__(self, judge: Judge):
        self.judge = judge

    def __enter__(self):
        self.calls, self.failures = self.judge.calls, self.judge.failures
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        calls = self.judge.calls - self.calls
        failures = self.judge.failures - self.failures
        if calls and failures >= calls:
            raise UserError(f"the {self.judge.name} judge failed on all {calls} calls: {self.judge.last_error}")
        return False
