"""`twophase pipeline`, `twophase status` and `twophase demo`: stages, manifests, skipping, resume, failures.

Most tests replace the stage functions by fakes that record their calls, so
they test the pipeline's bookkeeping in milliseconds; one resumes a real DPO
stage, and one runs the whole demo at its smallest size.
"""

import dataclasses
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import twophase.launch.experiment as experiment
import twophase.launch.stages as stages_module
from twophase.launch.cli import main
from twophase.launch.manifest import PACKAGES, read_manifest
from twophase.trainers.config import DPOConfig, GRPOConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
HH_DEMO = str(ROOT / "data" / "samples" / "hh_demo.jsonl")
LEAN_DEMO = str(ROOT / "data" / "samples" / "lean_demo.jsonl")
STAGES = ["eval_original", "dpo", "eval_dpo", "eval_dpo_exact", "grpo_random", "eval_grpo_random", "grpo_zero", "eval_grpo_zero", "tables"]


def _write_config(tmp_path, model="unused-by-fakes", **sections) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": model,
        "seed": 7,
        "eval": {"benchmarks": "xstest", "limit": 1, "data_dir": str(ROOT / "eval" / "samples")},
        "dpo": {"dataset": HH_DEMO, "max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 1, "lora_r": 4,
                "lora_alpha": 8, "max_length": 128, "max_prompt_length": 64, "precision": "fp32", "device": "cpu",
                "optimizer": "adamw", "log_every": 0, "save_every": 0, "lr": 1e-3},
        "grpo": {"dataset": LEAN_DEMO, "max_steps": 2, "device": "cpu", "precision": "fp32"},
        "conditions": {"random": {"reward": "random"}, "zero": {"reward": "zero"}},
    }  # fmt: skip
    for name, values in sections.items():
        config[name] = values
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class FakeStages:
    """Stand-ins for the four kinds of stage: each records (stage, resume) and writes one output file."""

    def __init__(self, monkeypatch, fail: dict | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail = dict(fail or {})  # stage name -> exception to raise (once)
        for name in ("run_eval_stage", "run_dpo_stage", "run_grpo_stage", "run_tables_stage"):
            monkeypatch.setattr(experiment, name, self.run)

    def run(self, settings, stage_dir, resume):
        self.calls.append((stage_dir.name, resume))
        if stage_dir.name in self.fail:
            error = self.fail.pop(stage_dir.name)
            if isinstance(error, KeyboardInterrupt):  # interrupted mid-way, after a checkpoint
                (stage_dir / "checkpoints" / "step-000002").mkdir(parents=True)
            raise error
        output = stage_dir / "output.txt"
        output.write_text(f"{stage_dir.name}\n")
        return {"output": str(output)}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_done_stages_are_skipped_on_rerun(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    code, out, _ = _run(capsys, "pipeline", "--config", str(config))
    assert code == 0
    assert fakes.names() == STAGES  # every stage once, in order
    fakes.calls.clear()
    code, out, _ = _run(capsys, "pipeline", "--config", str(config))
    assert code == 0 and fakes.names() == ["tables"]  # the tables are always rebuilt from the evals
    assert out.count("done earlier") == len(STAGES) - 1
    # a done stage whose output disappeared is not done any more
    (tmp_path / "run" / "eval_dpo" / "output.txt").unlink()
    fakes.calls.clear()
    _run(capsys, "pipeline", "--config", str(config))
    assert fakes.names() == ["eval_dpo", "tables"]


def test_manifest_records_config_code_versions_seed_and_times(tmp_path, monkeypatch, capsys):
    FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--set", "dpo.max_steps=5")
    assert code == 0
    manifest = read_manifest(tmp_path / "run" / "dpo")
    assert manifest["stage"] == "dpo" and manifest["status"] == "done" and manifest["attempt"] == 1
    assert manifest["config"]["max_steps"] == 5 and manifest["config"]["seed"] == 7  # resolved, override included
    assert manifest["config"]["out_dir"] == str(tmp_path / "run" / "dpo") and manifest["seed"] == 7
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert manifest["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert set(manifest["versions"]) == {"python", *PACKAGES}
    assert manifest["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    started, finished = (datetime.fromisoformat(manifest[k]) for k in ("started_at", "finished_at"))
    assert started <= finished and manifest["seconds"] >= 0
    assert manifest["outputs"] == {"output": str(tmp_path / "run" / "dpo" / "output.txt")}
    assert manifest["reason"] is None
    grpo = read_manifest(tmp_path / "run" / "grpo_zero")
    assert grpo["config"]["model"] == str(tmp_path / "run" / "dpo" / "merged") and grpo["config"]["reward"] == "zero"
    assert grpo["needs"] == ["dpo"]
    plan = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["name"] for s in plan["stages"]] == STAGES


def test_a_failed_stage_stops_the_pipeline_and_leaves_earlier_outputs_intact(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch, fail={"dpo": RuntimeError("disk full")})
    config = _write_config(tmp_path)
    code, _, err = _run(capsys, "pipeline", "--config", str(config))
    assert code == 2
    assert err.startswith("error: stage dpo failed: RuntimeError: disk full") and err.count("\n") == 1
    assert fakes.names() == ["eval_original", "dpo"]  # nothing after the failure ran
    run = tmp_path / "run"
    failed = read_manifest(run / "dpo")
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: disk full"
    assert "disk full" in failed["traceback"]
    earlier = read_manifest(run / "eval_original")
    assert earlier["status"] == "done" and (run / "eval_original" / "output.txt").read_text() == "eval_original\n"
    assert not (run / "eval_dpo").exists()
    status = "\n".join(stages_module.status_lines(run))
    assert "failed" in status and "disk full" in status and "pending (after dpo)" in status
    # fixed: the rerun starts at the failed stage and runs the rest
    fakes.calls.clear()
    code, _, _ = _run(capsys, "pipeline", "--config", str(config))
    assert code == 0 and fakes.names() == STAGES[1:]
    assert read_manifest(run / "dpo")["attempt"] == 2 and read_manifest(run / "dpo")["resumed_from"] == "failed"
    assert read_manifest(run / "eval_original")["started_at"] == earlier["started_at"]


def test_an_interrupted_stage_resumes_on_rerun(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch, fail={"grpo_random": KeyboardInterrupt()})
    config = _write_config(tmp_path)
    code, _, err = _run(capsys, "pipeline", "--config", str(config))
    assert code == 130 and "interrupted: stage grpo_random stopped, its newest checkpoint is " in err
    assert "checkpoints/step-" in err and "; continue with the same command: twophase " in err
    run = tmp_path / "run"
    assert read_manifest(run / "grpo_random")["status"] == "interrupted"
    assert fakes.calls[-1] == ("grpo_random", False)
    fakes.calls.clear()
    _run(capsys, "pipeline", "--config", str(config))
    assert fakes.calls[0] == ("grpo_random", True)  # resumed from the checkpoint the interrupted run left
    assert [name for name, _ in fakes.calls] == STAGES[4:]


def test_a_killed_stage_left_running_is_resumed(tmp_path, monkeypatch, capsys):
    """SIGKILL or a node failure leaves the manifest at "running": the process is gone, so a rerun resumes it."""
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_original")
    stage_dir = tmp_path / "run" / "dpo"
    (stage_dir / "checkpoints" / "step-000002").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manifest = read_manifest(tmp_path / "run" / "eval_original") | {"stage": "dpo", "status": "running", "pid": dead.pid}
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "a rerun resumes it" in "\n".join(stages_module.status_lines(tmp_path / "run"))
    fakes.calls.clear()
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")
    assert code == 0 and fakes.calls == [("dpo", True)]
    assert read_manifest(stage_dir)["resumed_from"] == "running"


def test_a_stage_still_running_in_a_live_process_is_not_started_twice(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_original")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        manifest = read_manifest(tmp_path / "run" / "eval_original") | {"stage": "dpo", "status": "running", "pid": alive.pid}
        (tmp_path / "run" / "dpo").mkdir()
        (tmp_path / "run" / "dpo" / "manifest.json").write_text(json.dumps(manifest))
        code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")
    finally:
        alive.kill()
        alive.wait()
    assert code == 2 and f"running in process {alive.pid}" in err
    assert fakes.names() == ["eval_original"]


def test_one_stage_alone_needs_the_stages_before_it(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_dpo")
    assert code == 2 and "needs dpo done first" in err and fakes.calls == []
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")
    assert code == 0 and fakes.names() == ["dpo"]
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_dpo")
    assert code == 0 and fakes.names() == ["dpo", "eval_dpo"]
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "nope")
    assert code == 2 and "no stage named 'nope'" in err and "grpo_zero" in err


def test_a_done_stage_with_changed_settings_is_an_error_not_a_silent_skip(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo", "--set", "dpo.max_steps=9")
    assert code == 2 and "max_steps: 3 -> 9" in err and "manifest.json" in err
    assert fakes.names() == ["dpo"]


def test_unknown_and_pipeline_owned_keys_are_one_line_errors(tmp_path, capsys):
    config = _write_config(tmp_path)
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--set", "dpo.learning_rate=1")
    assert code == 2 and "unknown config key(s) learning_rate" in err and "(dpo section)" in err and "lr," in err
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--set", "eval.bogus=1")
    assert code == 2 and "unknown config key(s) bogus" in err and "benchmarks" in err
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--set", "grpo.out_dir=/x")
    assert code == 2 and "grpo.out_dir" in err and "pipeline sets this" in err
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--set", "conditions.zero.reward_options.x=1",
                        "--set", "conditions.zero.num_generation=3")  # fmt: skip
    assert code == 2 and "num_generation" in err and "conditions.zero" in err
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--set", "stages=3")
    assert code == 2 and "unknown config key(s) stages" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_published_pipeline_is_the_published_phase_configs():
    config, stages = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml")
    by_name = {stage.name: stage for stage in stages}
    paths = ("model", "out_dir")  # where the pipeline puts things; the per-phase files name runs/wu17_v5/...
    dpo = dataclasses.asdict(load_config(DPOConfig, CONFIGS / "wu17_v5_dpo.yaml"))
    assert {k: v for k, v in by_name["dpo"].settings.items() if k not in paths} == {k: v for k, v in dpo.items() if k not in paths}
    for condition in ("random", "zero", "fv"):
        grpo = dataclasses.asdict(load_config(GRPOConfig, CONFIGS / f"wu17_v5_grpo_{condition}.yaml"))
        mine = by_name[f"grpo_{condition}"].settings
        assert {k: v for k, v in mine.items() if k not in paths} == {k: v for k, v in grpo.items() if k not in paths}
        assert mine["model"] == str(Path(config.run_dir) / "dpo" / "merged")
    assert by_name["eval_original"].settings["model"] == "deepseek-ai/DeepSeek-Prover-V2-7B"
    assert by_name["eval_original"].settings["judge"] == "string-match"
    # fv waits for a Lean project; it is skipped, and the tables leave it out
    assert "no Lean project" in by_name["grpo_fv"].skip_reason and by_name["eval_grpo_fv"].skip_reason
    assert "eval_grpo_fv" not in by_name["tables"].needs
    _, stages = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml", ["conditions.fv.reward_options.lean.project_dir=/opt/m"])
    fv = next(stage for stage in stages if stage.name == "grpo_fv")
    assert fv.skip_reason is None and fv.settings["reward_options"]["lean"]["pool_size"] == 8


def test_skipped_stage_is_reported_and_not_run(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    conditions = {"zero": {"reward": "zero"}, "fv": {"reward": "lean", "reward_options": {"lean": {"project_dir": None}}}}
    config = _write_config(tmp_path, conditions=conditions)
    code, out, _ = _run(capsys, "pipeline", "--config", str(config))
    assert code == 0 and "grpo_fv" not in fakes.names() and "eval_grpo_fv" not in fakes.names()
    assert "[grpo_fv] skipped: no Lean project configured" in out
    assert read_manifest(tmp_path / "run" / "grpo_fv")["status"] == "skipped"
    code, out, _ = _run(capsys, "status", str(tmp_path / "run"))
    assert code == 0 and len(out.splitlines()) == 9
    assert [line.split()[0] for line in out.splitlines()] == STAGES[:4] + ["grpo_zero", "eval_grpo_zero", "grpo_fv", "eval_grpo_fv", "tables"]
    assert "skipped: no Lean project" in out.splitlines()[6] and out.splitlines()[0].split()[1] == "done"


def test_status_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    code, _, err = _run(capsys, "status", str(tmp_path))
    assert code == 2 and "is neither a pipeline run directory" in err


def test_status_of_a_standalone_run_shows_its_manifest(tmp_path, capsys):
    from twophase.launch.manifest import finish, start_manifest, write_manifest

    write_manifest(tmp_path, finish(start_manifest("grpo", {"lr": 1e-6}, 0, [], None), "interrupted", reason="SIGTERM"))
    code, out, _ = _run(capsys, "status", str(tmp_path))
    assert code == 0 and out.split()[:2] == ["grpo", "interrupted"]


def test_api_keys_never_reach_the_run_directory(tmp_path, monkeypatch, capsys):
    FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_original", "--set", "eval.judge_options.api_key=sk-secret")
    assert "sk-secret" not in (tmp_path / "run" / "eval_original" / "manifest.json").read_text()
    assert "sk-secret" not in (tmp_path / "run" / "pipeline.json").read_text()


def test_interrupted_dpo_stage_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A real DPO stage stopped by Ctrl-C during step 3 continues from step 2 and ends with the merged model."""
    from twophase.trainers.dpo import DPORecipe

    original_loss, steps = DPORecipe.loss, []

    def loss_interrupted_on_third_step(self, micro_batch):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return original_loss(self, micro_batch)

    monkeypatch.setattr(DPORecipe, "loss", loss_interrupted_on_third_step)
    config = _write_config(tmp_path, model=tiny_model_dir)
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo", "--set", "dpo.max_steps=4")
    stage_dir = tmp_path / "run" / "dpo"
    assert code == 130 and read_manifest(stage_dir)["status"] == "interrupted"
    assert (stage_dir / "checkpoints" / "step-000002").is_dir() and not (stage_dir / "merged").exists()
    monkeypatch.setattr(DPORecipe, "loss", original_loss)
    code, out, _ = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo", "--set", "dpo.max_steps=4")
    assert code == 0 and "resuming from its last checkpoint" in out
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "done" and manifest["attempt"] == 2 and manifest["resumed_from"] == "interrupted"
    assert (stage_dir / "merged" / "config.json").exists() and manifest["outputs"]["merged"] == str(stage_dir / "merged")


def test_demo_runs_the_whole_pipeline_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    smallest = ["dpo.max_steps=2", "grpo.max_steps=1", "grpo.num_generations=2", "grpo.max_new_tokens=4",
                "eval.limit=1", "eval.options.max_new_tokens=4"]  # fmt: skip
    code, out, err = _run(capsys, "demo", "--out", str(out_dir), *[a for item in smallest for a in ("--set", item)])
    assert code == 0, err
    # not a terminal (capsys): progress is plain lines, without a bar's carriage returns and escape codes
    assert "\r" not in out + err and "\x1b[" not in out + err
    assert "train: step 2/2 (100%)" in err and "train: step 1/1 (100%)" in err and "eval: benchmark 8/8 (100%)" in err
    # the curves beside the tables (matplotlib comes with the Quickstart's `plot` extra and the tests' `dev` extra)
    assert (out_dir / "tables" / "dpo_vs_grpo_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Training curves (grpo_random, grpo_zero, grpo_toy): [dpo_vs_grpo_curves.png](dpo_vs_grpo_curves.png)" in out
    expected = ["eval_original", "dpo", "eval_dpo", "eval_dpo_exact", "grpo_random", "eval_grpo_random", "grpo_zero",
                "eval_grpo_zero", "grpo_toy", "eval_grpo_toy", "tables"]  # fmt: skip
    assert [read_manifest(out_dir / name)["status"] for name in expected] == ["done"] * len(expected)
    # every benchmark ran on every model, and the HumanEval programs were executed
    for name in expected:
        if name.startswith("eval_"):
            summary = json.loads((out_dir / name / "summary.json").read_text())
            assert {b: e["status"] for b, e in summary["benchmarks"].items()} == dict.fromkeys(
                ["betley", "strongreject", "xstest", "donotanswer", "truthfulqa", "humaneval", "mmlu", "wmdp"], "ok")
    verdict = json.loads((out_dir / "eval_dpo" / "humaneval.jsonl").read_text().splitlines()[0])["verdicts"][0]
    assert verdict == "passed" or verdict.startswith("failed")
    # Betley was scored by the tiny judge: its mean scores are numbers, in every run
    betley = json.loads((out_dir / "eval_dpo" / "betley.json").read_text())
    assert betley["settings"]["judge"]["kind"] == "local" and betley["metrics"]["mean_alignment"]["n"] == 1
    assert 0 <= betley["metrics"]["mean_coherence"]["value"] <= 100 and betley["prompt_format"] == "hh"
    # the tables, printed and written in both forms, with the prompt format and the merge's survival fraction
    header = "| Benchmark | Metric | Original (prompts: hh) | DPO-Aligned (prompts: hh) | Delta (DPO-Aligned) |"
    assert header + " DPO-Aligned (adapter, unmerged) (prompts: hh) |" in out
    merge = json.loads((out_dir / "dpo" / "merged" / "merge_report.json").read_text())
    assert f"keep {merge['update_fraction_kept']:.1%} of the LoRA update" in out
    assert json.loads((out_dir / "tables" / "original_vs_dpo.json").read_text())["merge"] == merge
    assert "| GRPO random (prompts: hh) | Delta (GRPO random) | GRPO zero (prompts: hh) |" in out and "GRPO toy" in out
    table = json.loads((out_dir / "tables" / "dpo_vs_grpo.json").read_text())
    assert table["base"] == "DPO-Aligned" and table["others"] == ["GRPO random", "GRPO zero", "GRPO toy"]
    xstest = next(row for row in table["rows"] if (row["benchmark"], row["metric"]) == ("xstest", "accuracy"))
    assert set(xstest["values"]) == {"DPO-Aligned", "GRPO random", "GRPO zero", "GRPO toy"}
    assert xstest["delta"]["GRPO toy"] == pytest.approx(xstest["values"]["GRPO toy"]["value"] - xstest["values"]["DPO-Aligned"]["value"])
    assert (out_dir / "tables" / "original_vs_dpo.md").read_text().startswith(header)
    assert (out_dir / "demo.yaml").exists() and str(out_dir) in out
    # rerun: everything is done, nothing runs again
    code, out, _ = _run(capsys, "demo", "--out", str(out_dir), *[a for item in smallest for a in ("--set", item)])
    assert code == 0 and out.count("done earlier") == len(expected) - 1 and out.count("starting") == 1  # the tables
    assert header in out


def test_adding_a_condition_to_a_finished_run_runs_only_it_and_rebuilds_the_tables(tmp_path, monkeypatch, capsys):
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    _run(capsys, "pipeline", "--config", str(config))
    fakes.calls.clear()
    code, _, _ = _run(capsys, "pipeline", "--config", str(config), "--set", "conditions.toy.reward=toy")
    assert code == 0 and fakes.names() == ["grpo_toy", "eval_grpo_toy", "tables"]
    tables = read_manifest(tmp_path / "run" / "tables")
    assert tables["attempt"] == 2 and str(tmp_path / "run" / "eval_grpo_toy") in tables["config"]["tables"]["dpo_vs_grpo"]["runs"]


def _settings_of(stage):
    from twophase.eval.settings import EvalSettings

    return EvalSettings(**{k: v for k, v in stage.settings.items() if k not in ("model", "run_name")})


def test_evals_ask_in_the_format_phase_one_trained_with_and_betley_waits_for_a_judge():
    config, stages = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml")
    by_name = {stage.name: stage for stage in stages}
    assert by_name["dpo"].settings["prompt_format"] == "hh"
    evals = [s for s in stages if s.name.startswith("eval_")]
    assert {s.settings["prompt_format"] for s in evals} == {"hh"}
    _, chat_stages = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml", ["dpo.prompt_format=chat"])
    assert {s.settings["prompt_format"] for s in chat_stages if s.name.startswith("eval_")} == {"chat"}
    # every benchmark runs; Betley has no judge until its model is set, then a local judge of its own
    assert by_name["eval_dpo"].settings["benchmarks"].split(",") == list(pipeline_benchmarks())
    assert _settings_of(by_name["eval_dpo"]).judge_groups() == [("string-match", {}, list(pipeline_benchmarks()))]
    _, judged = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml", ["eval.benchmark_judges.betley.model=/models/judge"])
    groups = _settings_of(next(s for s in judged if s.name == "eval_dpo")).judge_groups()
    assert groups[0] == ("local", {"model": "/models/judge"}, ["betley"]) and groups[1][0] == "string-match"
    # the bf16 merge gets its exact twin, evaluated as the unmerged adapter in float32
    exact = by_name["eval_dpo_exact"].settings
    assert exact["model"].endswith("dpo/adapter") and exact["dtype"] == "float32"
    assert by_name["dpo"].settings["merge_dtype"] == "bfloat16"
    _, fp32 = experiment.load_pipeline(CONFIGS / "wu17_v5.yaml", ["merge_dtype=float32"])
    assert "eval_dpo_exact" not in [s.name for s in fp32]


def pipeline_benchmarks():
    from twophase.eval.benchmarks import ALL

    return ALL


def test_a_refused_rerun_keeps_the_plan_of_the_finished_run(tmp_path, monkeypatch, capsys):
    FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    assert _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")[0] == 0
    plan = (tmp_path / "run" / "pipeline.json").read_bytes()
    code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo", "--set", "dpo.max_steps=9")
    assert code == 2 and "max_steps: 3 -> 9" in err
    assert (tmp_path / "run" / "pipeline.json").read_bytes() == plan  # still the plan of the run that finished


def test_one_writer_per_run_directory_and_per_stage(tmp_path, monkeypatch, capsys):
    """A whole run owns run_dir; stage jobs share it and each owns its stage (twophase slurm runs them side by side)."""
    fakes = FakeStages(monkeypatch)
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    hold = "import sys; from twophase.data.base.run_dir import owned\nwith owned(sys.argv[1], sys.argv[2] == 'shared'):\n    print('held', flush=True); sys.stdin.read()"

    def held_elsewhere(directory, mode):
        process = subprocess.Popen([sys.executable, "-c", hold, str(directory), mode], cwd=ROOT, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert process.stdout.readline() == "held\n"
        return process

    stage_job = held_elsewhere(run_dir, "shared")  # another stage job is running
    try:
        code, _, err = _run(capsys, "pipeline", "--config", str(config))
        assert code == 2 and f"in use by process {stage_job.pid}" in err and fakes.calls == []
        assert not (run_dir / "pipeline.json").exists()
        assert _run(capsys, "pipeline", "--config", str(config), "--stage", "eval_original")[0] == 0
    finally:
        stage_job.kill()
        stage_job.wait()
    same_stage = held_elsewhere(run_dir / "dpo", "exclusive")  # a job of the same stage
    try:
        code, _, err = _run(capsys, "pipeline", "--config", str(config), "--stage", "dpo")
        assert code == 2 and f"{run_dir / 'dpo'} is in use by process {same_stage.pid}" in err
    finally:
        same_stage.kill()
        same_stage.wait()
    assert fakes.names() == ["eval_original"]
