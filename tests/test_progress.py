"""Progress on a terminal is a tqdm bar; in a log file (a pipe, an sbatch log) it is plain periodic lines."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from twophase.data.base.errors import UserError
from twophase.data.base.progress import PlainProgress, duration, interval_seconds, progress, say

ROOT = Path(__file__).resolve().parents[1]
ESCAPE = re.compile(r"\x1b\[")  # the start of an ANSI escape sequence, as tqdm and colour codes write them


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_plain_line_at_most_every_interval_and_one_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", "30")
    clock = FakeClock()
    bar = PlainProgress(desc="train", total=80, unit="step", clock=clock)
    for loss in (0.7, 0.69):  # steps 1 and 2, 10 and 20 s in: no line yet
        clock.now += 10
        bar.set_postfix({"loss": loss})
        bar.update()
    assert capsys.readouterr().err == ""
    clock.now += 10  # step 3, 30 s in
    bar.set_postfix(loss="0.6931")
    bar.update()
    assert capsys.readouterr().err == "train: step 3/80 (4%) | loss 0.6931 | 10 s/step | ETA 12m50s\n"
    bar.update(37)  # 40/80 in the same second: the last line is 0 s old
    assert capsys.readouterr().err == ""
    clock.now += 30
    bar.update(0)
    assert capsys.readouterr().err == "train: step 40/80 (50%) | loss 0.6931 | 1.5 s/step | ETA 1m00s\n"
    clock.now += 20
    bar.update(40)  # 20 s after the last line: none until the end
    assert capsys.readouterr().err == ""
    bar.close()
    bar.close()  # a second close prints nothing more
    assert capsys.readouterr().err == "train: step 80/80 (100%) | loss 0.6931 | 1 steps/s | took 1m20s\n"


def test_a_resumed_bar_rates_only_its_own_steps_and_an_inner_bar_leaves_no_end_line(monkeypatch, capsys):
    monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", "0")
    clock = FakeClock()
    resumed = PlainProgress(desc="train", total=10, initial=6, unit="step", clock=clock)
    clock.now += 4
    resumed.update()
    assert capsys.readouterr().err == "train: step 7/10 (70%) | 4 s/step | ETA 12s\n"
    inner = PlainProgress(range(3), desc="generate", leave=False, clock=clock)
    monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", "30")
    quiet = PlainProgress(range(3), desc="mmlu", leave=False, clock=clock)
    assert list(inner) == [0, 1, 2] and list(quiet) == [0, 1, 2]
    assert capsys.readouterr().err == ("generate: batch 1/3 (33%)\ngenerate: batch 2/3 (67%)\n"
                                       "generate: batch 3/3 (100%) | took 0s\n")  # fmt: skip


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("TWOPHASE_PROGRESS_SECONDS", raising=False)
    assert interval_seconds() == 30.0
    monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", "2.5")
    assert interval_seconds() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", bad)
        with pytest.raises(UserError, match=f"TWOPHASE_PROGRESS_SECONDS='{bad}': give the seconds between two"):
            interval_seconds()


def test_durations_read_in_the_two_largest_units():
    assert [duration(s) for s in (0.4, 12, 185, 7620)] == ["0s", "12s", "3m05s", "2h07m"]


def test_a_terminal_gets_the_bar_and_a_log_file_the_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(total=3, desc="train", unit="step")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    say("above the bar")
    assert capsys.readouterr().out == "above the bar\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(progress(range(4), desc="generate"), PlainProgress)
    assert progress(range(4), desc="generate").total == 4


def test_rank_other_than_zero_and_disabled_bars_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("TWOPHASE_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(progress(range(2), desc="small", disable=True)) == [0, 1]
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what launch/cli.py sets for ranks other than 0
    with progress(total=2, desc="train", unit="step") as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""


def _twophase_into_one_file(log: Path, *argv) -> str:
    """Run `twophase ARGV` with stdout and stderr in one file, as an sbatch log holds them; the file's text."""
    env = dict(os.environ, TWOPHASE_PROGRESS_SECONDS="0")
    env.pop("TQDM_DISABLE", None)
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "twophase.launch.cli", *argv], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, timeout=300)  # fmt: skip
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text
    assert "\r" not in text and not ESCAPE.search(text), text
    return text


def test_training_and_eval_logs_in_a_file_are_plain_lines(tiny_model_dir, tmp_path):
    settings = {"model": tiny_model_dir, "dataset": ROOT / "data" / "samples" / "lean_demo.jsonl", "max_steps": 3,
                "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 8, "device": "cpu", "precision": "fp32",
                "lora": "false", "reward": "toy", "log_every": 3, "out_dir": tmp_path / "grpo"}  # fmt: skip
    train = _twophase_into_one_file(tmp_path / "grpo.log", "grpo", *[f"--set={k}={v}" for k, v in settings.items()])
    number, rate = r"-?[\d.]+(e-?\d+)?", r"[\d.]+ (steps/s|s/step)"
    lines = [line for line in train.splitlines() if line.startswith("train: ")]
    assert len(lines) == 3, train
    for step, (line, end) in enumerate(zip(lines, ("ETA \\d+s", "ETA \\d+s", "took \\d+s")), start=1):
        percent = round(100 * step / 3)
        assert re.fullmatch(rf"train: step {step}/3 \({percent}%\) \| loss {number} \| reward/mean {number} "
                            rf"\| grad_norm {number} \| {rate} \| {end}", line), line  # fmt: skip
    assert re.search(r"^step 3 \| loss ", train, re.MULTILINE)  # the averaged line every log_every steps stays
    evaluated = _twophase_into_one_file(tmp_path / "eval.log", "eval", "--model", str(tiny_model_dir), "--out",
                                        str(tmp_path / "eval"), "--benchmarks", "xstest,mmlu", "--prompt-format", "hh",
                                        "--data-dir", str(ROOT / "eval" / "samples"), "--batch-size", "2",
                                        "--option", "max_new_tokens=4")  # fmt: skip
    assert re.search(r"^eval: benchmark 1/2 \(50%\) \| [\d.]+ (benchmarks/s|s/benchmark) \| ETA \d+s$", evaluated, re.M)
    assert re.search(r"^eval: benchmark 2/2 \(100%\) \| .* \| took \d+s$", evaluated, re.MULTILINE)
    assert re.search(r"^generate: batch 1/\d+ ", evaluated, re.MULTILINE)  # the engines' inner bars
    assert re.search(r"^mmlu: batch 1/\d+ ", evaluated, re.MULTILINE)
