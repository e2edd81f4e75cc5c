"""`twophase eval` and `twophase compare`."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Literal, Union

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


# EvalSettings' fields that are flags of their own (typed, defaulted and explained by EvalSettings itself);
# every field, these included, can also be given as --set KEY=VALUE (dotted into its dicts).
FLAGS = ("benchmarks", "limit", "judge", "batch_size", "prompt_format", "data_dir", "samples_per_question", "seed", "dtype")


def _click_type(hint):
    """The click type of an EvalSettings annotation: its Literal words as a choice, int, or text."""
    union = typing.get_origin(hint) in (Union, types.UnionType)
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if all(typing.get_origin(option) is Literal for option in options):
        return click.Choice([word for option in options for word in typing.get_args(option)])
    return int if options == [int] else str


def settings_flags(command):
    """One --flag per name in FLAGS, generated from EvalSettings' fields, then --set for every field."""
    from twophase.eval.settings import EvalSettings

    hints = typing.get_type_hints(EvalSettings)
    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    command = click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
                           help="Any EvalSettings key, repeatable: --set judge_options.min_mass=0 --set limit=5.")(command)  # fmt: skip
    for name in reversed(FLAGS):
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        kwargs = dict(type=_click_type(hints[name]), default=f.default, help=f.metadata["help"])
        if name == "data_dir":
            kwargs["type"] = click.Path(exists=True, file_okay=False)
        command = click.option(flag, name, show_default=f.default is not None, **kwargs)(command)
    return command


def settings_from(values: dict, set_pairs: tuple[str, ...]):
    """EvalSettings from the flags' values, then the --set pairs on top (values read as YAML scalars)."""
    from twophase.eval.settings import EvalSettings

    keys = [f.name for f in dataclasses.fields(EvalSettings)]
    for pair in set_pairs:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE (e.g. judge_options.min_mass=0), got '{pair}'")
        key, value = (part.strip() for part in pair.split("=", 1))
        top, *inner = key.split(".")
        if top not in keys:
            raise UserError(f"--set {key}: EvalSettings has no key {top!r}; its keys: {', '.join(keys)}")
        value = yaml.safe_load(value) if value else ""
        if inner:
            nested = values[top] = dict(values.get(top) or {})
            for part in inner[:-1]:
                nested = nested.setdefault(part, {})
            nested[inner[-1]] = value
        else:
            values[top] = value
    return EvalSettings(**values)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Model path or hub id.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory (reruns resume).")
@click.option("--judge-model", default=None, help="Local judge: path or hub id. Endpoint judge: model name ($JUDGE_MODEL).")
@click.option("--judge-base-url", default=None, help="Endpoint judge base URL ($JUDGE_BASE_URL, $OPENAI_BASE_URL).")
@click.option("--judge-api-key", default=None, help="Endpoint judge key; prefer $JUDGE_API_KEY or $OPENAI_API_KEY.")
@click.option("--judge-concurrency", type=int, default=8, show_default=True, help="Endpoint judge: parallel requests.")
@click.option("--name", "run_name", default=None, help="Name of this run in comparison tables (default: the --out folder name).")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="Benchmark option, repeatable; prefix with a benchmark to target one: humaneval.n_samples=10.")
@settings_flags
def eval_command(model, out_dir, judge_model, judge_base_url, judge_api_key, judge_concurrency, run_name, option_pairs,
                 set_pairs, **flags):  # fmt: skip
    """Evaluate a model on the safety and capability benchmarks."""
    from twophase.eval.runner import run_evaluation

    judge_options = {"model": judge_model, "base_url": judge_base_url, "api_key": judge_api_key,
                     "concurrency": judge_concurrency, "batch_size": flags["batch_size"]}  # fmt: skip
    settings = settings_from({**flags, "judge_options": judge_options, "options": _parse_options(option_pairs)}, set_pairs)
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
