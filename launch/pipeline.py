"""`twophase pipeline` and `twophase status`: the whole two-phase experiment as one resumable command.

The stages, in order; each writes RUN_DIR/<stage>/ and its manifest.json (launch/manifest.py):

    eval_original           the original model on the benchmarks
    dpo                     Phase 1: LoRA DPO, then the merge in `merge_dtype` -> RUN_DIR/dpo/merged
    eval_dpo                the merged DPO model, Phase 2's start, on the benchmarks
    eval_dpo_exact          (merge_dtype other than float32) the DPO adapter applied unmerged: the
                            exact trained model, to show what rounding the merge lost
    grpo_<condition>        Phase 2: GRPO from RUN_DIR/dpo/merged, one stage per reward condition
    eval_grpo_<condition>   each GRPO model on the benchmarks
    tables                  Original vs DPO-Aligned, and DPO-Aligned vs each GRPO condition (.md, .json)

On a rerun a done stage is skipped. A stage that was interrupted or failed
runs again and resumes: training from its newest checkpoint, evaluation from
its finished benchmarks. A stage that fails records its reason and stops the
pipeline; earlier stages are left as they were. `--stage NAME` runs one stage
alone once the stages it needs are done: each job of `twophase slurm` does that.

The config file has one section per kind of stage:

    run_dir: runs/wu17_v5
    model: deepseek-ai/DeepSeek-Prover-V2-7B      the original model
    seed: 0                                       every stage's seed unless its section sets one
    merge_dtype: bfloat16                         the dtype of RUN_DIR/dpo/merged
    eval: {benchmarks: all, judge: ..., ...}      EvalSettings below
    dpo: {lr: 5.0e-7, ...}                        DPOConfig keys (trainers/config.py)
    grpo: {lr: 1.0e-6, ...}                       GRPOConfig keys shared by every condition
    conditions:                                   GRPOConfig keys of each condition
      random: {reward: random}
      fv: {reward: lean, reward_options: {lean: {project_dir: /path}}}

The trainers' `model`, `out_dir`, `merge_after` and `merge_dtype` are the pipeline's to set.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from data.errors import UserError, reason_of
from data.run_dir import owned
from launch.manifest import (
    finish,
    is_done,
    now,
    read_manifest,
    start_manifest,
    still_running_elsewhere,
    write_manifest,
)
from data.files import atomic_write_text
from trainers.checkpoint import list_checkpoints
from trainers.config import DPOConfig, GRPOConfig, load_config, make_config

PLAN_FILE = "pipeline.json"
PIPELINE_KEYS = ("model", "out_dir", "merge_after", "merge_dtype")  # trainer keys that the pipeline sets itself
TRAINED_FORMAT = "trained"  # eval.prompt_format: the format Phase 1 trained with (dpo.prompt_format)

DEFAULT_CONDITIONS = {
    "random": {"reward": "random"},
    "zero": {"reward": "zero"},
    "fv": {"reward": "lean", "reward_options": {"lean": {"project_dir": None}}},
}


@dataclass
class PipelineConfig:
    run_dir: str = "runs/pipeline"
    model: str = "deepseek-ai/DeepSeek-Prover-V2-7B"
    seed: int = 0
    merge_dtype: str = "bfloat16"  # RUN_DIR/dpo/merged, Phase 2's start: bfloat16 | float16 | float32
    eval: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    grpo: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_CONDITIONS))


@dataclass
class EvalSettings:
    """The `eval` section: the arguments of eval.runner.run_evaluation that every eval stage shares."""

    benchmarks: str = "all"  # all, "a,b", or a YAML list
    limit: int | None = None
    judge: str = "string-match"
    judge_options: dict = field(default_factory=dict)
    benchmark_judges: dict = field(default_factory=dict)  # {benchmark: judge} where it differs from `judge`
    batch_size: int = 8
    prompt_format: str = TRAINED_FORMAT  # or one of data.prompts.EVAL_FORMATS
    data_dir: str | None = None
    samples_per_question: int | None = None
    options: dict = field(default_factory=dict)  # benchmark options; one benchmark's may be nested under its name
    dtype: str | None = None
    seed: int | None = None  # None: the pipeline's seed


@dataclass
class Stage:
    name: str
    run: Callable[[dict, Path, bool], dict]  # (settings, stage_dir, resume) -> {output name: path}
    settings: dict  # fully resolved; the manifest records it
    needs: tuple[str, ...] = ()
    skip_reason: str | None = None
    always_run: bool = False  # cheap and derived from other stages: rebuilt on every run instead of skipped


# --------------------------------------------------------------------------- config -> stages


def load_pipeline(path, overrides=()) -> tuple[PipelineConfig, list[Stage]]:
    """Read and check the whole config, so a typo in the last section fails before the first stage runs."""
    config = load_config(PipelineConfig, path, overrides)
    # Absolute paths: a cluster job may start in another directory than the one that planned it.
    config.run_dir = str(Path(config.run_dir).resolve())
    return config, plan_stages(config, source=str(path))


def plan_stages(config: PipelineConfig, source: str = "config") -> list[Stage]:
    run_dir = Path(config.run_dir)
    dpo = dpo_settings(config, source)
    evaluation = eval_settings(config, source, dpo)
    stages = [
        Stage("eval_original", run_eval_stage, dict(evaluation, model=config.model, run_name="Original")),
        Stage("dpo", run_dpo_stage, dpo),
        Stage("eval_dpo", run_eval_stage, dict(evaluation, model=trained_model(dpo), run_name="DPO-Aligned"), ("dpo",)),
    ]
    if rounds_the_update(config.merge_dtype):
        # the adapter unmerged, computed in float32: bf16 arithmetic would round a small update away again
        exact = dict(evaluation, model=str(Path(dpo["out_dir"]) / "adapter"), run_name=EXACT_DPO_LABEL, dtype="float32")
        stages.append(Stage("eval_dpo_exact", run_eval_stage, exact, ("dpo",)))
    for condition in config.conditions:
        grpo = grpo_settings(config, condition, trained_model(dpo), source)
        skip = skipreason_of(grpo, condition)
        evaluation_of_grpo = dict(evaluation, model=trained_model(grpo), run_name=f"GRPO {condition}")
        stages.append(Stage(f"grpo_{condition}", run_grpo_stage, grpo, ("dpo",), skip))
        stages.append(Stage(f"eval_grpo_{condition}", run_eval_stage, evaluation_of_grpo, (f"grpo_{condition}",), skip))
    stages.append(tables_stage(run_dir, stages))
    return stages


EXACT_DPO_LABEL = "DPO-Aligned (adapter, unmerged)"


def rounds_the_update(merge_dtype: str) -> bool:
    """Whether a merge in this dtype can lose part of the LoRA update (all but float32 can)."""
    return merge_dtype != "float32"


def eval_settings(config: PipelineConfig, source: str, dpo: dict) -> dict:
    from data.prompts import EVAL_FORMATS, check_format_name
    from eval.benchmarks import ALL, parse_benchmarks
    from eval.runner import check_arguments

    values = dict(config.eval)
    if isinstance(values.get("benchmarks"), list):
        values["benchmarks"] = ",".join(str(name) for name in values["benchmarks"])
    settings = dataclasses.asdict(make_config(EvalSettings, values, source=f"{source} (eval section)"))
    if settings["prompt_format"] == TRAINED_FORMAT:  # ask the questions in the layout Phase 1 trained on
        settings["prompt_format"] = dpo["prompt_format"]
    check_format_name(settings["prompt_format"], EVAL_FORMATS, where="eval.prompt_format (or trained)")
    settings["benchmarks"] = ",".join(parse_benchmarks(settings["benchmarks"]))
    unknown = sorted(set(settings["benchmark_judges"]) - set(ALL))
    if unknown:
        raise UserError(f"eval.benchmark_judges names unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    for name, spec in settings["benchmark_judges"].items():
        judge_spec(spec, {}, f"eval.benchmark_judges.{name}")  # a bad judge fails now, not after training
    settings["options"] = _flat_options(settings["options"], ALL)
    check_arguments({key: settings[key] for key in ("limit", "batch_size", "samples_per_question")} | settings["options"])
    settings["seed"] = config.seed if settings["seed"] is None else settings["seed"]
    return settings


def _flat_options(options: dict, benchmarks: tuple[str, ...]) -> dict:
    """{"mmlu": {"num_shots": 0}} -> {"mmlu.num_shots": 0}: the runner's form for one benchmark's option."""
    flat = {}
    for key, value in options.items():
        if key in benchmarks and isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def dpo_settings(config: PipelineConfig, source: str) -> dict:
    section = _trainer_section(config.dpo, "dpo", source)
    values = {"seed": config.seed, **section, "model": config.model, "out_dir": str(Path(config.run_dir) / "dpo"),
              "merge_after": True, "merge_dtype": config.merge_dtype}  # fmt: skip
    return dataclasses.asdict(make_config(DPOConfig, values, source=f"{source} (dpo section)"))


def grpo_settings(config: PipelineConfig, condition: str, start_model: str, source: str) -> dict:
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(condition)):
        raise UserError(f"condition name {condition!r} in {source}: use letters, digits and _ (it names a directory and a job)")
    own = config.conditions[condition] or {}
    if not isinstance(own, dict):
        raise UserError(f"conditions.{condition} in {source} must be a mapping of GRPO config keys")
    section = _merged(_trainer_section(config.grpo, "grpo", source), _trainer_section(own, f"conditions.{condition}", source))
    values = {"seed": config.seed, **section, "model": start_model, "out_dir": str(Path(config.run_dir) / f"grpo_{condition}")}
    return dataclasses.asdict(make_config(GRPOConfig, values, source=f"{source} (conditions.{condition})"))


def _trainer_section(values: dict, name: str, source: str) -> dict:
    taken = sorted(set(values) & set(PIPELINE_KEYS))
    if taken:
        raise UserError(
            f"{', '.join(f'{name}.{key}' for key in taken)} in {source}: the pipeline sets this itself "
            f"(the top-level `model` is trained; every stage writes to run_dir/<stage>); remove it"
        )
    return values


def _merged(base: dict, override: dict) -> dict:
    """`override` on top of `base`, mapping by mapping (a condition's reward_options extend the shared ones)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def trained_model(settings: dict) -> str:
    """Where a training stage leaves the full model that comes next (a LoRA adapter is merged first)."""
    return str(Path(settings["out_dir"]) / ("merged" if settings["lora"] else "model"))


def skipreason_of(grpo: dict, condition: str) -> str | None:
    """A Lean-rewarded condition needs a Lean project; without one it is skipped, not failed."""
    rewards = [name.strip() for name in grpo["reward"].split(",")]
    if "lean" not in rewards:
        return None
    if (grpo["reward_options"] or {}).get("lean", {}).get("project_dir"):
        return None
    return f"no Lean project configured (set conditions.{condition}.reward_options.lean.project_dir)"


def tables_stage(run_dir: Path, stages: list[Stage]) -> Stage:
    label = {stage.name: stage.settings.get("run_name") for stage in stages}
    grpo_evals = [s.name for s in stages if s.name.startswith("eval_grpo_") and not s.skip_reason]
    dpo_evals = [s.name for s in stages if s.name in ("eval_dpo", "eval_dpo_exact")]
    merged = Path(trained_model(next(s.settings for s in stages if s.name == "dpo")))

    def table(names: list[str]) -> dict:
        return {"runs": [str(run_dir / name) for name in names], "labels": [label[name] for name in names]}

    # The published table, with the merge's report: how much of the LoRA update Phase 2 starts with.
    tables = {"original_vs_dpo": dict(table(["eval_original", *dpo_evals]), merge_report=str(merged / "merge_report.json"))}
    if grpo_evals:
        tables["dpo_vs_grpo"] = table(["eval_dpo", *grpo_evals])
    # Rebuilt on every run (it takes milliseconds), so the tables always show the evals as they are now,
    # e.g. once a condition is added to a finished run.
    needs = ("eval_original", *dpo_evals, *grpo_evals)
    return Stage("tables", run_tables_stage, {"tables": tables}, needs=needs, always_run=True)


# --------------------------------------------------------------------------- what each stage does


def run_eval_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    """Evaluate, one runner call per judge; the runner reuses finished benchmarks, so a rerun does only what is missing."""
    from eval.runner import run_evaluation

    common = {key: value for key, value in settings.items() if key != "benchmark_judges"}
    for kind, options, names in judge_groups(settings):
        summary = run_evaluation(out_dir=stage_dir, **dict(common, benchmarks=",".join(names), judge=kind, judge_options=options))
    # the summary keeps the entries of the benchmarks that other calls wrote
    mine = settings["benchmarks"].split(",")
    failed = {name: entry.get("reason") for name, entry in summary["benchmarks"].items() if name in mine and entry["status"] == "failed"}
    if failed:
        raise UserError(f"{len(failed)} benchmark(s) failed: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    return {"summary": str(stage_dir / "summary.json")}


def judge_groups(settings: dict) -> list[tuple[str, dict, list[str]]]:
    """[(judge kind, judge options, [benchmark, ...])] in benchmark order: a costly model judge serves only what needs it."""
    groups: dict[str, tuple[str, dict, list[str]]] = {}
    for name in settings["benchmarks"].split(","):
        spec = settings["benchmark_judges"].get(name, settings["judge"])
        kind, options = judge_spec(spec, settings["judge_options"], f"the judge of {name}")
        key = json.dumps([kind, options], sort_keys=True, default=str)
        groups.setdefault(key, (kind, options, []))[2].append(name)
    return list(groups.values())


def judge_spec(spec, shared_options: dict, where: str) -> tuple[str, dict]:
    """(kind, options) of a judge written as a name ("string-match", "local:PATH") or a mapping {kind, model, ...}.

    A local judge whose model is not set yet is no judge: the benchmarks that
    need one are then reported as "no judge configured" instead of failing.
    """
    from eval.judges import JUDGE_KINDS

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


def run_dpo_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from launch.train import report_outputs
    from trainers.dpo import run_dpo

    outputs = run_dpo(make_config(DPOConfig, settings), resume=resume)
    report_outputs(dict(outputs))
    return {name: outputs[name] for name in ("metrics", "final", "merged") if name in outputs}


def run_grpo_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from launch.train import report_outputs
    from trainers.grpo import run_grpo

    config = make_config(GRPOConfig, settings)
    outputs = run_grpo(config, resume=resume)
    report_outputs(dict(outputs))
    kept = {name: outputs[name] for name in ("metrics", "samples", "final")}
    if config.lora:  # the next eval needs a full model
        from trainers.merge import merge_adapter

        dtype = "bfloat16" if config.precision == "bf16" else "float32"
        kept["merged"] = str(merge_adapter(outputs["final"], trained_model(settings), base=config.model, dtype=dtype))
    return kept


def run_tables_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from launch.tables import write_tables

    return write_tables(settings["tables"], stage_dir)


# --------------------------------------------------------------------------- running stages


def run_pipeline(config: PipelineConfig, stages: list[Stage], only: str | None = None) -> None:
    """Run every stage in order (or only `only`); stops at the first failure with a UserError."""
    run_dir = Path(config.run_dir)
    by_name = {stage.name: stage for stage in stages}
    if only is not None and only not in by_name:
        raise UserError(f"no stage named {only!r}; the stages are: {', '.join(by_name)}")
    chosen = [by_name[only]] if only else stages
    # A whole run owns run_dir; one-stage runs (the cluster's jobs) share it, each owning its stage's directory.
    with owned(run_dir, shared=only is not None):
        for stage in chosen:  # refuse changed settings before the plan is rewritten: it describes the run that finished
            _done_with_todays_settings(stage, run_dir / stage.name)
        write_plan(run_dir, config, stages)
        for stage in chosen:
            run_stage(stage, run_dir)


def write_plan(run_dir: Path, config: PipelineConfig, stages: list[Stage]) -> None:
    """RUN_DIR/pipeline.json: the resolved config and the stage list, which `twophase status` reads."""
    plan = {
        "config": redacted(dataclasses.asdict(config)),
        "stages": [{"name": s.name, "needs": list(s.needs), "skip_reason": s.skip_reason} for s in stages],
        "written_at": now(),
    }
    atomic_write_text(run_dir / PLAN_FILE, json.dumps(plan, indent=2) + "\n")


def run_stage(stage: Stage, run_dir: Path) -> None:
    stage_dir = run_dir / stage.name
    if _done_earlier(stage, stage_dir):
        return
    _check_can_start(stage, run_dir, read_manifest(stage_dir))
    with owned(stage_dir):  # one process at a time runs a stage
        if not _done_earlier(stage, stage_dir):  # another process may have finished it meanwhile
            _run_owned_stage(stage, stage_dir, read_manifest(stage_dir))


def _done_earlier(stage: Stage, stage_dir: Path) -> bool:
    """Whether the stage is skipped as done; it says so."""
    if not _done_with_todays_settings(stage, stage_dir):
        return False
    click.echo(f"[{stage.name}] done earlier (finished {read_manifest(stage_dir)['finished_at']}): skipping")
    return True


def _done_with_todays_settings(stage: Stage, stage_dir: Path) -> bool:
    """Done, outputs in place, with today's settings (done with other settings is an error)."""
    earlier = read_manifest(stage_dir)
    if not is_done(earlier) or stage.always_run or stage.skip_reason:
        return False
    _check_same_settings(stage, earlier, stage_dir)
    return True


def _run_owned_stage(stage: Stage, stage_dir: Path, earlier: dict | None) -> None:
    if stage.skip_reason:
        if earlier is None or earlier.get("status") == "skipped":  # never hide what an earlier config ran
            write_manifest(stage_dir, {"stage": stage.name, "status": "skipped", "reason": stage.skip_reason, "checked_at": now()})
        click.echo(f"[{stage.name}] skipped: {stage.skip_reason}")
        return
    resume = bool(list_checkpoints(stage_dir / "checkpoints"))
    manifest = start_manifest(stage.name, redacted(stage.settings), stage.settings.get("seed"), list(stage.needs), earlier)
    write_manifest(stage_dir, manifest)
    click.echo(f"[{stage.name}] {'resuming from its last checkpoint' if resume else 'starting'} in {stage_dir}")
    try:
        outputs = _run_with_sigterm_as_interrupt(stage, stage_dir, resume)
    except KeyboardInterrupt:
        write_manifest(stage_dir, finish(manifest, "interrupted", reason="interrupted (Ctrl-C or SIGTERM)"))
        raise
    except Exception as err:  # noqa: BLE001 - recorded, then reported as one line
        reason = reason_of(err)
        write_manifest(stage_dir, finish(manifest, "failed", reason=reason, traceback=traceback.format_exc()))
        raise UserError(
            f"stage {stage.name} failed: {reason} (traceback in {stage_dir / 'manifest.json'}); "
            f"earlier stages are intact: fix the cause and rerun the same command to continue"
        ) from None
    finally:
        _free_memory()
    write_manifest(stage_dir, finish(manifest, "done", outputs=outputs))
    click.echo(f"[{stage.name}] done")


def _run_with_sigterm_as_interrupt(stage: Stage, stage_dir: Path, resume: bool) -> dict:
    # A cluster's preemption (SIGTERM) then ends an eval as cleanly as a training stage.
    from trainers.loop import sigterm_as_interrupt

    with sigterm_as_interrupt():
        outputs = stage.run(stage.settings, stage_dir, resume)
    missing = [path for path in outputs.values() if not Path(path).exists()]
    if missing:
        raise RuntimeError(f"the stage finished but its outputs are missing: {', '.join(missing)}")
    return outputs


def _check_can_start(stage: Stage, run_dir: Path, earlier: dict | None) -> None:
    if stage.skip_reason:
        return
    if still_running_elsewhere(earlier):
        raise UserError(f"stage {stage.name} is running in process {earlier['pid']} since {earlier['started_at']}; "
                        f"wait for it, or stop that process first")  # fmt: skip
    waiting = [name for name in stage.needs if not is_done(read_manifest(run_dir / name))]
    if waiting:
        raise UserError(f"stage {stage.name} needs {', '.join(waiting)} done first "
                        f"(twophase pipeline without --stage runs every stage in order)")  # fmt: skip


def _check_same_settings(stage: Stage, earlier: dict, stage_dir: Path) -> None:
    """A done stage is skipped only if it ran with today's settings: a table must not mix configs silently."""
    changes = _differences(earlier.get("config") or {}, _as_json(redacted(stage.settings)))
    if changes:
        raise UserError(
            f"stage {stage.name} finished earlier with other settings ({'; '.join(changes[:3])}); "
            f"use another run_dir, or delete {stage_dir / 'manifest.json'} (and the manifests of the stages after it) "
            f"to run it again: training resumes from its checkpoints, evaluation reuses unchanged benchmarks"
        )


def _differences(old: dict, new: dict) -> list[str]:
    """Settings that changed; a key on one side only is a config key that the code added or removed since."""
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new)) if old[key] != new[key]]


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def redacted(value):
    """The value with every `*api_key*` entry hidden: run directories get shared, keys must not be."""
    if isinstance(value, dict):
        return {k: ("<hidden>" if "api_key" in str(k) and v else redacted(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def _free_memory() -> None:
    """Give the next stage the GPU memory this one cached (one process runs every stage)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- status


def status_lines(run_dir: Path) -> list[str]:
    """One line per stage: its state, when, and why for failures and skips."""
    plan_file = Path(run_dir) / PLAN_FILE
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{run_dir} is not a pipeline run directory (no readable {PLAN_FILE})") from None
    width = max(len(entry["name"]) for entry in plan["stages"])
    return [f"{entry['name']:<{width}}  {describe_stage(Path(run_dir) / entry['name'], entry)}" for entry in plan["stages"]]


def describe_stage(stage_dir: Path, entry: dict) -> str:
    manifest = read_manifest(stage_dir)
    if manifest is None:
        needs = f" (after {', '.join(entry['needs'])})" if entry["needs"] else ""
        return f"skipped: {entry['skip_reason']}" if entry.get("skip_reason") else f"pending{needs}"
    status = manifest["status"]
    took = f"{manifest.get('started_at')} -> {manifest.get('finished_at')} ({_duration(manifest.get('seconds'))})"
    if status == "done":
        return f"done         {took}" if is_done(manifest) else "done, but outputs are missing: a rerun redoes it"
    if status == "running":
        where = f"pid {manifest.get('pid')} on {manifest.get('host')}"
        if still_running_elsewhere(manifest) or manifest.get("host") != _hostname():
            return f"running      since {manifest['started_at']} ({where})"
        return f"interrupted  at some point after {manifest['started_at']} ({where} is gone): a rerun resumes it"
    if status == "interrupted":
        return f"interrupted  {took}: a rerun resumes it"
    if status == "failed":
        return f"failed       {took}: {manifest.get('reason')}"
    return f"{status}: {manifest.get('reason') or ''}".rstrip(": ")


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --------------------------------------------------------------------------- commands


def execute(config: PipelineConfig, stages: list[Stage], only: str | None = None) -> None:
    """Run the pipeline and report: the tables once they exist, each stage's state, where the outputs are."""
    started = time.time()
    try:
        run_pipeline(config, stages, only)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume the stage from its last checkpoint", err=True)
        sys.exit(130)
    run_dir = Path(config.run_dir)
    tables = read_manifest(run_dir / "tables")
    if only in (None, "tables") and is_done(tables):
        from launch.tables import print_tables

        print_tables([path for path in tables["outputs"].values() if path.endswith(".md")], echo=click.echo)
    click.echo("\n" + "\n".join(status_lines(run_dir)))
    click.echo(f"\nfinished in {time.time() - started:.0f} s; outputs in {run_dir} (twophase status {run_dir})")


@click.command("pipeline")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Pipeline YAML: run_dir, model, seed and the sections eval, dpo, grpo, conditions.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, dotted into its section: --set dpo.max_steps=10 --set eval.limit=20 (repeatable).")
@click.option("--stage", "only", default=None, metavar="NAME",
              help="Run only this stage, once the stages it needs are done (what each `twophase slurm` job does).")
def pipeline_command(config_path, overrides, only):
    """The whole experiment: evaluate the original model, DPO + merge, evaluate,
    GRPO under each reward condition, evaluate each, comparison tables.

    Every stage writes RUN_DIR/<stage>/ with a manifest.json. Rerunning the same
    command skips done stages and resumes an interrupted one from its last
    checkpoint; a failed stage stops the pipeline with its reason.

    Example: twophase pipeline --config launch/configs/wu17_v5.yaml --set conditions.fv.reward_options.lean.project_dir=/opt/mathlib
    """
    config, stages = load_pipeline(config_path, overrides)
    execute(config, stages, only)


@click.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False))
def status_command(run_dir):
    """Show the state of each stage of the pipeline run in RUN_DIR."""
    for line in status_lines(Path(run_dir)):
        click.echo(line)
