"""Running a list of stages so that a run can always be resumed: the generic part of `twophase pipeline`.

A stage is a named step with its resolved settings and the stages it needs
(`Stage`). Each writes RUN_DIR/<stage>/ and its manifest.json
(launch/manifest.py). On a rerun a done stage is skipped, provided it ran
with today's settings (a table must not silently mix configs); a stage that
was interrupted or failed runs again and resumes: training from its newest
checkpoint, evaluation from its finished benchmarks. A stage that fails
records its reason and stops the run; earlier stages are left as they were.
`only` runs one stage alone once the stages it needs are done: each job of
`twophase slurm` does that. `status_lines` is `twophase status`.

What the stages are is not decided here: launch/experiment.py plans them.
"""

from __future__ import annotations

import gc
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from twophase.data.base.errors import UserError, reason_of
from twophase.data.base.files import atomic_write_text
from twophase.data.base.run_dir import owned
from twophase.launch.manifest import (
    finish,
    is_done,
    now,
    read_manifest,
    redacted,
    start_manifest,
    still_running_elsewhere,
    write_manifest,
)
from twophase.trainers.infra.checkpoint import list_checkpoints

PLAN_FILE = "pipeline.json"


@dataclass
class Stage:
    name: str
    run: Callable[[dict, Path, bool], dict]  # (settings, stage_dir, resume) -> {output name: path}
    settings: dict  # fully resolved; the manifest records it
    needs: tuple[str, ...] = ()
    skip_reason: str | None = None
    always_run: bool = False  # cheap and derived from other stages: rebuilt on every run instead of skipped


# --------------------------------------------------------------------------- running stages


def run_stages(run_dir: Path, stages: list[Stage], plan: dict, only: str | None = None) -> None:
    """Run every stage in order (or only `only`); stops at the first failure with a UserError.

    `plan` (the resolved config that made these stages) is written beside them to RUN_DIR/pipeline.json.
    """
    run_dir = Path(run_dir)
    by_name = {stage.name: stage for stage in stages}
    if only is not None and only not in by_name:
        raise UserError(f"no stage named {only!r}; the stages are: {', '.join(by_name)}")
    chosen = [by_name[only]] if only else stages
    _join_process_group()
    # A whole run owns run_dir; one-stage runs (the cluster's jobs) share it, each owning its stage's directory.
    with owned(run_dir, shared=only is not None):
        for stage in chosen:  # refuse changed settings before the plan is rewritten: it describes the run that finished
            _done_with_todays_settings(stage, run_dir / stage.name)
        write_plan(run_dir, plan, stages)
        for stage in chosen:
            run_stage(stage, run_dir)


def write_plan(run_dir: Path, config: dict, stages: list[Stage]) -> None:
    """RUN_DIR/pipeline.json: the resolved config and the stage list, which `twophase status` reads."""
    plan = {
        "config": redacted(config),
        "stages": [{"name": s.name, "needs": list(s.needs), "skip_reason": s.skip_reason} for s in stages],
        "written_at": now(),
    }
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 writes the run's files
        atomic_write_text(run_dir / PLAN_FILE, json.dumps(plan, indent=2) + "\n")


def _join_process_group() -> None:
    """Under torchrun all ranks run the stages together; they join before the first manifest is read."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from twophase.data.base import distributed

        distributed.start()


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
    from twophase.data.base.signals import sigterm_as_interrupt

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
        standalone = read_manifest(Path(run_dir))  # a `twophase dpo|grpo|eval` run's own manifest
        if standalone is not None:
            entry = {"name": standalone.get("stage", "run"), "needs": []}
            return [f"{entry['name']}  {describe_stage(Path(run_dir), entry)}"]
        raise UserError(f"{run_dir} is neither a pipeline run directory (no readable {PLAN_FILE}) nor a "
                        f"twophase dpo, grpo or eval run (no manifest.json)") from None  # fmt: skip
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
