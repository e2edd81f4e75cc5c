"""One writer per run directory; refused runs write nothing; eval results and audits are replaced as a pair."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from twophase.data.base.errors import UserError
from twophase.data.base.run_dir import LOCK_FILE, owned
from twophase.eval.benchmarks import SAMPLES_DIR
from twophase.eval.benchmarks.xstest import XSTest
from twophase.eval.results import file_sha256, finished_result, read_json
from twophase.eval.runner import run_evaluation
from twophase.eval.settings import EvalSettings
from twophase.eval.sandbox.container import remove_stale_exec_folders
from twophase.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
HH_DEMO = str(ROOT / "data" / "samples" / "hh_demo.jsonl")
HOLD = "import sys; from twophase.data.base.run_dir import owned\nwith owned(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()"


def _cli(capsys, *argv, stdout_too: bool = False) -> tuple[int, str]:
    """The exit status and what was printed on stderr (and stdout before it, `stdout_too`)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, (captured.out if stdout_too else "") + captured.err


def _dpo_args(model_dir, out_dir, *extra):
    settings = dict(model=model_dir, dataset=HH_DEMO, out_dir=out_dir, max_steps=2, micro_batch_size=1, grad_accum_steps=1,
                    lora_r=2, lora_alpha=4, max_length=64, max_prompt_length=32, precision="fp32", device="cpu",
                    optimizer="adamw", merge_after="false", log_every=0)  # fmt: skip
    return ["dpo", *[a for key, value in settings.items() for a in ("--set", f"{key}={value}")], *extra]


class HeldElsewhere:
    """Another process holding a directory, as a second run would."""

    def __init__(self, directory):
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.process.stdout.readline() == "held\n"
        self.pid = self.process.pid

    def kill(self):  # SIGKILL: the process cannot release anything itself
        self.process.kill()
        self.process.wait()


def _files(directory: Path) -> dict[str, bytes]:
    """The run's files and their bytes (the lock file, which says who holds the directory, aside)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = HeldElsewhere(out)
    try:
        before = _files(out)
        for argv in (_dpo_args(tiny_model_dir, out),
                     ["eval", "--model", tiny_model_dir, "--benchmarks", "xstest", "--out", str(out)],
                     ["demo", "--out", str(out)]):  # fmt: skip  (a second demo on one folder: the same one line)
            code, err = _cli(capsys, *argv)
            assert code == 2 and err.count("\n") == 1
            assert err.startswith(f"error: {out} is in use by process {holder.pid} on ") and "choose another" in err
        assert _files(out) == before  # the refused runs wrote nothing
    finally:
        holder.kill()
    code, err = _cli(capsys, *_dpo_args(tiny_model_dir, out))  # the dead holder's lock went with it
    assert code == 0, err
    assert f"process {os.getpid()} on " in (out / LOCK_FILE).read_text()


def test_a_process_may_hold_its_directory_twice_but_not_a_file(tmp_path):
    with owned(tmp_path / "d") as first:
        with owned(tmp_path / "d") as again:  # the pipeline holds a stage, then the trainer inside it
            assert first == again
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with owned(tmp_path / "f"):
            pass
    with pytest.raises(UserError, match="a part of that path is a file"):
        with owned(tmp_path / "f" / "sub"):
            pass


def test_a_refused_run_leaves_the_finished_run_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(capsys, *_dpo_args(tiny_model_dir, out))[0] == 0
    finished = _files(out)
    code, err = _cli(capsys, *_dpo_args(tiny_model_dir, out, "--set", "lr=1e-3"))  # no --resume
    assert code == 2 and "--resume" in err
    assert _files(out) == finished  # config.json included: the provenance of the finished run is kept
    # --resume of another command, or with keys its checkpoints depend on changed: one line, nothing written
    grpo = ["grpo", "--set", f"model={tiny_model_dir}", "--set", f"out_dir={out}", "--set", "device=cpu", "--set",
            f"dataset={Path(HH_DEMO).with_name('lean_demo.jsonl')}", "--resume"]
    refusals = {
        "holds a run of another command (its config.json is not a grpo config)": grpo,
        "was trained with other settings that its checkpoints depend on (lora_r 2 -> 4; optimizer 'adamw' -> "
        "'adamw8bit'); resume with the run's own values": _dpo_args(tiny_model_dir, out, "--set", "lora_r=4", "--set",
                                                                 "optimizer=adamw8bit", "--resume"),
    }  # fmt: skip
    for says, argv in refusals.items():
        code, err = _cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert _files(out) == finished


@pytest.fixture(scope="module")
def tiny_eval_model(tmp_path_factory):
    from twophase.data.base.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_eval") / "model", with_chat_template=True)


def _evaluate(model, out, limit):
    return run_evaluation(model, out, EvalSettings("xstest", limit=limit, data_dir=SAMPLES_DIR, options={"max_new_tokens": 2}))


def test_an_interrupted_rerun_leaves_result_and_audit_as_a_pair(tiny_eval_model, tmp_path, monkeypatch):
    """The drill: a rerun with another --limit stopped mid-way must not empty the audit of a result that says done."""
    out = tmp_path / "eval"
    _evaluate(tiny_eval_model, out, limit=4)
    pair = _files(out)
    result = read_json(out / "xstest.json")
    assert result["audit_sha256"] == file_sha256(out / "xstest.jsonl") and result["audit_records"] == 4

    original = XSTest.evaluate

    def stopped_half_way(self, items, ctx):
        ctx.audit({"prompt": "a record of the new run"})
        raise KeyboardInterrupt

    monkeypatch.setattr(XSTest, "evaluate", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tiny_eval_model, out, limit=2)
    assert {k: v for k, v in _files(out).items() if k != "summary.json"} == {k: v for k, v in pair.items() if k != "summary.json"}

    calls = []
    monkeypatch.setattr(XSTest, "evaluate", lambda self, items, ctx: calls.append(1) or original(self, items, ctx))
    summary = _evaluate(tiny_eval_model, out, limit=4)
    assert calls == [] and summary["benchmarks"]["xstest"]["resumed"]  # the pair is whole: reused

    (out / "xstest.jsonl").write_text("")  # an audit that is not the result's own
    assert finished_result(out, "xstest", result["settings_hash"]) is None
    _evaluate(tiny_eval_model, out, limit=4)
    assert calls == [1] and len((out / "xstest.jsonl").read_text().splitlines()) == 4


def test_leftovers_of_killed_evaluations_are_removed(tiny_eval_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, other = (tmp_path / f"twophase-exec-{dead.pid}-a1", tmp_path / f"twophase-exec-{os.getpid()}-b2",
                          tmp_path / "twophase-exec-c3")  # fmt: skip
    for folder in (stale, live, other):
        (folder / "sub").mkdir(parents=True)
    out = tmp_path / "eval"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".xstest.jsonl.tmp123").write_text("{half")
    _evaluate(tiny_eval_model, out, limit=1)
    assert not stale.exists() and live.exists() and other.exists()  # only a dead evaluator's folders go
    assert not (out / ".xstest.jsonl.tmp123").exists()
    assert remove_stale_exec_folders() == []


def test_a_file_system_without_flock_runs_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / ".metrics.jsonl.x1.tmp").write_text("maybe another run's")
    with owned(tmp_path) as path:
        assert path == tmp_path
    err = capsys.readouterr().err
    assert err.startswith(f"warning: cannot lock {tmp_path / LOCK_FILE} (") and err.count("\n") == 1
    assert (tmp_path / ".metrics.jsonl.x1.tmp").exists()  # unguarded: nothing of anyone else's is removed


def test_eval_asks_a_twophase_model_in_the_format_it_was_trained_in(tiny_model_dir, tmp_path, capsys):
    """A model directory twophase wrote says how it was trained (twophase.json); `twophase eval` with the default
    --prompt-format auto asks in that format and says so; an explicit --prompt-format wins."""
    out = tmp_path / "dpo"
    args = _dpo_args(tiny_model_dir, out, "--set", "merge_after=true", "--set", "prompt_format=hh", "--set", "merge_dtype=float32")
    assert _cli(capsys, *args)[0] == 0
    recorded = json.loads((out / "merged" / "twophase.json").read_text())
    assert recorded == {"phase": "dpo", "prompt_format": "hh", "base_model": tiny_model_dir, "eval_prompt_format": "hh"}
    assert json.loads((out / "adapter" / "twophase.json").read_text()) == recorded
    for extra, expected in (((), "hh"), (("--prompt-format", "raw"), "raw")):
        evaluation = tmp_path / f"eval-{expected}"
        code = _cli(capsys, "eval", "--model", str(out / "merged"), "--benchmarks", "xstest", "--limit", "2",
                        "--data-dir", str(SAMPLES_DIR), "--option", "max_new_tokens=2", "--out", str(evaluation), *extra,
                    stdout_too=True)
        assert code[0] == 0, code
        assert json.loads((evaluation / "xstest.json").read_text())["prompt_format"] == expected
        said = "eval: asking in the hh format, the one " in code[1]
        assert said == (expected == "hh")
