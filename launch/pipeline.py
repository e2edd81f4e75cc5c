"""`twophase pipeline` and `twophase status`: the whole two-phase experiment as one resumable command.

launch/experiment.py turns the config into stages; launch/stages.py runs them,
skips the done ones, resumes the interrupted one and reports each one's state.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from twophase.launch.experiment import PipelineConfig, load_pipeline
from twophase.launch.manifest import is_done, read_manifest
from twophase.launch.stages import Stage, run_stages, status_lines


def execute(config: PipelineConfig, stages: list[Stage], only: str | None = None) -> None:
    """Run the pipeline and report: the tables once they exist, each stage's state, where the outputs are."""
    started = time.time()
    try:
        run_stages(Path(config.run_dir), stages, dataclasses.asdict(config), only)
    except KeyboardInterrupt:
        click.echo(interrupted_message(Path(config.run_dir), stages), err=True)
        sys.exit(130)
    run_dir = Path(config.run_dir)
    tables = read_manifest(run_dir / "tables")
    if only in (None, "tables") and is_done(tables):
        from twophase.launch.tables import print_tables

        print_tables([path for path in tables["outputs"].values() if path.endswith(".md")], echo=click.echo)
    click.echo("\n" + "\n".join(status_lines(run_dir)))
    click.echo(f"\nfinished in {time.time() - started:.0f} s; outputs in {run_dir} (twophase status {run_dir})")


def interrupted_message(run_dir: Path, stages: list[Stage]) -> str:
    """Which stage stopped, where its newest checkpoint is, and the command that continues (the same one)."""
    import shlex

    from twophase.trainers.infra.checkpoint import list_checkpoints

    command = shlex.join(["twophase", *sys.argv[1:]])
    for stage in stages:
        if (read_manifest(run_dir / stage.name) or {}).get("status") == "interrupted":
            checkpoints = list_checkpoints(run_dir / stage.name / "checkpoints")
            where = f"its newest checkpoint is {checkpoints[-1]}" if checkpoints else "it had no checkpoint yet"
            return f"interrupted: stage {stage.name} stopped, {where}; continue with the same command: {command}"
    return f"interrupted: continue with the same command: {command}"


@click.command("pipeline")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Pipeline YAML: run_dir, model, seed and the sections eval, dpo, grpo, conditions.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, dotted into its section: --set dpo.max_steps=10 --set eval.limit=20 (repeatable).")
@click.option("--stage", "only", default=None, metavar="NAME",
              help="Run only this stage, once the stages it needs are done (what each `twophase slurm` job does).")
@click.option("--dry-run", is_flag=True,
              help="Check the whole config and print every stage with its settings; run nothing, write nothing.")
def pipeline_command(config_path, overrides, only, dry_run):
    """The whole experiment: evaluate the original model, DPO + merge, evaluate,
    GRPO under each reward condition, evaluate each, comparison tables.

    Every stage writes RUN_DIR/<stage>/ with a manifest.json. Rerunning the same
    command skips done stages and resumes an interrupted one from its last
    checkpoint; a failed stage stops the pipeline with its reason.

    Example: twophase pipeline --config launch/configs/wu17_v5.yaml --set conditions.fv.reward_options.lean.project_dir=/opt/mathlib
    """
    config, stages = load_pipeline(config_path, overrides)
    if dry_run:
        click.echo("\n".join(plan_lines(config, stages, config_path)))
        return
    execute(config, stages, only)


def plan_lines(config: PipelineConfig, stages: list[Stage], source) -> list[str]:
    """The plan as `--dry-run` prints it: each stage, what it needs, why it would be skipped, and every setting."""
    import json
    import textwrap

    from twophase.trainers.config import DPOConfig, GRPOConfig, make_config
    from twophase.trainers.dpo import algorithm_line as dpo_line
    from twophase.trainers.grpo import algorithm_line as grpo_line

    lines = [f"{source}: {len(stages)} stages in {config.run_dir} (dry run: nothing runs)"]
    for number, stage in enumerate(stages, 1):
        state = f"skipped: {stage.skip_reason}" if stage.skip_reason else f"needs: {', '.join(stage.needs) or 'nothing'}"
        lines.append(f"\n{number}. {stage.name}  ({state})")
        if stage.name == "dpo":
            lines.append(f"   {dpo_line(make_config(DPOConfig, stage.settings))}")
        elif stage.name.startswith("grpo_"):
            lines.append(f"   {grpo_line(make_config(GRPOConfig, stage.settings))}")
        settings = ", ".join(f"{key}={json.dumps(value, default=str)}" for key, value in stage.settings.items())
        lines += textwrap.wrap(settings, 116, initial_indent="   ", subsequent_indent="   ", break_on_hyphens=False)
    return lines


@click.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False))
def status_command(run_dir):
    """Show the state of each stage of the pipeline run in RUN_DIR."""
    for line in status_lines(Path(run_dir)):
        click.echo(line)


# --------------------------------------------------------------------------- the pipeline check (`twophase bench pipeline`)

SHIPPED_PIPELINE = Path(__file__).resolve().parent / "configs" / "wu17_v5.yaml"


def check_pipeline(run_dir: str, architecture: str = "llama-0.8b", config_path: str | Path = SHIPPED_PIPELINE,
                   overrides: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """The shipped pipeline, every stage, on a random-weight model and data in the real formats, in this process.

    What a user runs, shortened: the shipped config with the model replaced by a
    random-weight `architecture` over the tiny BPE tokenizer (saved to
    RUN_DIR/model, loaded by path like any model), Phase 1 on the bundled
    HH-RLHF-format pairs, Phase 2 on the bundled Lean Workbook-format tasks,
    and every evaluation on all eight benchmarks from eval/samples/ (their real
    schemas; HumanEval really executes) at their shipped settings: the same
    generation lengths and sampling, in the same order, so the CUDA allocator,
    graphs and memory see what a real run makes them see. Betley is judged by
    the model itself, so it runs its whole code path. `overrides` (KEY=VALUE,
    as `twophase pipeline --set`) replace any key, e.g. real data files.

    Returns each stage's status and seconds; raises PipelineFailed (with that report) if any stage failed.
    """
    import torch

    from twophase.data.base.errors import UserError
    from twophase.data.base.tiny import build_tiny_tokenizer
    from twophase.launch.bench.training import device_name, random_model
    from twophase.launch.demo import EVAL_SAMPLES, SAMPLES
    from twophase.trainers.models import resolve_device

    device = resolve_device("auto")
    run = Path(run_dir).resolve()
    model_dir = run / "model"
    if not (model_dir / "config.json").is_file():
        tokenizer = build_tiny_tokenizer()
        model = random_model(architecture, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                             vocab_size=len(tokenizer))  # fmt: skip
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    judge = f"{{kind: local, model: {model_dir}, min_mass: 0.0}}"
    shortened = (
        f"run_dir={run}", f"model={model_dir}", f"dpo.dataset={SAMPLES / 'hh_demo.jsonl'}", "dpo.max_steps=30",
        "dpo.save_every=10", f"grpo.dataset={SAMPLES / 'lean_demo.jsonl'}", "grpo.max_steps=4", "grpo.save_every=2",
        f"eval.data_dir={EVAL_SAMPLES}", f"eval.benchmark_judges.betley={judge}",
    )  # fmt: skip
    if device.type != "cuda":  # a CPU check of this command: float32 (the shipped bf16 autocast is for GPUs)
        shortened += ("dpo.precision=fp32", "grpo.precision=fp32")
    config, stages = load_pipeline(config_path, (*shortened, *overrides))
    started = time.perf_counter()
    failure = None
    try:
        execute(config, stages)
    except UserError as err:
        failure = str(err)
    report = {"benchmark": "pipeline", "architecture": architecture, "device": device_name(device),
              "config": str(config_path), "seconds": round(time.perf_counter() - started, 1), "stages": {}}  # fmt: skip
    for stage in stages:
        manifest = read_manifest(run / stage.name) or {}
        status = "skipped" if stage.skip_reason else manifest.get("status", "not run")
        report["stages"][stage.name] = {"status": status, "seconds": manifest.get("seconds")}
    broken = [name for name, entry in report["stages"].items() if entry["status"] not in ("done", "skipped")]
    report["passed"] = failure is None and not broken
    if not report["passed"]:
        raise PipelineFailed(report, failure or f"stages not done: {', '.join(broken)}")
    return report


class PipelineFailed(Exception):
    def __init__(self, report: dict, reason: str):
        super().__init__(reason)
        self.report = report


@click.command("pipeline")
@click.option("--run-dir", default="runs/bench-pipeline", show_default=True, type=click.Path(file_okay=False),
              help="Where the pipeline writes (a rerun resumes it; remove it to start afresh).")
@click.option("--arch", default="llama-0.8b", show_default=True, help="A layout of launch/bench/training.py.")
@click.option("--config", "config_path", default=str(SHIPPED_PIPELINE), show_default=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key (repeatable).")
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def check_pipeline_command(run_dir, arch, config_path, overrides, out):
    """The shipped pipeline end to end (all stages, all eight benchmarks) on a random-weight model; fails loudly."""
    from twophase.data.base.errors import UserError
    from twophase.launch.bench.training import emit

    try:
        report = check_pipeline(run_dir, arch, config_path, overrides)
    except PipelineFailed as failed:
        emit(failed.report, out)
        raise UserError(f"the pipeline check failed: {failed}") from None
    emit(report, out)
