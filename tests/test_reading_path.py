"""The reading path (README: "The reading path"), stated and kept.

For one DPO step, one GRPO step, one XSTest score and one MMLU score the README
lists the functions a reader reads, in order (file:function). This test

* counts the lines of exactly those functions (with `ast`, docstrings and
  decorators included) and fails when a path exceeds its budget or names a
  function that no longer exists;
* traces one tiny-model run of each with `sys.settrace` and requires that every
  twophase function it executes outside the infrastructure rooms is on the list,
  and that every listed function ran.

`python tests/test_reading_path.py` prints the measured paths.
"""

from __future__ import annotations

import ast
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Rooms whose code a reader of the algorithm may skip: the foundation, the run's machinery, the sandbox,
# the benchmarks of speed, the KV cache / CUDA graphs under the generation loop, and the memory arithmetic that
# sizes the engines' batches.
INFRASTRUCTURE = ("data/base/", "trainers/infra/", "eval/sandbox/", "launch/bench/", "eval/engine/decoder.py",
                  "eval/engine/batching.py")
PATHS = {"One DPO step": "dpo", "One GRPO step": "grpo", "One XSTest score": "xstest", "One MMLU score": "mmlu"}
BUDGETS = {"dpo": (450, 8), "grpo": (650, 9), "xstest": (300, None), "mmlu": (400, None)}  # (lines, files)
SAMPLES = ROOT / "data" / "samples"
EVAL_SAMPLES = ROOT / "eval" / "samples"


def readme_paths() -> dict[str, list[str]]:
    """path -> its "file.py:function" entries, from the README's "### <path>" lists, in order."""
    paths: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            current = PATHS.get(line.lstrip("#").strip())
            if current:
                paths[current] = []
        elif current and re.match(r"\s*\d+\.\s", line):
            paths[current] += re.findall(r"`([\w/]+\.py):([\w.]+)`", line) and [
                f"{f}:{q}" for f, q in re.findall(r"`([\w/]+\.py):([\w.]+)`", line)
            ]
    return paths


def definition(entry: str) -> ast.AST:
    """The def (or class) node that `entry` names; KeyError when it no longer exists."""
    file, qualname = entry.split(":")
    node: ast.AST = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    for name in qualname.split("."):
        found = [n for n in ast.iter_child_nodes(node)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name]  # fmt: skip
        if not found:
            raise KeyError(f"{entry}: no {name} in {file}")
        node = found[0]
    return node


def lines_of(entry: str) -> int:
    node = definition(entry)
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return node.end_lineno - first + 1


def measured(entries: list[str]) -> tuple[int, int]:
    return sum(lines_of(e) for e in entries), len({e.split(":")[0] for e in entries})


def is_infrastructure(file: str) -> bool:
    return file.startswith(INFRASTRUCTURE)


def traced(run) -> list[str]:
    """"file:qualname" of every twophase function `run()` executes outside the infrastructure, in first-call order.

    Code inside a function (nested functions, lambdas, comprehensions) counts as that function.
    """
    seen: dict[str, None] = {}
    folders = tuple(str(ROOT / folder) + "/" for folder in ("data", "eval", "trainers", "losses", "launch"))

    def on_call(frame, event, arg):
        path = frame.f_code.co_filename
        if path.startswith(folders):
            file = Path(path).relative_to(ROOT).as_posix()
            qualname = frame.f_code.co_qualname.split(".<locals>")[0]
            if not is_infrastructure(file) and qualname != "<module>":
                seen.setdefault(f"{file}:{qualname}")
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(previous)
    return list(seen)


def covered(entry: str, listed: set[str]) -> bool:
    """A method counts as listed when its class is listed whole."""
    file, qualname = entry.split(":")
    parts = qualname.split(".")
    return any(f"{file}:{'.'.join(parts[:n])}" in listed for n in range(1, len(parts) + 1))


# --------------------------------------------------------------------------- the four runs


def one_dpo_step(model_dir: Path, out: Path):
    """The README's DPO step: the default layout (packed_shared_prompt), LoRA, 8-bit AdamW."""
    from twophase.trainers.config import DPOConfig, make_config
    from twophase.trainers.dpo import DPORecipe
    from twophase.trainers.loop import train

    config = make_config(DPOConfig, dict(
        model=str(model_dir), dataset=str(SAMPLES / "hh_demo.jsonl"), out_dir=str(out), max_steps=1, micro_batch_size=2,
        grad_accum_steps=2, max_length=128, max_prompt_length=64, precision="fp32", device="cpu", save_every=0, log_every=0,
    ))  # fmt: skip
    recipe = DPORecipe(config, out)
    return lambda: train(recipe, config, out, final_checkpoint=False)


def one_grpo_step(model_dir: Path, out: Path):
    """The README's GRPO step: eager decoder, a built-in reward (toy), μ = 1, β = 0."""
    from twophase.trainers.config import GRPOConfig, make_config
    from twophase.trainers.grpo import GRPORecipe
    from twophase.trainers.loop import train

    config = make_config(GRPOConfig, dict(
        model=str(model_dir), dataset=str(SAMPLES / "lean_demo.jsonl"), out_dir=str(out), max_steps=1, prompts_per_step=2,
        num_generations=4, max_new_tokens=8, micro_batch_size=4, reward="toy", precision="fp32", device="cpu",
        save_every=0, log_every=0, optimizer="adamw", lora=False, generation_cuda_graphs=False,
    ))  # fmt: skip
    recipe = GRPORecipe(config, out)
    callbacks = recipe.run_callbacks()
    return lambda: train(recipe, config, out, final_checkpoint=False, callbacks=callbacks)


def one_score(name: str, source: Path, model_dir: Path):
    """Score a benchmark's bundled items (loaded beforehand), as `twophase eval` does for each benchmark."""
    from twophase.data.base.hub import load_causal_lm, load_tokenizer
    from twophase.data.prompts import format_question
    from twophase.eval.benchmarks import get_benchmark
    from twophase.eval.benchmarks.base import EvalContext
    from twophase.eval.engine.generation import GenerationEngine
    from twophase.eval.engine.loglikelihood import LoglikelihoodEngine
    from twophase.eval.judges import make_judge

    model, tokenizer = load_causal_lm(str(model_dir), dtype=torch.float32), load_tokenizer(str(model_dir))
    benchmark = get_benchmark(name)
    ctx = EvalContext(
        generator=GenerationEngine(model, tokenizer, batch_size=8), scorer=LoglikelihoodEngine(model, tokenizer, batch_size=8),
        judge=make_judge("string-match"), format_prompt=lambda user, system=None: format_question(tokenizer, user, system, "hh"),
        audit=lambda record: None, limit=None, seed=0, options={"max_new_tokens": 8},
    )  # fmt: skip
    items = benchmark.load(str(source), None)
    return lambda: benchmark.evaluate(items, ctx)


def runs(model_dir: Path, out: Path) -> dict:
    return {
        "dpo": lambda: one_dpo_step(model_dir, out / "dpo"),
        "grpo": lambda: one_grpo_step(model_dir, out / "grpo"),
        "xstest": lambda: one_score("xstest", EVAL_SAMPLES / "xstest.csv", model_dir),
        "mmlu": lambda: one_score("mmlu", EVAL_SAMPLES / "mmlu", model_dir),
    }


# --------------------------------------------------------------------------- the tests


def test_every_path_is_listed_and_within_its_budget():
    paths = readme_paths()
    assert set(paths) == set(BUDGETS), f"README lists {sorted(paths)}; expected {sorted(BUDGETS)}"
    for name, entries in paths.items():
        lines, files = measured(entries)  # a function that no longer exists raises KeyError here
        max_lines, max_files = BUDGETS[name]
        assert lines <= max_lines, f"{name}: {lines} lines > {max_lines}"
        assert max_files is None or files <= max_files, f"{name}: {files} files > {max_files}"
        assert not any(is_infrastructure(e) for e in entries), f"{name} lists infrastructure"


@pytest.mark.parametrize("name", list(BUDGETS))
def test_the_listed_path_is_the_path_a_run_takes(name, tiny_model_dir, tmp_path):
    listed = readme_paths()[name]
    run = runs(Path(tiny_model_dir), tmp_path)[name]()
    executed = traced(run)
    missing = [e for e in executed if not covered(e, set(listed))]
    assert not missing, f"{name}: these functions run but the README's path leaves them out: {missing}"
    never = [e for e in listed if not any(covered(x, {e}) for x in executed)]
    assert not never, f"{name}: the README lists functions that never ran: {never}"


if __name__ == "__main__":  # print the measured paths (and the traced ones, to write the README's lists)
    from twophase.data.base.tiny import write_tiny_model

    torch.set_num_threads(1)
    listed = readme_paths() if (ROOT / "README.md").exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "model")
        for name, make in runs(model_dir, Path(tmp)).items():
            executed = traced(make())
            lines, files = measured(listed.get(name) or executed)
            print(f"\n{name}: {lines} lines in {files} files (budget {BUDGETS[name]})")
            for entry in listed.get(name) or executed:
                print(f"  {lines_of(entry):4d}  `{entry}`")
            if "--traced" in sys.argv:
                print("  traced:", *executed, sep="\n    ")
