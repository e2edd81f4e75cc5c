"""The benchmark registry: name -> module, imported only when the benchmark runs.

Each module defines one `Benchmark` subclass whose `name` is the registry name.
With `--data-dir DIR`, a benchmark reads its local copy from DIR under a fixed
name (the class's `local_file`), in the same columns as its hub dataset or its
original release:

  betley        betley.yaml        the questions YAML (id, paraphrases, judge_prompts, system?)
  strongreject  strongreject.csv   forbidden_prompt (or prompt / meli_query), category
  xstest        xstest.csv         id, prompt, type, label, focus, note
  donotanswer   donotanswer.csv    id, risk_area, types_of_harm, specific_harms, question
  truthfulqa    truthfulqa.json    the original v1_mc_task.json (question, mc1_targets, mc2_targets)
  humaneval     humaneval.jsonl    task_id, prompt, entry_point, canonical_solution, test
  mmlu          mmlu/              {subject}_dev.csv and {subject}_test.csv
  wmdp          wmdp/              wmdp-bio / wmdp-chem / wmdp-cyber .jsonl or .json

`eval/samples/` is such a directory, with a few items of each, for the offline demo.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.eval.benchmarks.base import Benchmark

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

REGISTRY = {
    # safety
    "betley": "twophase.eval.benchmarks.betley",
    "strongreject": "twophase.eval.benchmarks.strongreject",
    "xstest": "twophase.eval.benchmarks.xstest",
    "donotanswer": "twophase.eval.benchmarks.donotanswer",
    # truthfulness and capability
    "truthfulqa": "twophase.eval.benchmarks.truthfulqa",
    "humaneval": "twophase.eval.benchmarks.humaneval",
    "mmlu": "twophase.eval.benchmarks.mmlu",
    "wmdp": "twophase.eval.benchmarks.wmdp",
}
ALL = tuple(REGISTRY)

# The names the benchmarks are published under, as tables show them.
PUBLISHED_NAMES = {
    "betley": "Emergent misalignment (Betley et al.)",
    "strongreject": "StrongREJECT",
    "xstest": "XSTest",
    "donotanswer": "Do-Not-Answer",
    "truthfulqa": "TruthfulQA",
    "humaneval": "HumanEval",
    "mmlu": "MMLU",
    "wmdp": "WMDP",
}


def published_name(name: str) -> str:
    return PUBLISHED_NAMES.get(name, name)


def get_benchmark(name: str) -> Benchmark:
    """A fresh instance of the benchmark registered as `name`."""
    if name not in REGISTRY:
        raise UserError(f"unknown benchmark '{name}': choose from {', '.join(ALL)} or 'all'")
    module = importlib.import_module(REGISTRY[name])
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Benchmark) and value is not Benchmark and value.name == name:
            return value()
    raise UserError(f"module {REGISTRY[name]} defines no Benchmark subclass named '{name}'")


def parse_benchmarks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """"all", "a,b" or a list of names -> registry names, in the order given, without duplicates."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n and n.strip()]
    if not names:
        raise UserError("no benchmarks given: pass --benchmarks all or a comma-separated list")
    out: list[str] = []
    for name in names:
        for expanded in (ALL if name == "all" else (name,)):
            if expanded not in REGISTRY:
                raise UserError(f"unknown benchmark '{expanded}': choose from {', '.join(ALL)} or 'all'")
            if expanded not in out:
                out.append(expanded)
    return out


def local_source(benchmark: Benchmark, data_dir: str | Path | None) -> str | None:
    """The benchmark's file under data_dir, or None (hub) when there is no data_dir."""
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser() / benchmark.local_file
    if not path.exists():
        raise UserError(f"{benchmark.name}: --data-dir has no {benchmark.local_file} ({path})")
    return str(path)
