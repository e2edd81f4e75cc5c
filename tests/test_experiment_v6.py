"""The next experiment (launch/configs/wu17_v6.yaml): a chat model, chat format end to end, Phase 1 optional;
its plan (`--dry-run`) and its miniature (`twophase demo --experiment v6`)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from twophase.launch.cli import cli
from twophase.launch.experiment import load_pipeline
from twophase.launch.manifest import read_manifest

V6 = Path(__file__).resolve().parents[1] / "launch" / "configs" / "wu17_v6.yaml"
WITHOUT_PHASE_ONE = ["eval_original", "grpo_fv", "eval_grpo_fv", "grpo_random", "eval_grpo_random", "grpo_zero",
                     "eval_grpo_zero", "tables"]  # fmt: skip


def _run(*argv) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of `twophase ARGV`."""
    result = CliRunner().invoke(cli, list(argv))
    return result.exit_code, result.stdout, result.stderr


def test_v6_starts_grpo_from_the_chat_model_in_chat_format_fv_first():
    config, stages = load_pipeline(V6)
    by_name = {stage.name: stage for stage in stages}
    assert [stage.name for stage in stages] == WITHOUT_PHASE_ONE
    assert by_name["grpo_fv"].skip_reason.startswith("no Lean project configured")
    for condition, reward in (("fv", "lean"), ("random", "random"), ("zero", "zero")):
        grpo = by_name[f"grpo_{condition}"]
        assert (grpo.settings["model"], grpo.settings["prompt_format"], grpo.settings["reward"]) == (
            "Qwen/Qwen2.5-7B-Instruct", "chat", reward)
        assert grpo.needs == ()
    assert {s.settings["prompt_format"] for s in stages if s.name.startswith("eval_")} == {"chat"}
    tables = by_name["tables"].settings["tables"]
    assert list(tables) == ["original_vs_grpo"]  # fv is skipped until its Lean project is set
    assert tables["original_vs_grpo"]["labels"] == ["Original", "GRPO random", "GRPO zero"]
    # dpo: null is the other way to say it
    _, same = load_pipeline(V6, ["dpo=null"])
    assert [stage.name for stage in same] == WITHOUT_PHASE_ONE


def test_v6_with_phase_one_trains_dpo_through_the_chat_template_and_becomes_v5s_shape():
    config, stages = load_pipeline(V6, ["phase1=true", "model=meta-llama/Meta-Llama-3-8B-Instruct"])
    by_name = {stage.name: stage for stage in stages}
    assert [s.name for s in stages][:4] == ["eval_original", "dpo", "eval_dpo", "eval_dpo_exact"]
    assert by_name["dpo"].settings["prompt_format"] == "chat" and by_name["dpo"].settings["data_dir"] == "harmless-base"
    assert by_name["dpo"].settings["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert by_name["grpo_random"].settings["model"] == str(Path(config.run_dir) / "dpo" / "merged")
    assert by_name["grpo_random"].needs == ("dpo",)
    assert list(by_name["tables"].settings["tables"]) == ["original_vs_dpo", "dpo_vs_grpo"]


def test_dry_run_lists_every_stage_with_its_settings_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = _run("pipeline", "--config", str(V6), "--dry-run", "--set", f"run_dir={run_dir}",
                          "--set", "grpo.algorithm=gspo")  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"{V6}: 8 stages in {run_dir} (dry run: nothing runs)")
    numbered = [line.split("  (")[0] for line in out.splitlines() if line[:1].isdigit()]
    assert numbered == [f"{n}. {name}" for n, name in enumerate(WITHOUT_PHASE_ONE, 1)]
    assert "2. grpo_fv  (skipped: no Lean project configured" in out and "4. grpo_random  (needs: nothing)" in out
    assert out.count("GRPO (gspo preset): ") == 3  # each GRPO stage's algorithm line, the preset expanded
    assert 'importance_ratio="sequence"' in out and "clip_low=0.0003" in out and 'prompt_format="chat"' in out
    assert 'model="Qwen/Qwen2.5-7B-Instruct"' in out and "max_new_tokens=1024" in out
    assert not run_dir.exists()
    code, _, err = _run("pipeline", "--config", str(V6), "--dry-run", "--set", "grpo.algorithm=ppo")
    assert code == 2 and "is not one of: grpo, dr_grpo, dapo, gspo" in err and len(err.strip().splitlines()) == 1


def test_demo_v6_runs_grpo_alone_in_chat_format_and_prints_its_table(tmp_path):
    out_dir = tmp_path / "demo_v6"
    smallest = ["grpo.max_steps=1", "grpo.num_generations=2", "grpo.max_new_tokens=4", "eval.limit=1",
                "eval.options.max_new_tokens=4", "eval.benchmarks=strongreject,xstest"]  # fmt: skip
    code, out, err = _run("demo", "--experiment", "v6", "--out", str(out_dir),
                          *[a for item in smallest for a in ("--set", item)])  # fmt: skip
    assert code == 0, err
    stages = ["eval_original", "grpo_fv_toy", "eval_grpo_fv_toy", "grpo_random", "eval_grpo_random", "grpo_zero",
              "eval_grpo_zero", "tables"]  # fmt: skip
    assert [read_manifest(out_dir / name)["status"] for name in stages] == ["done"] * len(stages)
    assert not (out_dir / "dpo").exists()
    header = ("| Benchmark | Metric | Original (prompts: chat) | GRPO fv_toy (prompts: chat) | Delta (GRPO fv_toy) "
              "| GRPO random (prompts: chat) |")  # fmt: skip
    assert header in out
    table = json.loads((out_dir / "tables" / "original_vs_grpo.json").read_text())
    assert table["base"] == "Original" and table["others"] == ["GRPO fv_toy", "GRPO random", "GRPO zero"]
    assert "What the table shows:\nPhase 2 (GRPO) from the model as it came, asked through its chat template" in out
    samples = [json.loads(line) for line in (out_dir / "grpo_fv_toy" / "samples.jsonl").read_text().splitlines()]
    assert set(samples[0]["rewards"]) == {"toy"}
    assert json.loads((out_dir / "grpo_fv_toy" / "config.json").read_text())["prompt_format"] == "chat"


@pytest.mark.parametrize("refusals, caveat", [(0.0, True), (0.5, False)])
def test_what_the_v6_table_shows_reads_its_numbers(tmp_path, refusals, caveat):
    from twophase.launch.demo import what_grpo_alone_shows

    labels = ["Original", "GRPO fv_toy", "GRPO random", "GRPO zero"]
    values = {"strongreject": [refusals, 0.25, refusals, refusals], "xstest": [0.0, 0.5, 0.0, 0.0]}
    rows = [{"benchmark": bench, "metric": metric, "values": {label: {"value": v} for label, v in zip(labels, values[bench])}}
            for bench, metric in (("strongreject", "refusal_rate"), ("xstest", "fpr"))]  # fmt: skip
    path = tmp_path / "original_vs_grpo.json"
    path.write_text(json.dumps({"base": "Original", "others": labels[1:], "rows": rows}))
    sentence = what_grpo_alone_shows(path)
    assert f"StrongREJECT refusals {refusals:.0%} before, after GRPO under fv_toy 25%, random {refusals:.0%}" in sentence
    assert "XSTest's refusals of safe prompts (FPR) 0% before, after GRPO under fv_toy 50%, random 0%, zero 0%" in sentence
    assert ("no safety training" in sentence) is caveat
