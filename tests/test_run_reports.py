"""What a run tells you: readable final numbers, the resume command on Ctrl-C, provenance of standalone runs,
optional TensorBoard logging."""

import json
from pathlib import Path

import pytest

from launch.cli import main
from launch.train import readable_number


@pytest.mark.parametrize("value, text", [
    (1e-06, "1e-06"), (-3.2e-05, "-3.2e-05"), (-0.0, "0"), (0.0, "0"), (0.123456, "0.1235"), (2.5, "2.5"),
    (12345.678, "12346"), (7, "7"), (float("nan"), "nan"),
])  # fmt: skip
def test_readable_number(value, text):
    assert readable_number(value) == text


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupted_run(config, resume=False):
        (out / "checkpoints" / "step-000003").mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("trainers.dpo.run_dpo", interrupted_run)
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--set", f"out_dir={out}", "--set", "max_steps=5"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the newest checkpoint is {out / 'checkpoints' / 'step-000003'}; continue with: "
        f"twophase dpo --set out_dir={out} --set max_steps=5 --resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["config"]["max_steps"] == 5


def test_standalone_training_records_provenance_and_tensorboard(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional package, not installed here")
    out = tmp_path / "grpo"
    data = Path(__file__).resolve().parents[1] / "data" / "samples" / "lean_demo.jsonl"
    main(["grpo", "--set", f"model={tiny_model_dir}", "--set", f"dataset={data}", "--set", f"out_dir={out}",
          "--set", "max_steps=2", "--set", "num_generations=2", "--set", "max_new_tokens=4", "--set", "device=cpu",
          "--set", "precision=fp32", "--set", "optimizer=adamw", "--set", "reward=toy", "--set", "seed=3",
          "--set", "report_to=[tensorboard]"])
    printed = capsys.readouterr().out
    assert "final step: " in printed and "lr 1e-06" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["stage"] == "grpo" and manifest["seed"] == 3
    assert manifest["versions"]["torch"] and manifest["git_commit"] and isinstance(manifest["command"], str)
    assert manifest["outputs"]["final"] == str(out / "model")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_reporter_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--set", f"out_dir={tmp_path / 'x'}", "--set", "report_to=[wandb]"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: report_to: wandb needs the wandb package, which is not installed: "
                                       "pip install wandb (or remove wandb from report_to)\n")
    assert not (tmp_path / "x").exists()
