"""No loss window in checkpointing: a stop at any moment resumes bit-exactly.

Each test stops a tiny DPO run at a named moment of a step (reached by wrapping
the loop's functions from here: the step itself holds no test hooks) or of a
checkpoint write (trainers/infra/checkpoint.py: `moment`), deterministically:

* a signal: SIGTERM is sent to this process at that moment, as a cluster's
  preemption would; the run must leave a checkpoint of the last finished step;
* a kill: the output directory is copied as it is at that moment (what SIGKILL
  would leave on disk) and the run is abandoned; the copy must resume.

Every resumed run must end with the weights of an uninterrupted run, bit for
bit, and the same per-step losses in metrics.jsonl.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import twophase.trainers.infra.checkpoint as checkpoint
import twophase.trainers.loop as loop
from twophase.trainers.infra.run import MetricsLog
from twophase.data.base.errors import UserError
from twophase.data.base.run_dir import LOCK_FILE
from twophase.trainers.infra.checkpoint import checkpoint_problem, list_checkpoints, sha256_of
from twophase.trainers.config import DPOConfig, make_config
from twophase.trainers.dpo import run_dpo
from twophase.trainers.infra.run import keep_records_up_to

SAMPLES = str(Path(__file__).resolve().parents[1] / "data" / "samples" / "hh_demo.jsonl")


def _config(model_dir, out_dir, **overrides):
    # 6 steps, a checkpoint every 2, only the newest kept: every save replaces the only checkpoint
    values = dict(
        model=model_dir, dataset=SAMPLES, out_dir=str(out_dir), max_steps=6, save_every=2, keep_checkpoints=1,
        micro_batch_size=1, grad_accum_steps=2, lr=2e-3, lora_r=2, lora_alpha=4, max_length=64, max_prompt_length=32,
        precision="fp32", device="cpu", log_every=0, optimizer="adamw", merge_after=False,
    )  # fmt: skip
    values.update(overrides)
    return make_config(DPOConfig, values)


def _adapter(out_dir):
    return load_file(str(Path(out_dir) / "adapter" / "adapter_model.safetensors"))


def _losses(out_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_dpo(_config(tiny_model_dir, out))
    return _adapter(out), _losses(out)


def _assert_same_run(out_dir, uninterrupted):
    weights, losses = uninterrupted
    resumed = _adapter(out_dir)
    assert resumed.keys() == weights.keys()
    for name in weights:
        assert torch.equal(resumed[name], weights[name]), name
    assert _losses(out_dir) == losses


class Killed(BaseException):
    """A kill: nothing of the run's own clean-up may run (no `except Exception` catches this)."""


class StopAt:
    """Hooks on named moments: SIGTERM at `signal_at`, a kill at `kill_at` (each a (moment, step) pair)."""

    def __init__(self, signal_at=None, kill_at=None, killed_copy=None):
        self.signal_at, self.kill_at, self.killed_copy = signal_at, kill_at, killed_copy
        self.out_dir = None
        self.reached = []

    def __call__(self, name, step):
        if (name, step) == self.signal_at:
            self.reached.append("signal")
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this call returns
        if (name, step) == self.kill_at:
            self.reached.append("kill")
            shutil.copytree(self.out_dir, self.killed_copy)  # the disk as SIGKILL would leave it
            raise Killed


def stop_at_moments(monkeypatch, hook):
    """Call hook(name, step) at the named moments of a step, by wrapping the loop's own functions, and of a save."""
    monkeypatch.setattr(checkpoint, "MOMENT_HOOKS", [hook])
    current = {}
    accumulate, step_, write = loop._accumulate_gradients, loop._Training._step, MetricsLog.write

    def accumulated(recipe, step, autocast):
        collected = accumulate(recipe, step, autocast)
        current["step"] = step + 1
        hook("step:before_update", step + 1)
        return collected

    def stepped(self, step):
        metrics = step_(self, step)
        hook("step:after_record", step + 1)
        return metrics

    def written(self, metrics):
        hook("step:before_record", metrics["step"])
        write(self, metrics)

    monkeypatch.setattr(loop, "_accumulate_gradients", accumulated)
    monkeypatch.setattr(loop._Training, "_step", stepped)
    monkeypatch.setattr(MetricsLog, "write", written)
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: hook("step:after_optimizer", current["step"]))
    return handle


def _run_stopped(model_dir, out_dir, monkeypatch, stop: StopAt):
    stop.out_dir = out_dir
    handle = stop_at_moments(monkeypatch, stop)
    try:
        with pytest.raises((KeyboardInterrupt, Killed)):
            run_dpo(_config(model_dir, out_dir))
    finally:
        handle.remove()
        monkeypatch.undo()


def _newest(out_dir) -> int:
    newest = list_checkpoints(Path(out_dir) / "checkpoints")[-1]
    assert checkpoint_problem(newest) is None
    return int(newest.name.split("-")[1])


# (moment, step) -> the checkpoint a SIGTERM there must leave: the last finished step.
SIGNALS = {
    ("step:before_update", 5): 4,  # step 5's update not applied: checkpoint 4 (already on disk) is it
    ("step:after_optimizer", 5): 5,  # applied: the step is finished and recorded first
    ("step:before_record", 5): 5,
    ("step:after_record", 5): 5,
    ("save:weights", 4): 4,  # during the periodic checkpoint: it is completed, not lost
    ("save:optimizer", 4): 4,
    ("save:state", 4): 4,
    ("save:manifest", 4): 4,
    ("save:renamed", 4): 4,
    ("prune:moved", 2): 4,  # while the older checkpoint is being deleted
    ("save:state", 6): 6,  # during the final checkpoint
}


@pytest.mark.parametrize("moment,expected", SIGNALS.items(), ids=[f"{m}@{s}" for m, s in SIGNALS])
def test_a_signal_at_any_moment_leaves_the_last_finished_step(moment, expected, tiny_model_dir, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    stop = StopAt(signal_at=moment)
    _run_stopped(tiny_model_dir, out, monkeypatch, stop)
    assert stop.reached == ["signal"]
    assert _newest(out) == expected
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{expected:06d}"]  # nothing half-written
    assert [step for step, _ in _losses(out)] == list(range(1, expected + 1))
    run_dpo(_config(tiny_model_dir, out), resume=True)
    _assert_same_run(out, uninterrupted)


def test_a_signal_during_optimizer_step_waits_for_the_step(tiny_model_dir, tmp_path, monkeypatch, uninterrupted):
    """SIGTERM from inside optimizer.step() (its pre-hook) of step 5: step 5 is completed and checkpointed."""
    calls = []

    def signal_on_fifth_update(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    handle = register_optimizer_step_pre_hook(signal_on_fifth_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_dpo(_config(tiny_model_dir, tmp_path / "run"))
    finally:
        handle.remove()
    assert _newest(tmp_path / "run") == 5
    run_dpo(_config(tiny_model_dir, tmp_path / "run"), resume=True)
    _assert_same_run(tmp_path / "run", uninterrupted)


# A kill at these moments, alone or after a SIGTERM (its checkpoint being written): resume must be exact.
KILLS = {
    "periodic save: weights written": (None, ("save:weights", 4)),
    "periodic save: manifest written, not renamed": (None, ("save:manifest", 4)),
    "periodic save: renamed, older one not deleted": (None, ("save:renamed", 4)),
    "older checkpoint renamed away, not deleted": (None, ("prune:moved", 2)),
    "in the middle of a step": (None, ("step:after_optimizer", 5)),
    "SIGTERM, then a kill while the interrupt checkpoint is written": (("step:after_record", 5), ("save:state", 5)),
    "SIGTERM, then a kill while the interrupt checkpoint replaces the only one": (("step:after_record", 5), ("prune:moved", 4)),
}


@pytest.mark.parametrize("signal_at,kill_at", KILLS.values(), ids=list(KILLS))
def test_a_kill_at_any_moment_resumes_exactly(signal_at, kill_at, tiny_model_dir, tmp_path, monkeypatch, uninterrupted):
    killed = tmp_path / "killed"
    stop = StopAt(signal_at=signal_at, kill_at=kill_at, killed_copy=killed)
    _run_stopped(tiny_model_dir, tmp_path / "run", monkeypatch, stop)
    assert stop.reached[-1] == "kill"
    assert _newest(killed) >= 2  # an intact checkpoint is always there: never back to step 0
    run_dpo(_config(tiny_model_dir, killed), resume=True)
    _assert_same_run(killed, uninterrupted)
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-000006"]  # leftovers removed at start


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dir, tmp_path_factory):
    """A finished run that kept checkpoints 4 and 6."""
    out = tmp_path_factory.mktemp("two") / "run"
    run_dpo(_config(tiny_model_dir, out, keep_checkpoints=2))
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 9] ^= 0x01  # inside the data, past any header
    path.write_bytes(bytes(data))


def _rewrite_manifest(checkpoint, step=None):
    """The manifest made to match the files as they are now (and to name `step`, if given)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["bytes"], entry["sha256"] = (checkpoint / name).stat().st_size, sha256_of(checkpoint / name)
    manifest["step"] = manifest["step"] if step is None else step
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _state_of_step_4(checkpoint):
    shutil.copy(checkpoint.parent / "step-000004" / "state.pt", checkpoint / "state.pt")
    _rewrite_manifest(checkpoint)


DAMAGES = {
    "truncated weights": (lambda c: _truncate(c / "trainable.safetensors"), "trainable.safetensors has"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt has"),
    "truncated state": (lambda c: _truncate(c / "state.pt"), "state.pt has"),
    "missing weights": (lambda c: (c / "trainable.safetensors").unlink(), "trainable.safetensors is missing"),
    "missing state": (lambda c: (c / "state.pt").unlink(), "state.pt is missing"),
    "flipped bit in weights": (lambda c: _flip_a_byte(c / "trainable.safetensors"), "trainable.safetensors does not match"),
    "flipped bit in optimizer": (lambda c: _flip_a_byte(c / "optimizer.pt"), "optimizer.pt does not match"),
    "garbled manifest": (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    "no manifest, truncated weights": (
        lambda c: ((c / "manifest.json").unlink(), _truncate(c / "trainable.safetensors")), "manifest.json is missing"),
    "no manifest, a flipped bit": (
        lambda c: ((c / "manifest.json").unlink(), _flip_a_byte(c / "trainable.safetensors")), "manifest.json is missing"),
    "step 4's state in step 6, manifest rewritten": (_state_of_step_4, "its state.pt is of step 4, not 6"),
    "manifest of another step": (lambda c: _rewrite_manifest(c, step=4), "its manifest.json is of step 4, not 6"),
}  # fmt: skip


@pytest.mark.parametrize("damage,reason", DAMAGES.values(), ids=list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_one_line(damage, reason, two_checkpoints, tiny_model_dir, tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    damage(out / "checkpoints" / "step-000006")
    with open(out / "metrics.jsonl", "a") as log:  # and the log's last record torn by the same crash
        log.write('{"step": 7, "loss": 0.69')
    capsys.readouterr()
    run_dpo(_config(tiny_model_dir, out), resume=True)
    lines = capsys.readouterr().out.splitlines()
    damaged = [line for line in lines if " is damaged (" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"checkpoint {out / 'checkpoints' / 'step-000006'} is damaged (")
    assert reason in damaged[0] and damaged[0].endswith("; skipping it")
    assert any(line.startswith(f"resumed from {out / 'checkpoints' / 'step-000004'} (step 4)") for line in lines)
    assert sum("dropped a torn last line" in line for line in lines) == 1
    _assert_same_run(out, uninterrupted)
    assert checkpoint_problem(out / "checkpoints" / "step-000006") is None  # rewritten whole


def test_with_every_checkpoint_damaged_the_run_starts_over(two_checkpoints, tiny_model_dir, tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for step in ("step-000004", "step-000006"):
        _truncate(out / "checkpoints" / step / "optimizer.pt")
    run_dpo(_config(tiny_model_dir, out), resume=True)
    lines = capsys.readouterr().out.splitlines()
    assert sum(" is damaged (" in line for line in lines) == 2
    assert f"no intact checkpoint in {out / 'checkpoints'}: starting from step 0" in lines
    _assert_same_run(out, uninterrupted)


def test_checkpoints_that_is_not_a_folder_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    with pytest.raises(UserError, match=r"checkpoints is not a directory, so it cannot hold this run's checkpoints"):
        run_dpo(_config(tiny_model_dir, out), resume=True)


def test_torn_and_damaged_log_lines(tmp_path, capsys):
    log = tmp_path / "samples.jsonl"
    records = [{"step": s, "completion": "é" * 3} for s in (1, 1, 2, 3)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    log.write_bytes(text.encode() + '{"step": 4, "completion": "é'.encode()[:-1])  # cut inside a UTF-8 character
    keep_records_up_to(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
    assert capsys.readouterr().out.count("dropped a torn last line") == 1
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="record 2 of .* is not a step record"):
        keep_records_up_to(log, 2)
    # a last line that parses but is no step record ({}, null, a record without "step") is dropped alike
    for last in ("{}", "null", '{"completion": "x"}', '{"step": "3"}', '[1, 2]'):
        log.write_text('{"step": 1}\n{"step": 2}\n' + last + "\n")
        keep_records_up_to(log, 2)
        assert log.read_text() == '{"step": 1}\n{"step": 2}\n', last
    assert capsys.readouterr().out.count("dropped a torn last line") == 5
    log.write_text('{"step": 1}\n{}\n{"step": 2}\n')
    with pytest.raises(UserError, match="record 2 of .* is not a step record"):
        keep_records_up_to(log, 2)


def test_leftovers_of_killed_runs_are_removed_at_start(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    leftovers = [out / "checkpoints" / ".step-000004.tmp-k2x9_a", out / ".model.tmp-abc123", out / ".adapter.old-4242"]
    for folder in leftovers:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights").write_bytes(b"partial")
    files = [out / ".metrics.jsonl.x8_2k.tmp", out / ".xstest.jsonl.tmp777"]
    for file in files:
        file.write_text("partial")
    kept = [out / ".notes", out / "notes.tmp"]  # not names of our temporaries
    for file in kept:
        file.write_text("mine")
    run_dpo(_config(tiny_model_dir, out, max_steps=2))
    assert not any(path.exists() for path in leftovers + files)
    assert all(path.read_text() == "mine" for path in kept)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".notes", "notes.tmp", LOCK_FILE, "adapter", "checkpoints", "config.json", "metrics.jsonl"]
    )


def test_grpo_signal_after_an_update_inside_a_generation_batch(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO with μ = 2: SIGTERM after step 3's update (step 4 reuses step 3's rollout) resumes exactly, samples included."""
    from twophase.trainers.config import GRPOConfig
    from twophase.trainers.grpo import run_grpo

    def config(out):
        return make_config(GRPOConfig, dict(
            model=tiny_model_dir, dataset=str(Path(SAMPLES).with_name("lean_demo.jsonl")), out_dir=str(out), max_steps=4,
            num_iterations=2, prompts_per_step=1, num_generations=2, max_new_tokens=4, micro_batch_size=2, lr=1e-2,
            reward="random", precision="fp32", device="cpu", save_every=0, log_every=0, optimizer="adamw", lora=False,
        ))  # fmt: skip

    straight = run_grpo(config(tmp_path / "straight"))
    handle = stop_at_moments(monkeypatch, StopAt(signal_at=("step:after_optimizer", 3)))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_grpo(config(tmp_path / "run"))
    finally:
        handle.remove()
        monkeypatch.undo()
    assert _newest(tmp_path / "run") == 3
    resumed = run_grpo(config(tmp_path / "run"), resume=True)
    a = load_file(str(Path(straight["final"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final"]) / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert Path(resumed["samples"]).read_text() == Path(straight["samples"]).read_text()
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")
