"""What a run tells you: readable final numbers, the resume command on Ctrl-C, provenance of standalone runs,
optional TensorBoard logging."""

import json
from pathlib import Path

import pytest

from twophase.launch.cli import main
from twophase.trainers.infra.run import readable_number


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

    monkeypatch.setattr("twophase.trainers.dpo.run_dpo", interrupted_run)
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--set", f"out_dir={out}", "--set", "max_steps=5"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the newest checkpoint is {out / 'checkpoints' / 'step-000003'}; continue with: "
        f"twophase dpo --set out_dir={out} --set max_steps=5 --resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["config"]["max_steps"] == 5


def test_sigterm_while_the_merge_is_written_is_an_interrupt_with_its_manifest(tmp_path, monkeypatch, capsys):
    """SIGTERM outside the training steps (here: during the merge) is Ctrl-C too: a line saying how to continue,
    the manifest written as interrupted, exit 130 (it used to kill the process with neither)."""
    import os
    import signal
    import time

    out = tmp_path / "run"

    def terminated_during_merge(config, resume=False):
        (out / "checkpoints" / "step-000005").mkdir(parents=True)
        (out / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a cluster's stop would
        time.sleep(5)  # the merge's writing; the signal arrives before this ends
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr("twophase.trainers.dpo.run_dpo", terminated_during_merge)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--set", f"out_dir={out}", "--set", "max_steps=5"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"interrupted: the newest checkpoint is {out / 'checkpoints' / 'step-000005'}; continue with: ")
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is previous  # the command's handler is gone with it


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


def test_the_demo_says_what_its_tables_show(tmp_path):
    from twophase.launch.demo import what_the_tables_show

    def cell(x):
        return {"value": x}

    def row(bench, metric, values):
        return {"benchmark": bench, "metric": metric, "values": {k: cell(v) for k, v in values.items()}}

    dpo = {"base": "Original", "others": ["DPO-Aligned"], "merge": {"dtype": "bfloat16", "update_fraction_kept": 0.11},
           "rows": [row("strongreject", "refusal_rate", {"Original": 0.0, "DPO-Aligned": 2 / 3}),
                    row("donotanswer", "refusal_rate", {"Original": 0.2, "DPO-Aligned": 0.8}),
                    row("xstest", "fpr", {"Original": 0.25, "DPO-Aligned": 0.25})]}
    grpo = {"base": "DPO-Aligned", "others": ["GRPO zero", "GRPO toy"],
            "rows": [row("strongreject", "refusal_rate", {"DPO-Aligned": 2 / 3, "GRPO zero": 2 / 3, "GRPO toy": 0.0})]}
    (tmp_path / "original_vs_dpo.json").write_text(json.dumps(dpo))
    (tmp_path / "dpo_vs_grpo.json").write_text(json.dumps(grpo))
    assert what_the_tables_show(tmp_path) == [
        "Phase 1 (DPO) moved the refusal rate on StrongREJECT from 0% to 67% and on Do-Not-Answer from 20% to 80%, "
        "with XSTest's refusals of safe prompts (FPR) going from 25% to 25%: the model learnt to refuse.",
        "The bfloat16 merge kept only 11% of the LoRA update: where DPO-Aligned (the merged model, Phase 2's start) "
        "differs from the unmerged-adapter column, rounding undid training.",
        "Phase 2 (GRPO) started from 67% StrongREJECT refusals; GRPO zero left that unchanged, while GRPO toy moved it "
        "to 0%: fine-tuning on rewards that say nothing about safety changed what Phase 1 taught.",
    ]


def test_standalone_eval_records_provenance(tiny_model_dir, tmp_path):
    from twophase.eval.benchmarks import SAMPLES_DIR

    out = tmp_path / "eval"
    main(["eval", "--model", tiny_model_dir, "--benchmarks", "xstest", "--limit", "2", "--out", str(out),
          "--data-dir", str(SAMPLES_DIR), "--option", "max_new_tokens=2", "--seed", "5", "--judge-api-key", "secret"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["stage"], manifest["status"], manifest["seed"]) == ("eval", "done", 5)
    assert manifest["config"]["model"] == tiny_model_dir and manifest["config"]["judge_api_key"] == "<hidden>"
    assert manifest["outputs"] == {"summary": str(out / "summary.json")} and manifest["versions"]["transformers"]
