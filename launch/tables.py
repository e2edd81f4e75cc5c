"""The pipeline's comparison tables: Markdown from eval.results.render_comparison, and the same rows as JSON.

Each table compares a base eval run with one or more others, e.g.

    original_vs_dpo   Original vs DPO-Aligned (the published table), and the exact
                      DPO model beside it when the merge rounds; below it, how much
                      of the LoRA update the merged weights kept (merge_report.json)
    dpo_vs_grpo       DPO-Aligned vs each GRPO condition
    original_vs_grpo  (without Phase 1) Original vs each GRPO condition

Each run's column names the prompt format its questions were asked in. The
JSON holds every number of the Markdown, unrounded: per row the benchmark,
the metric, each run's value with its counts and 95% interval, each run's
difference from the base, and whether the two intervals are disjoint (the
bold deltas of the Markdown); and the merge report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from twophase.data.base.files import atomic_write_text


def write_tables(tables: dict[str, dict], out_dir: Path) -> dict[str, str]:
    """Write NAME.md and NAME.json for each {name: {"runs": [base, *others], "labels": [...]}}; returns the paths."""
    from twophase.eval.results import render_comparison

    outputs = {}
    for name, table in tables.items():
        base, *others = table["runs"]
        merge = read_merge_report(table.get("merge_report"))
        markdown = render_comparison(base, others, table["labels"]) + merge_note(merge, table.get("merge_report"))
        if table.get("curves"):
            plot, note = training_curves(table["curves"], Path(out_dir) / f"{name}_curves.png")
            markdown += note
            if plot:
                outputs[f"{name}_curves.png"] = str(plot)
        atomic_write_text(Path(out_dir) / f"{name}.md", markdown)
        rows = comparison_json(base, others, table["labels"])
        if "merge_report" in table:
            rows["merge"] = merge
        atomic_write_text(Path(out_dir) / f"{name}.json", json.dumps(rows, indent=2) + "\n")
        outputs[f"{name}.md"] = str(Path(out_dir) / f"{name}.md")
        outputs[f"{name}.json"] = str(Path(out_dir) / f"{name}.json")
    return outputs


def training_curves(run_dirs: list[str], target: Path) -> tuple[Path | None, str]:
    """The PNG of the training runs behind a table (launch/plot.py) and the Markdown line that links it;
    without matplotlib, an optional extra, no PNG and a line saying how to get one."""
    from twophase.launch.plot import INSTALL_HINT, plot_runs, plotting_available

    runs = [Path(d) for d in run_dirs if (Path(d) / "metrics.jsonl").is_file()]
    if not runs:
        return None, ""
    if not plotting_available():
        return None, f"\nTraining curves: not drawn, matplotlib is not installed: {INSTALL_HINT}.\n"
    plot = plot_runs(runs, target)
    return plot, f"\nTraining curves ({', '.join(r.name for r in runs)}): [{plot.name}]({plot.name})\n"


def read_merge_report(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def merge_note(report: dict | None, path: str | None) -> str:
    """One line under a table: the share of the LoRA update that the merged weights, Phase 2's start, kept."""
    if path is None:
        return ""
    if report is None or report.get("update_fraction_kept") is None:
        return f"\nDPO merge: no merge report at {path}.\n"
    exact = ("" if report.get("dtype") == "float32" else
             "; the unmerged-adapter column is the exact trained model, for comparison")
    return (f"\nDPO merge in {report['dtype']}: the merged weights (DPO-Aligned, Phase 2's start) keep "
            f"{report['update_fraction_kept']:.1%} of the LoRA update (relative error "
            f"{report['relative_error_of_update']:.3f}){exact}.\n")


def comparison_json(base_dir, other_dirs: list, labels: list[str]) -> dict:
    """The rows of render_comparison's table as data."""
    from twophase.eval.benchmarks import ALL, published_name
    from twophase.eval.results import comparison_rows, intervals_disjoint, load_run

    from twophase.eval.results import metric_label, prompt_format_of

    base, others = load_run(base_dir), [load_run(d) for d in other_dirs]
    rows = []
    for bench, metric, base_m, other_ms, base_r, other_rs in comparison_rows(base, others, ALL):
        row = {"benchmark": bench, "title": published_name(bench), "metric": metric, "label": metric_label(metric, [base_r, *other_rs]),
               "values": {labels[0]: _value(base_m, base_r)}, "delta": {}, "ci_disjoint": {}}
        for label, other_m, other_r in zip(labels[1:], other_ms, other_rs):
            row["values"][label] = _value(other_m, other_r)
            row["delta"][label] = _difference(base_m, other_m)
            row["ci_disjoint"][label] = bool(base_m and other_m and intervals_disjoint(base_m, other_m))
        rows.append(row)
    formats = {label: prompt_format_of(run) for label, run in zip(labels, [base, *others])}
    return {"base": labels[0], "others": labels[1:], "runs": [str(d) for d in [base_dir, *other_dirs]],
            "prompt_formats": formats, "rows": rows}


def _value(metric, result: dict | None) -> dict | None:
    """The metric's numbers; a failed or skipped benchmark says so, with its reason (the Markdown's cell)."""
    if metric is None:
        status = (result or {}).get("status")
        return {"status": status, "reason": result.get("reason")} if status in ("failed", "skipped") else None
    return metric.to_dict()


def _difference(base, other) -> float | None:
    if base is None or other is None or math.isnan(base.value) or math.isnan(other.value):
        return None
    return other.value - base.value


def print_tables(markdown_files: list[str], echo=print) -> None:
    for path in markdown_files:
        echo(f"\n{Path(path).stem}  ({path}; the same rows as JSON beside it)\n")
        echo(Path(path).read_text(encoding="utf-8").rstrip("\n"))
