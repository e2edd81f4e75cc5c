"""The command line: help texts, and one clear error line (exit 2, no traceback) for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from twophase.launch.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_every_command_has_help(capsys):
    for name in ("dpo", "merge", "demo"):
        main([name, "--help"])
        out = capsys.readouterr().out
        assert out.startswith("Usage: ") and f" {name} " in out and "--help" in out
    assert set(COMMANDS) >= {"dpo", "merge", "demo", "grpo", "eval", "compare"}


def test_unknown_config_key_lists_valid_keys(capsys):
    code, err = _run(capsys, "dpo", "--set", "learning_rate=1e-6")
    assert code == 2
    assert err.startswith("error: unknown config key(s) learning_rate") and "lr," in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_choice_and_bad_type(capsys):
    code, err = _run(capsys, "dpo", "--set", "loss_type=kto")
    assert code == 2 and "sigmoid, robust, ipo, hinge" in err
    code, err = _run(capsys, "dpo", "--set", "max_steps=many")
    assert code == 2 and "max_steps" in err and "int" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = _run(capsys, "dpo", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err


def test_missing_model_path_says_pass_a_local_path(capsys, tmp_path):
    code, err = _run(capsys, "dpo", "--set", f"model={tmp_path}/no/such/model", "--set", f"out_dir={tmp_path}/out")
    assert code == 2 and "does not exist" in err and "local" in err


def test_missing_dataset_file(capsys, tmp_path, tiny_model_dir):
    code, err = _run(
        capsys, "dpo", "--set", f"model={tiny_model_dir}", "--set", f"dataset={tmp_path}/pairs.jsonl",
        "--set", f"out_dir={tmp_path}/out", "--set", "device=cpu",
    )  # fmt: skip
    assert code == 2 and "pairs.jsonl" in err
    assert "Traceback" not in err


def test_merge_of_a_non_adapter_directory(capsys, tmp_path):
    code, err = _run(capsys, "merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"))
    assert code == 2 and "adapter_config.json" in err


def test_console_script_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "twophase.launch.cli", "dpo", "--set", "bogus=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown config key(s) bogus")
    assert "Traceback" not in result.stderr


def test_eval_flags_are_generated_from_eval_settings_and_set_reaches_every_key():
    import dataclasses

    from twophase.data.base.errors import UserError
    from twophase.eval.cli import FLAGS, eval_command, settings_from
    from twophase.eval.settings import EvalSettings

    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    params = {p.name: p for p in eval_command.params}
    for name in FLAGS:  # each flag carries its field's default and help
        assert params[name].default == fields[name].default and params[name].help == fields[name].metadata["help"]
    assert list(params["prompt_format"].type.choices) == ["hh", "chat", "raw", "auto"]
    settings = settings_from({"limit": 2, "judge_options": {"model": None}},
                             ("judge_options.min_mass=0", "benchmark_judges.betley=local:/j", "seed=3"))
    assert (settings.limit, settings.seed, settings.judge_options, settings.benchmark_judges) == (
        2, 3, {"model": None, "min_mass": 0}, {"betley": "local:/j"})
    with pytest.raises(UserError, match="EvalSettings has no key 'bogus'"):
        settings_from({}, ("bogus=1",))
