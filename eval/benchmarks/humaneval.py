"""HumanEval: does the model's completion of a Python function pass its unit tests?

164 hand-written problems (Chen et al., 2021). The model sees the raw prompt (a
signature and docstring) as plain code completion, not as a chat message. Its
completion is cut where a new top-level statement begins and appended to the
prompt; that program runs in a sandbox (`eval.sandbox`) while the problem's
`check(candidate)` runs in a separate process and calls it through a proxy
(`eval.execution`), so the verdict cannot be forged from inside the program.

Default: one greedy completion per problem and pass@1. With `n_samples` > 1 and
a temperature, it reports the unbiased pass@k of Chen et al. for each k <= n.
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.hub import is_local, load_hub_dataset
from twophase.eval.benchmarks.base import Benchmark, EvalContext
from twophase.eval.sandbox.execution import check_function
from twophase.eval.engine.generation import GenerationRequest
from twophase.eval.sandbox.container import MODES as SANDBOX_MODES
from twophase.eval.sandbox.container import isolation_problem
from twophase.eval.benchmarks.metrics import Metric, mean_metric, pass_at_k, proportion

# A completion ends where the model starts a new top-level statement: the
# function body is over. These strings are handed to the generation engine and
# applied again afterwards, in case an engine stops late.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")

DEFAULTS = {
    "n_samples": 1,
    "temperature": 0.0,
    "top_p": 0.95,
    "ks": (1, 10, 100),
    "max_new_tokens": 512,
    "timeout": 3.0,
    "workers": 4,
    "sandbox": "namespaces",  # or "none": run programs unisolated (eval/README.md, "Executed code")
}
OPT_OUT = "--option humaneval.sandbox=none"


def resolve_options(options: dict) -> dict:
    """DEFAULTS overridden by the user's options; refuses sampling n > 1 completions greedily."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}
    ks = opts["ks"]
    opts["ks"] = (int(ks),) if isinstance(ks, (int, str)) else tuple(int(k) for k in ks)  # "--option humaneval.ks=10"
    if int(opts["n_samples"]) > 1 and float(opts["temperature"]) <= 0.0:
        raise UserError("humaneval: n_samples > 1 at temperature 0 gives n identical completions; set a temperature (e.g. 0.8)")
    if opts["sandbox"] not in SANDBOX_MODES:
        raise UserError(f"humaneval: unknown sandbox '{opts['sandbox']}': choose one of {', '.join(SANDBOX_MODES)}")
    return opts


def require_isolation(sandbox: str) -> None:
    """Refuse to run model-written programs unisolated unless the user chose to (sandbox "none")."""
    problem = isolation_problem() if sandbox == "namespaces" else None
    if problem:
        raise UserError(
            f"humaneval: this machine cannot isolate the programs HumanEval runs ({problem}). Run it where Linux "
            f"namespaces work through util-linux `unshare`, or run the programs unisolated with {OPT_OUT} "
            "(see eval/README.md, 'Executed code')"
        )


def truncate_completion(completion: str) -> str:
    """Cut at the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = len(completion)
    for stop in STOP_SEQUENCES:
        found = completion.find(stop)
        if found != -1:
            cut = min(cut, found)
    return completion[:cut]


def build_program(problem: dict, completion: str) -> str:
    """Prompt + completion: the program the sandbox runs (the tests run elsewhere, in the checker)."""
    return problem["prompt"] + completion + "\n"


def check_completion(problem: dict, completion: str, timeout: float = 3.0, sandbox: str = "namespaces") -> tuple[bool, str]:
    """Run the problem's tests on `completion`; (passed, reason), reason 'passed' or why not."""
    result = check_function(
        build_program(problem, completion), problem["entry_point"], problem["prompt"], problem["test"], timeout, sandbox
    )
    return result.passed, result.reason


def check_completions(
    problems: list[dict], completions: list[str], timeout: float = 3.0, workers: int = 4, sandbox: str = "namespaces"
) -> list[tuple[bool, str]]:
    """`check_completion` for many pairs at once; each check runs in processes of its own, so threads suffice."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pair: check_completion(*pair, timeout=timeout, sandbox=sandbox), zip(problems, completions)))


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _problem(row: dict, where: str) -> dict:
    missing = [field for field in FIELDS if field not in row]
    if missing:
        raise UserError(f"{where}: a HumanEval problem lacks {', '.join(missing)}; expected fields {', '.join(FIELDS)}")
    return {field: row[field] for field in FIELDS}


class HumanEval(Benchmark):
    name = "humaneval"
    option_names = tuple(DEFAULTS)
    default_source = "openai/openai_humaneval"
    split = "test"
    local_file = "humaneval.jsonl"  # or the original HumanEval.jsonl.gz
    description = "HumanEval: pass@k of Python function completions, run against their unit tests"
    own_prompt_format = "raw"  # its own text, never a chat template

    def load(self, source: str | None, limit: int | None) -> list[dict]:
        source = source or self.default_source
        if is_local(source):
            rows = _read_jsonl(Path(source).expanduser())
        else:
            rows = load_hub_dataset(source, "test")
        problems = [_problem(dict(row), source) for row in rows]
        return problems[:limit] if limit is not None else problems

    def check_ready(self, options: dict) -> None:
        require_isolation(resolve_options(options)["sandbox"])

    def settings(self, options: dict) -> dict:
        resolved = resolve_options(options)
        del resolved["workers"]  # how many checks run at once changes no result
        return resolved

    def evaluate(self, items: list[dict], ctx: EvalContext) -> dict[str, Metric]:
        opts = resolve_options(ctx.options)
        require_isolation(opts["sandbox"])  # before generating: the runner checks too, callers may not
        n = int(opts["n_samples"])
        samples = ctx.generator.generate([self._request(p, opts) for p in items], desc="humaneval")
        flat_problems = [p for p, completions in zip(items, samples) for _ in completions]
        flat_completions = [truncate_completion(c) for completions in samples for c in completions]
        verdicts = check_completions(
            flat_problems, flat_completions, float(opts["timeout"]), int(opts["workers"]), opts["sandbox"]
        )
        passed_counts = self._audit(items, samples, flat_completions, verdicts, ctx)
        return self._metrics(passed_counts, n, opts["ks"])

    @staticmethod
    def _request(problem: dict, opts: dict) -> GenerationRequest:
        return GenerationRequest(
            prompt=problem["prompt"],
            max_new_tokens=int(opts["max_new_tokens"]),
            stop=STOP_SEQUENCES,
            temperature=float(opts["temperature"]),
            top_p=float(opts["top_p"]) if float(opts["temperature"]) > 0 else 1.0,
            n=int(opts["n_samples"]),
        )

    @staticmethod
    def _audit(items, samples, flat_completions, verdicts, ctx) -> list[int]:
        """One audit record per problem; returns how many samples passed for each."""
        passed_counts, start = [], 0
        for problem, completions in zip(items, samples):
            mine = range(start, start + len(completions))
            start += len(completions)
            passed_counts.append(sum(verdicts[i][0] for i in mine))
            ctx.audit({
                "id": problem["task_id"],
                "completions": [flat_completions[i] for i in mine],
                "verdicts": [verdicts[i][1] for i in mine],
                "n": len(completions),
                "passed": passed_counts[-1],
            })
        return passed_counts

    @staticmethod
    def _metrics(passed_counts: list[int], n: int, ks) -> dict[str, Metric]:
        if n == 1:  # greedy: pass@1 is a plain proportion of problems solved
            return {"pass@1": proportion(sum(passed_counts), len(passed_counts))}
        return {
            f"pass@{k}": mean_metric([pass_at_k(n, c, k) for c in passed_counts], bounds=(0.0, 1.0))
            for k in sorted({1, *ks})
            if k <= n
        }
