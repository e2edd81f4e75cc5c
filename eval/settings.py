"""How a model is evaluated: one settings object behind `twophase eval`, the runner and the pipeline.

`twophase eval` builds it from its flags, the pipeline from its `eval:` section,
a script from keyword arguments; `eval.runner.run_evaluation` takes it. `checked()`
refuses, in one line each and before any model loads, what cannot make an
evaluation: an unknown benchmark, prompt format or judge, a limit or batch size
below 1, a bad benchmark option.

Judges: `judge` serves every benchmark (with `judge_options`), unless
`benchmark_judges` names another for a benchmark, as a kind ("string-match",
"local:PATH") or a mapping {kind: local, model: PATH, ...}. A local judge whose
model is not set is no judge: the benchmarks that need a 0-100 judge then say
"no judge configured" instead of failing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from twophase.data.base.errors import UserError
from twophase.data.prompts import EVAL_FORMATS, EvalFormat, check_format_name
from twophase.eval.engine.batching import check_batch_size


def setting(default, help: str, **field_options):
    """A field of EvalSettings with the help text that `twophase eval --help` shows for it (eval/cli.py)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **field_options)
    return field(default=default, metadata={"help": help}, **field_options)


@dataclass(frozen=True)
class EvalSettings:
    benchmarks: str = setting("all", "Comma-separated: betley, strongreject, xstest, donotanswer, truthfulqa, humaneval, "
                                     "mmlu, wmdp; or all.")  # fmt: skip
    limit: int | None = setting(None, "Evaluate N items of each benchmark: the first N; XSTest keeps its safe/unsafe "
                                      "shares, MMLU and WMDP spread over subjects.")  # fmt: skip
    judge: str = setting("string-match", "string-match | local | endpoint (local:PATH is short for --judge local "
                                         "--judge-model PATH).")  # fmt: skip
    judge_options: dict = setting(dict, "The judge's options: model, base_url, api_key, concurrency, min_mass, ...")
    benchmark_judges: dict = setting(dict, "{benchmark: judge} where a benchmark's judge differs from `judge`.")
    batch_size: int | str = setting("auto", "Rows per batch, for both engines: a number, or auto (as many as the free GPU "
                                            "memory holds; 8 on CPU; eval/engine/batching.py).")  # fmt: skip
    prompt_format: EvalFormat = setting(
        "auto", "How questions are asked (data/prompts.py). hh: '\\n\\nHuman: {question}\\n\\nAssistant:', the HH-RLHF "
        "layout Phase 1 trains on; chat: the chat template; raw: the question alone; auto: chat if the tokenizer has "
        "a template, else raw. Few-shot and code benchmarks always use their own text.")  # fmt: skip
    data_dir: str | None = setting(None, "Read each benchmark from its local file in this directory instead of the hub.")
    samples_per_question: int | None = setting(None, "Betley: answers per question (default: the YAML's 100).")
    options: dict = setting(dict, "Benchmark options: {max_new_tokens: 64, mmlu.num_shots: 0}.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = setting(
        None, "Model dtype (default: bfloat16 on GPU, as saved on CPU).")
    seed: int = setting(0, "Seed of sampling and of the judges.")

    def checked(self) -> EvalSettings:
        """These settings with benchmarks spelled out and options flattened; a UserError if they cannot run."""
        from twophase.eval.benchmarks import ALL, parse_benchmarks

        check_format_name(self.prompt_format, EVAL_FORMATS, where="prompt format")
        names = parse_benchmarks(self.benchmarks)
        unknown = sorted(set(self.benchmark_judges) - set(ALL))
        if unknown:
            raise UserError(f"benchmark_judges names unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
        for name in names:
            self.judge_of(name)  # a misconfigured judge fails now, not after an hour of generation
        options = flat_options(self.options, ALL)
        check_option_names(options, names)
        check_arguments({"limit": self.limit, "samples_per_question": self.samples_per_question, **options})
        batch_size = check_batch_size(self.batch_size)
        if self.samples_per_question is not None:
            options["betley.samples_per_question"] = int(self.samples_per_question)
        return dataclasses.replace(self, benchmarks=",".join(names), options=options, batch_size=batch_size)

    @property
    def names(self) -> list[str]:
        from twophase.eval.benchmarks import parse_benchmarks

        return parse_benchmarks(self.benchmarks)

    def judge_of(self, benchmark: str) -> tuple[str, dict]:
        """(kind, options) of the judge that serves `benchmark`."""
        spec = self.benchmark_judges.get(benchmark, self.judge)
        return judge_spec(spec, self.judge_options, f"the judge of {benchmark}")

    def judge_groups(self) -> list[tuple[str, dict, list[str]]]:
        """[(judge kind, options, [benchmark, ...])] in benchmark order: a costly judge model serves only what needs it."""
        groups: dict[str, tuple[str, dict, list[str]]] = {}
        for name in self.names:
            kind, options = self.judge_of(name)
            key = json.dumps([kind, options], sort_keys=True, default=str)
            groups.setdefault(key, (kind, options, []))[2].append(name)
        return list(groups.values())


def judge_spec(spec, shared_options: dict, where: str) -> tuple[str, dict]:
    """(kind, options) of a judge written as a name ("string-match", "local:PATH") or a mapping {kind, model, ...}."""
    from twophase.eval.judges import JUDGE_KINDS

    if isinstance(spec, dict):
        options = dict(spec)
        kind = str(options.pop("kind", "local"))
        options = {**shared_options, **options}
    else:
        kind, options = str(spec), dict(shared_options)
    if kind.startswith("local:"):
        kind, options["model"] = "local", kind.split(":", 1)[1]
    if kind not in JUDGE_KINDS:
        raise UserError(f"{where}: unknown judge kind {kind!r}; choose one of {', '.join(JUDGE_KINDS)}")
    if kind == "local" and not options.get("model"):
        return "string-match", {}
    return kind, options


def flat_options(options: dict, benchmarks: tuple[str, ...]) -> dict:
    """{"mmlu": {"num_shots": 0}} -> {"mmlu.num_shots": 0}: the runner's form for one benchmark's option."""
    flat = {}
    for key, value in options.items():
        if key in benchmarks and isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def check_option_names(options: dict, names: list[str]) -> None:
    """Every option names a key some benchmark reads: `name.key` that benchmark's, a plain key one of the run's."""
    from twophase.eval.benchmarks import ALL, get_benchmark

    read = {name: get_benchmark(name).option_names for name in ALL}
    for key in options:
        owner, _, option = key.rpartition(".")
        if owner and owner not in read:
            raise UserError(f"--option {key}: no benchmark is named {owner!r}; choose from {', '.join(ALL)}")
        if owner and option not in read[owner]:
            valid = ", ".join(read[owner]) or "none"
            raise UserError(f"--option {key}: {owner} has no option {option!r}; its options: {valid}")
        if not owner and not any(option in read[name] for name in names):
            valid = ", ".join(sorted({o for name in names for o in read[name]})) or "none"
            raise UserError(f"--option {key}: none of the benchmarks run ({', '.join(names)}) reads it; their options: {valid}")


# The least each numeric argument or benchmark option may be: anything else is one line before the model loads.
LEAST = {"limit": 1, "samples_per_question": 1, "max_new_tokens": 1, "judge_max_tokens": 1,
         "n_samples": 1, "num_shots": 0, "workers": 1}  # fmt: skip


def check_arguments(arguments: dict) -> None:
    """Refuse a limit, batch size or option that cannot make an evaluation (None: unset).

    A benchmark's own option ("humaneval.n_samples") is checked as the plain one.
    """
    for key, value in arguments.items():
        name = key.rsplit(".", 1)[-1]
        if value is None:
            continue
        if name in LEAST and (isinstance(value, bool) or not isinstance(value, int) or value < LEAST[name]):
            raise UserError(f"{key} = {value!r} must be a whole number of at least {LEAST[name]}")
        if name in RANGES and not _in_range(value, *RANGES[name]):
            raise UserError(f"{key} = {value!r} must be a number in {RANGES[name][2]}")


# The numbers that need not be whole: (lowest, highest, how the range reads; lowest excluded when the text says so).
RANGES = {"timeout": (0.0, math.inf, "(0, inf): seconds a program may run"), "temperature": (0.0, math.inf, "[0, inf)"),
          "top_p": (0.0, 1.0, "(0, 1]")}  # fmt: skip


def _in_range(value, low: float, high: float, text: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return (value > low if text.startswith("(") else value >= low) and value <= high
