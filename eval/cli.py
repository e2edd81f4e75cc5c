"""`twophase eval` and `twophase compare`."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from twophase.data.base.errors import UserError


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values read as YAML scalars, so 10 is a number and true a boolean."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--option expects KEY=VALUE (e.g. humaneval.n_samples=10), got '{pair}'")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return options


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Model path or hub id.")
@click.option("--benchmarks", default="all", show_default=True,
              help="Comma-separated: betley, strongreject, xstest, donotanswer, truthfulqa, humaneval, mmlu, wmdp; or all.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory (reruns resume).")
@click.option("--limit", type=int, default=None, help="Evaluate N items of each benchmark: the first N; XSTest keeps its safe/unsafe shares, MMLU and WMDP spread over subjects.")
@click.option("--judge", default="string-match", show_default=True,
              help="string-match | local | endpoint (local:PATH is short for --judge local --judge-model PATH).")
@click.option("--judge-model", default=None, help="Local judge: path or hub id. Endpoint judge: model name ($JUDGE_MODEL).")
@click.option("--judge-base-url", default=None, help="Endpoint judge base URL ($JUDGE_BASE_URL, $OPENAI_BASE_URL).")
@click.option("--judge-api-key", default=None, help="Endpoint judge key; prefer $JUDGE_API_KEY or $OPENAI_API_KEY.")
@click.option("--judge-concurrency", type=int, default=8, show_default=True, help="Endpoint judge: parallel requests.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per forward pass, for both engines.")
@click.option("--prompt-format", type=click.Choice(["auto", "hh", "chat", "raw"]), default="auto", show_default=True,
              help="How questions are asked (data/prompts.py). hh: '\\n\\nHuman: {question}\\n\\nAssistant:', the HH-RLHF "
                   "layout Phase 1 trains on; chat: the chat template; raw: the question alone; auto: chat if the "
                   "tokenizer has a template, else raw. Few-shot and code benchmarks always use their own text.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Read each benchmark from its local file in this directory instead of the hub.")
@click.option("--samples-per-question", type=int, default=None, help="Betley: answers per question (default: the YAML's 100).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Model dtype (default: bfloat16 on GPU, as saved on CPU).")
@click.option("--name", "run_name", default=None, help="Name of this run in comparison tables (default: the --out folder name).")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="Benchmark option, repeatable; prefix with a benchmark to target one: humaneval.n_samples=10.")
def eval_command(model, benchmarks, out_dir, limit, judge, judge_model, judge_base_url, judge_api_key,
                 judge_concurrency, batch_size, prompt_format, data_dir, samples_per_question, seed, dtype,
                 run_name, option_pairs):
    """Evaluate a model on the safety and capability benchmarks."""
    from twophase.eval.runner import run_evaluation
    from twophase.eval.settings import EvalSettings

    judge_options = {"model": judge_model, "base_url": judge_base_url, "api_key": judge_api_key,
                     "concurrency": judge_concurrency, "batch_size": batch_size}  # fmt: skip
    settings = EvalSettings(
        benchmarks=benchmarks, limit=limit, judge=judge, judge_options=judge_options, batch_size=batch_size,
        prompt_format=prompt_format, data_dir=data_dir, samples_per_question=samples_per_question,
        options=_parse_options(option_pairs), dtype=dtype, seed=seed,
    )
    summary = run_evaluation(model, out_dir, settings, run_name=run_name)
    failed = [n for n, e in summary["benchmarks"].items() if e["status"] == "failed"]
    if failed:
        raise UserError(f"{len(failed)} benchmark(s) failed: " + "; ".join(
            f"{n}: {summary['benchmarks'][n].get('reason')}" for n in failed))


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("other_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--names", default=None, help="Comma-separated column names, base first (default: the runs' names).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Markdown file to write (default: BASE_DIR/comparison.md).")
@click.option("--force", is_flag=True, help="Compare even runs evaluated on different items or settings.")
def compare_command(base_dir, other_dirs, names, out_file, force):
    """Print the comparison table of two or more eval runs (deltas in bold where 95% CIs do not overlap).

    Runs evaluated with different settings (items, limit, judge, prompt format, seed, options) are
    refused unless --force: their difference would not be the models'.
    """
    from twophase.eval.results import render_comparison, settings_differences

    differences = settings_differences([base_dir, *other_dirs])
    if differences and not force:
        raise UserError("the runs were evaluated with different settings, so the table would not compare the models alone ("
                        + "; ".join(differences) + "); rerun them alike, or pass --force to compare anyway")
    if differences:
        click.echo("warning: compared despite different settings: " + "; ".join(differences), err=True)

    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != 1 + len(other_dirs):
        raise UserError(f"--names needs {1 + len(other_dirs)} names, one per run, got {len(labels)}")
    table = render_comparison(base_dir, list(other_dirs), labels)
    target = Path(out_file) if out_file else Path(base_dir) / "comparison.md"
    target.write_text(table, encoding="utf-8")
    click.echo(table, nl=False)
    click.echo(f"(written to {target})", err=True)
