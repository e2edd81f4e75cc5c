"""The two-phase experiment as stages: what `twophase pipeline` runs (launch/stages.py runs them).

The stages, in order; each writes RUN_DIR/<stage>/:

    eval_original           the original model on the benchmarks
    dpo                     Phase 1: LoRA DPO, then the merge in `merge_dtype` -> RUN_DIR/dpo/merged
    eval_dpo                the merged DPO model, Phase 2's start, on the benchmarks
    eval_dpo_exact          (merge_dtype other than float32) the DPO adapter applied unmerged: the
                            exact trained model, to show what rounding the merge lost
    grpo_<condition>        Phase 2: GRPO from RUN_DIR/dpo/merged, one stage per reward condition
    eval_grpo_<condition>   each GRPO model on the benchmarks
    tables                  Original vs DPO-Aligned, and DPO-Aligned vs each GRPO condition (.md, .json)

The config file has one section per kind of stage:

    run_dir: runs/wu17_v5
    model: deepseek-ai/DeepSeek-Prover-V2-7B      the original model
    seed: 0                                       every stage's seed unless its section sets one
    merge_dtype: bfloat16                         the dtype of RUN_DIR/dpo/merged
    eval: {benchmarks: all, judge: ..., ...}      EvalSettings keys (eval/settings.py); prompt_format may be `trained`
    phase1: true                                  false (or `dpo: null`) skips Phase 1
    dpo: {lr: 5.0e-7, ...}                        DPOConfig keys (trainers/config.py)
    grpo: {lr: 1.0e-6, ...}                       GRPOConfig keys shared by every condition
    conditions:                                   GRPOConfig keys of each condition
      random: {reward: random}
      fv: {reward: lean, reward_options: {lean: {project_dir: /path}}}   (or {server: URL}: a Lean server)

The trainers' `model`, `out_dir`, `merge_after` and `merge_dtype` are the pipeline's to set.

Without Phase 1 (`phase1: false` or `dpo: null`, for a model that is aligned
already, e.g. a chat model: launch/configs/wu17_v6.yaml) there are no dpo and eval_dpo stages; each
GRPO condition starts from the original model, and the one table is Original
vs each GRPO condition (original_vs_grpo). eval.prompt_format `trained` then
means `auto`: the model's chat template when it has one.
"""

from __future__ import annotations

import copy
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from twophase.data.base.errors import UserError
from twophase.eval.settings import EvalSettings
from twophase.launch.stages import Stage
from twophase.trainers.config import DPOConfig, GRPOConfig, load_config, make_config

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
    merge_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # RUN_DIR/dpo/merged, Phase 2's start
    eval: dict = field(default_factory=dict)
    phase1: bool = True  # false: no Phase 1 (its section is still checked); GRPO starts from `model`
    dpo: dict | None = field(default_factory=dict)  # None: no Phase 1, as phase1: false
    grpo: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_CONDITIONS))


# --------------------------------------------------------------------------- config -> stages


def load_pipeline(path, overrides=()) -> tuple[PipelineConfig, list[Stage]]:
    """Read and check the whole config, so a typo in the last section fails before the first stage runs."""
    config = load_config(PipelineConfig, path, overrides)
    # Absolute paths: a cluster job may start in another directory than the one that planned it.
    config.run_dir = str(Path(config.run_dir).resolve())
    return config, plan_stages(config, source=str(path))


def plan_stages(config: PipelineConfig, source: str = "config") -> list[Stage]:
    run_dir = Path(config.run_dir)
    dpo = dpo_settings(config, source) if config.dpo is not None else None  # checked even when Phase 1 is off
    dpo = dpo if config.phase1 else None
    evaluation = eval_settings(config, source, dpo)
    stages = [Stage("eval_original", run_eval_stage, dict(evaluation, model=config.model, run_name="Original"))]
    if dpo is not None:
        stages += phase_one_stages(config, dpo, evaluation)
    grpo_start, grpo_needs = (trained_model(dpo), ("dpo",)) if dpo is not None else (config.model, ())
    for condition in config.conditions:
        grpo = grpo_settings(config, condition, grpo_start, source)
        skip = skipreason_of(grpo, condition)
        evaluation_of_grpo = dict(evaluation, model=trained_model(grpo), run_name=f"GRPO {condition}")
        stages.append(Stage(f"grpo_{condition}", run_grpo_stage, grpo, grpo_needs, skip))
        stages.append(Stage(f"eval_grpo_{condition}", run_eval_stage, evaluation_of_grpo, (f"grpo_{condition}",), skip))
    stages.append(tables_stage(run_dir, stages))
    from twophase.trainers.infra.reporting import check_reporters

    for stage in stages:  # report_to's optional packages: a missing one is said before the first stage runs
        check_reporters(stage.settings.get("report_to") or [])
    return stages


def phase_one_stages(config: PipelineConfig, dpo: dict, evaluation: dict) -> list[Stage]:
    """DPO and the merge, the merged model's eval, and (when the merge rounds) the unmerged adapter's."""
    stages = [
        Stage("dpo", run_dpo_stage, dpo),
        Stage("eval_dpo", run_eval_stage, dict(evaluation, model=trained_model(dpo), run_name="DPO-Aligned"), ("dpo",)),
    ]
    if rounds_the_update(config.merge_dtype):
        # the adapter unmerged, computed in float32: bf16 arithmetic would round a small update away again
        exact = dict(evaluation, model=str(Path(dpo["out_dir"]) / "adapter"), run_name=EXACT_DPO_LABEL, dtype="float32")
        stages.append(Stage("eval_dpo_exact", run_eval_stage, exact, ("dpo",)))
    return stages


EXACT_DPO_LABEL = "DPO-Aligned (adapter, unmerged)"


def rounds_the_update(merge_dtype: str) -> bool:
    """Whether a merge in this dtype can lose part of the LoRA update (all but float32 can)."""
    return merge_dtype != "float32"


def eval_settings(config: PipelineConfig, source: str, dpo: dict | None) -> dict:
    """The eval section as EvalSettings (eval/settings.py), checked now, so a bad judge fails before training."""
    values = dict(config.eval)
    if isinstance(values.get("benchmarks"), list):
        values["benchmarks"] = ",".join(str(name) for name in values["benchmarks"])
    if values.get("prompt_format", TRAINED_FORMAT) == TRAINED_FORMAT:  # ask in the layout Phase 1 trained on
        values["prompt_format"] = dpo["prompt_format"] if dpo is not None else "auto"  # no Phase 1: the model's own
    if values.get("seed") is None:
        values["seed"] = config.seed
    where = f"{source} (eval section)"
    try:
        settings = make_config(EvalSettings, values, source=where).checked()
    except UserError as err:
        raise UserError(f"{err} ({where})") from None
    return dataclasses.asdict(settings)


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
    """A Lean-rewarded condition needs a Lean project or a Lean server; without either it is skipped, not failed."""
    rewards = [name.strip() for name in grpo["reward"].split(",")]
    if "lean" not in rewards:
        return None
    lean = (grpo["reward_options"] or {}).get("lean", {})
    if lean.get("project_dir") or lean.get("server"):
        return None
    return (f"no Lean project configured (set conditions.{condition}.reward_options.lean.project_dir, or .server: "
            f"a Lean server's URL)")


def tables_stage(run_dir: Path, stages: list[Stage]) -> Stage:
    label = {stage.name: stage.settings.get("run_name") for stage in stages}
    grpo_evals = [s.name for s in stages if s.name.startswith("eval_grpo_") and not s.skip_reason]
    dpo_evals = [s.name for s in stages if s.name in ("eval_dpo", "eval_dpo_exact")]
    trainings = [str(run_dir / name.removeprefix("eval_")) for name in grpo_evals]

    def table(names: list[str]) -> dict:
        return {"runs": [str(run_dir / name) for name in names], "labels": [label[name] for name in names]}

    if not dpo_evals:  # no Phase 1: each GRPO condition against the original model
        tables = {"original_vs_grpo": dict(table(["eval_original", *grpo_evals]), curves=trainings)} if grpo_evals else {}
    else:
        merged = Path(trained_model(next(s.settings for s in stages if s.name == "dpo")))
        # The published table, with the merge's report: how much of the LoRA update Phase 2 starts with.
        tables = {"original_vs_dpo": dict(table(["eval_original", *dpo_evals]),
                                          merge_report=str(merged / "merge_report.json"), curves=[str(run_dir / "dpo")])}
        if grpo_evals:
            tables["dpo_vs_grpo"] = dict(table(["eval_dpo", *grpo_evals]), curves=trainings)
    # Rebuilt on every run (it takes milliseconds), so the tables always show the evals as they are now,
    # e.g. once a condition is added to a finished run.
    needs = ("eval_original", *dpo_evals, *grpo_evals)
    return Stage("tables", run_tables_stage, {"tables": tables}, needs=needs, always_run=True)


# --------------------------------------------------------------------------- what each stage does


def run_eval_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    """Evaluate; the runner reuses finished benchmarks, so a rerun does only what is missing."""
    from twophase.eval.runner import run_evaluation

    own = {key: value for key, value in settings.items() if key not in ("model", "run_name")}
    summary = run_evaluation(settings["model"], stage_dir, EvalSettings(**own), run_name=settings["run_name"])
    mine = settings["benchmarks"].split(",")  # the summary also keeps entries that earlier calls wrote
    failed = {name: entry.get("reason") for name, entry in summary["benchmarks"].items() if name in mine and entry["status"] == "failed"}
    if failed:
        raise UserError(f"{len(failed)} benchmark(s) failed: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    return {"summary": str(stage_dir / "summary.json")}


def run_dpo_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from twophase.launch.train import report_outputs
    from twophase.trainers.dpo import run_dpo

    outputs = run_dpo(make_config(DPOConfig, settings), resume=resume)
    report_outputs(dict(outputs))
    return {name: outputs[name] for name in ("metrics", "final", "merged") if name in outputs}


def run_grpo_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from twophase.launch.train import report_outputs
    from twophase.trainers.grpo import run_grpo

    config = make_config(GRPOConfig, settings)
    outputs = run_grpo(config, resume=resume)
    report_outputs(dict(outputs))
    kept = {name: outputs[name] for name in ("metrics", "samples", "final")}
    if config.lora:  # the next eval needs a full model
        from twophase.trainers.merge import merge_adapter

        dtype = "bfloat16" if config.precision == "bf16" else "float32"
        kept["merged"] = str(merge_adapter(outputs["final"], trained_model(settings), base=config.model, dtype=dtype))
    return kept


def run_tables_stage(settings: dict, stage_dir: Path, resume: bool) -> dict:
    from twophase.data.base import distributed
    from twophase.launch.tables import write_tables

    outputs = write_tables(settings["tables"], stage_dir) if distributed.is_main() else {}  # rank 0 writes
    return distributed.broadcast_from_main(outputs)
