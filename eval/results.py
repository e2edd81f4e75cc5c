"""Where evaluation results go, how a rerun knows what is done, and the comparison table.

Output layout of one `twophase eval --out DIR` run:

  DIR/summary.json        every benchmark's status (ok / failed), headline metrics, file names
  DIR/<name>.json         one benchmark's result: metrics with k/n and 95% CI, model id,
                          prompt hash, settings and their hash, details; or status "failed"
                          with the reason
  DIR/<name>.jsonl        the audit log: one record per generation / judgment / scored item

Resume: a benchmark is skipped when DIR/<name>.json says status "ok", has
the same settings hash (model, data source and its content, limit, judge,
prompt format, seed, and the options that change the benchmark's results, as
its `settings()` says) and DIR/<name>.jsonl is the audit file it wrote (its
sha256 is in the result). Both files are written under temporary names and
renamed, the audit first and the result last, so a stop at any moment leaves
the earlier pair intact, or a result that no longer matches its audit and is
run again: never half a result, or a result beside another run's audit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from twophase.data.base import distributed
from twophase.data.base.files import atomic_write_text
from twophase.eval.benchmarks.metrics import Metric

SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------- files


def result_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def audit_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.jsonl"


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON through a temporary file and os.replace: readers see the old file or the new one.

    Under torchrun every rank computes the same results (data/base/distributed.py); rank 0 alone writes them.
    """
    if not distributed.is_main():
        return
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict | None:
    """The JSON object at path, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _jsonable(value):
    """NaN and infinities become null; Metrics become dicts; anything else unknown becomes a string."""
    if isinstance(value, Metric):
        return value.to_dict()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


class AuditLog:
    """The JSONL audit file of one benchmark, written under a temporary name until `commit()`.

    The earlier audit file stays in place, with the result that describes it,
    until the new run has finished: an interrupted run changes neither. The
    runner commits the audit (a rename) and only then writes the result, which
    records the audit's sha256, so a result is only trusted with its own audit.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        # Under torchrun rank 0 writes the file; the other ranks count and hash the same records, and write nothing.
        self._file = open(self.temporary if distributed.is_main() else os.devnull, "wb")
        self._digest = hashlib.sha256()
        self.records = 0

    def write(self, record: dict) -> None:
        line = (json.dumps(_jsonable(record), ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._digest.update(line)
        self.records += 1

    def commit(self) -> str:
        """Put the audit file in place; returns its sha256 (as 'sha256:<hex>') for the result."""
        self._file.flush()
        if distributed.is_main():
            os.fsync(self._file.fileno())
        self._file.close()
        if distributed.is_main():
            os.replace(self.temporary, self.path)
        return "sha256:" + self._digest.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._file.closed:  # not committed: the run stopped or failed
            self._file.close()
            if distributed.is_main():
                self.temporary.unlink(missing_ok=True)
        return False


def file_sha256(path: str | Path) -> str | None:
    """'sha256:<hex>' of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- hashes and resume


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of obj (sorted keys), as 'sha256:<hex>'."""
    text = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_digest(source: str | None) -> str | None:
    """sha256 of a local data file, or of every file under a local directory; None for hub ids and URLs."""
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode("utf-8") + b"\x00")
        digest.update(file.read_bytes())
    return "sha256:" + digest.hexdigest()


def finished_result(out_dir: str | Path, name: str, settings_hash: str) -> dict | None:
    """The earlier result of `name` if it finished with these exact settings and its audit file is the one
    it wrote (same sha256), else None."""
    result = read_json(result_path(out_dir, name))
    if not result or result.get("status") != "ok" or result.get("settings_hash") != settings_hash:
        return None
    if result.get("audit_sha256") != file_sha256(audit_path(out_dir, name)):
        return None
    return result


# --------------------------------------------------------------------------- comparison table


def run_label(run_dir: str | Path) -> str:
    """A run's column name: the run name it was given, else its directory name."""
    summary = read_json(Path(run_dir) / SUMMARY_FILE) or {}
    return str(summary.get("run_name") or Path(run_dir).resolve().name)


def load_run(run_dir: str | Path) -> dict[str, dict]:
    """{benchmark: result} of every result JSON in a run directory."""
    results = {}
    for path in sorted(Path(run_dir).glob("*.json")):
        if path.name == SUMMARY_FILE:
            continue
        data = read_json(path)
        if data and "benchmark" in data and "status" in data:
            results[data["benchmark"]] = data
    return results


def _metric(result: dict | None, name: str) -> Metric | None:
    if not result or result.get("status") != "ok" or name not in result.get("metrics", {}):
        return None
    return Metric.from_dict(result["metrics"][name])


def intervals_disjoint(a: Metric, b: Metric) -> bool:
    """True when both 95% intervals exist and do not overlap."""
    bounds = (a.ci_low, a.ci_high, b.ci_low, b.ci_high)
    if any(math.isnan(x) for x in bounds):
        return False
    return a.ci_high < b.ci_low or b.ci_high < a.ci_low


def _number_format(metrics: list[Metric | None]) -> str:
    # Proportions read best with three decimals; 0-100 judge scores with one.
    biggest = max((abs(x) for m in metrics if m for x in (m.value, m.ci_low, m.ci_high) if not math.isnan(x)), default=0)
    return ".1f" if biggest > 1.5 else ".3f"


def _cell(metric: Metric | None, result: dict | None, fmt: str) -> str:
    if metric is None:
        return _missing_cell(result)
    if math.isnan(metric.value):
        return "n/a (n=0)" if metric.n == 0 else "n/a"
    if math.isnan(metric.ci_low):
        return format(metric.value, fmt)
    return f"{metric.value:{fmt}} [{metric.ci_low:{fmt}}, {metric.ci_high:{fmt}}]"


def _missing_cell(result: dict | None) -> str:
    """What a table says where a run has no value: failed, skipped with its reason, or not run."""
    status = (result or {}).get("status")
    if status == "failed":
        return "failed"
    if status == "skipped":
        return str(result.get("reason") or "skipped")
    return "—"


def prompt_format_of(run: dict[str, dict]) -> str | None:
    """The prompt format a run asked its questions in (benchmarks with their own text left out), or None."""
    from twophase.eval.benchmarks import REGISTRY, get_benchmark

    asked = [r for name, r in run.items() if name in REGISTRY and get_benchmark(name).own_prompt_format is None]
    formats = {r.get("prompt_format") for r in asked}
    formats.discard(None)
    return ", ".join(sorted(formats)) or None


def metric_label(metric: str, results: list[dict | None]) -> str:
    """The metric's name as a table shows it: with what its benchmark says about it, if anything."""
    for result in results:
        label = ((result or {}).get("metric_labels") or {}).get(metric)
        if label:
            return label
    return metric


def column_label(label: str, run: dict[str, dict]) -> str:
    fmt = prompt_format_of(run)
    return f"{label} (prompts: {fmt})" if fmt else label


def _delta(base: Metric | None, other: Metric | None, fmt: str) -> str:
    if base is None or other is None or math.isnan(base.value) or math.isnan(other.value):
        return "—"
    text = f"{other.value - base.value:+{fmt}}"
    if text.startswith("-") and float(text) == 0:  # a difference that rounds to zero has no sign
        text = "+" + text[1:]
    return f"**{text}**" if intervals_disjoint(base, other) else text


def comparison_rows(base: dict[str, dict], others: list[dict[str, dict]], order: tuple[str, ...] = ()) -> list[tuple]:
    """(benchmark, metric, base Metric|None, [other Metric|None], base result, [other results]) per row."""
    names = [n for n in order if any(n in run for run in [base, *others])]
    names += sorted(n for run in [base, *others] for n in run if n not in names)
    rows, seen = [], set()
    for bench in names:
        if bench in seen:
            continue
        seen.add(bench)
        results = [base.get(bench)] + [run.get(bench) for run in others]
        metric_names: list[str] = []
        for result in results:
            for m in list((result or {}).get("metrics", {})) + list((result or {}).get("metric_names", [])):
                if m not in metric_names:
                    metric_names.append(m)
        if not metric_names:
            rows.append((bench, "", None, [None] * len(others), results[0], results[1:]))
        for m in metric_names:
            rows.append((bench, m, _metric(results[0], m), [_metric(r, m) for r in results[1:]], results[0], results[1:]))
    return rows


def settings_differences(run_dirs: list[str | Path]) -> list[str]:
    """Where runs were evaluated differently: one "benchmark: key a vs b" per benchmark whose settings
    (all but the model: items, source, limit, judge, prompt format, seed, options) differ from the first run's.

    Each result records its settings; two runs compare only when these agree, or the table would
    set a difference of items or judges beside a difference of models.
    """
    runs = [load_run(d) for d in run_dirs]
    differences = []
    for bench, base in runs[0].items():
        for other in runs[1:]:
            a, b = _comparable_settings(base), _comparable_settings(other.get(bench))
            if a is None or b is None or stable_hash(a) == stable_hash(b):
                continue
            for key in sorted(set(a) | set(b)):  # every setting that differs, not only the first
                if a.get(key) != b.get(key):
                    differences.append(f"{bench}: {key} {_short(a.get(key))} vs {_short(b.get(key))}")
            break
    return differences


def _comparable_settings(result: dict | None) -> dict | None:
    settings = (result or {}).get("settings")
    if (result or {}).get("status") != "ok" or not isinstance(settings, dict):
        return None
    return {k: v for k, v in settings.items() if k != "model"}


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def render_comparison(base_dir: str | Path, other_dirs: list[str | Path], names: list[str] | None = None) -> str:
    """The Markdown table Benchmark | Metric | <base> | <other> | Delta, one row per metric.

    Cells show the value and its 95% interval; a delta is bold when the two
    runs' intervals do not overlap. With several other runs, each gets its own
    value and delta columns. Each run's column names the prompt format its
    questions were asked in.
    """
    from twophase.eval.benchmarks import ALL, published_name

    labels = list(names) if names else [run_label(d) for d in [base_dir, *other_dirs]]
    base, others = load_run(base_dir), [load_run(d) for d in other_dirs]
    header = ["Benchmark", "Metric", column_label(labels[0], base)]
    for label, run in zip(labels[1:], others):
        header += [column_label(label, run), "Delta" if len(other_dirs) == 1 else f"Delta ({label})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench, metric, base_m, other_ms, base_r, other_rs in comparison_rows(base, others, ALL):
        fmt = _number_format([base_m, *other_ms])
        cells = [published_name(bench), metric_label(metric, [base_r, *other_rs]), _cell(base_m, base_r, fmt)]
        for other_m, other_r in zip(other_ms, other_rs):
            cells += [_cell(other_m, other_r, fmt), _delta(base_m, other_m, fmt)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
