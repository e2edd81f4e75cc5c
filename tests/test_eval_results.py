"""Result files, resume, failed benchmarks, the comparison table, and the engine benchmark."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from twophase.data.base.tiny import write_tiny_model
from twophase.launch.bench.engines import bench_engines
from twophase.eval.benchmarks import SAMPLES_DIR
from twophase.eval.benchmarks.xstest import XSTest
from twophase.eval.cli import compare_command
from twophase.eval.benchmarks.metrics import Metric, proportion
from twophase.eval.results import intervals_disjoint, read_json, render_comparison, stable_hash, write_json_atomic
from twophase.eval.runner import run_evaluation
from twophase.eval.settings import EvalSettings


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", with_chat_template=True)


def test_write_json_atomic_leaves_no_temp_file_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"m": proportion(0, 0), "x": float("nan"), "t": (1, 2)})
    assert json.loads(path.read_text()) == {"m": {"value": None, "k": 0, "n": 0, "ci_low": None, "ci_high": None},
                                            "x": None, "t": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1}) != stable_hash({"a": 1, "b": 3})


def test_run_evaluation_results_resume_and_failures(tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kwargs = dict(data_dir=SAMPLES_DIR, options={"max_new_tokens": 8}, batch_size=4)
    # betley needs a 0-100 judge: with string matching it is skipped as "no judge configured", the others finish.
    summary = run_evaluation(tiny_path, out, EvalSettings("xstest,betley,strongreject", **kwargs), run_name="Original")
    statuses = {name: entry["status"] for name, entry in summary["benchmarks"].items()}
    assert statuses == {"xstest": "ok", "betley": "skipped", "strongreject": "ok"}
    assert summary["benchmarks"]["betley"]["reason"] == "no judge configured"
    betley = read_json(out / "betley.json")
    assert betley["status"] == "skipped" and betley["metric_names"] == ["p_misaligned", "mean_alignment", "mean_coherence", "excluded"]

    result = read_json(out / "xstest.json")
    assert result["model"] == tiny_path and result["n_items"] == 8
    assert set(result["metrics"]) == {"accuracy", "fpr", "fnr"}
    accuracy = result["metrics"]["accuracy"]
    assert accuracy["n"] == 8 and accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]
    assert result["prompt_hash"].startswith("sha256:") and result["settings_hash"].startswith("sha256:")
    assert result["settings"]["source"].endswith("xstest.csv") and result["settings"]["options"] == {"max_new_tokens": 8}
    audit = [json.loads(line) for line in (out / "xstest.jsonl").read_text().splitlines()]
    assert len(audit) == 8 and {"prompt", "response", "refused", "unsafe"} <= set(audit[0])
    assert audit[0]["response"] and read_json(out / "summary.json")["run_name"] == "Original"

    # Rerun with the same settings (another benchmark's option aside): nothing is evaluated again.
    monkeypatch.setattr(XSTest, "evaluate", lambda self, items, ctx: 1 / 0)
    again = run_evaluation(tiny_path, out, EvalSettings("xstest", **{**kwargs, "options": {"max_new_tokens": 8, "mmlu.num_shots": 3}}),
                           run_name="Original")
    assert again["benchmarks"]["xstest"] == {**summary["benchmarks"]["xstest"], "resumed": True}
    assert read_json(out / "xstest.json") == result
    assert read_json(out / "summary.json")["benchmarks"]["strongreject"]["status"] == "ok"  # kept

    # Different settings: it runs again (and here fails, with its reason recorded).
    changed = run_evaluation(tiny_path, out, EvalSettings("xstest", **{**kwargs, "limit": 4}), run_name="Original")
    assert changed["benchmarks"]["xstest"]["status"] == "failed"
    assert changed["benchmarks"]["xstest"]["reason"] == "ZeroDivisionError: division by zero"


def test_prompt_hash_follows_the_prompt_format(tiny_path, tmp_path):
    common = dict(data_dir=SAMPLES_DIR, options={"max_new_tokens": 2}, limit=2)
    run_evaluation(tiny_path, tmp_path / "a", EvalSettings("xstest", prompt_format="chat", **common))
    run_evaluation(tiny_path, tmp_path / "b", EvalSettings("xstest", prompt_format="raw", **common))
    run_evaluation(tiny_path, tmp_path / "c", EvalSettings("xstest", prompt_format="auto", **common))
    hashes = [read_json(tmp_path / d / "xstest.json")["prompt_hash"] for d in "abc"]
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]


# --------------------------------------------------------------------------- comparison table


def write_run(run_dir: Path, name: str, results: dict) -> Path:
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / "summary.json", {"run_name": name, "benchmarks": {}})
    for bench, metrics in results.items():
        if metrics is None:
            write_json_atomic(run_dir / f"{bench}.json", {"benchmark": bench, "status": "failed", "reason": "judge down"})
        else:
            write_json_atomic(run_dir / f"{bench}.json", {"benchmark": bench, "status": "ok", "metrics": metrics})
    return run_dir


def test_comparison_table_exact_markdown(tmp_path):
    base = write_run(tmp_path / "base", "Original", {
        "xstest": {"accuracy": proportion(251, 450), "fpr": proportion(0, 250)},
        "betley": {"mean_alignment": Metric(80.0, None, 100, 77.5, 82.5)},
        "mmlu": {"accuracy": proportion(50, 100)},
    })
    other = write_run(tmp_path / "dpo", "DPO-Aligned", {
        "xstest": {"accuracy": proportion(400, 450), "fpr": proportion(2, 250)},
        "betley": {"mean_alignment": Metric(81.25, None, 100, 79.0, 83.5)},
        "mmlu": None,
    })
    expected = (
        "| Benchmark | Metric | Original | DPO-Aligned | Delta |\n"
        "|---|---|---|---|---|\n"
        "| Emergent misalignment (Betley et al.) | mean_alignment | 80.0 [77.5, 82.5] | 81.2 [79.0, 83.5] | +1.2 |\n"
        "| XSTest | accuracy | 0.558 [0.512, 0.603] | 0.889 [0.856, 0.915] | **+0.331** |\n"
        "| XSTest | fpr | 0.000 [0.000, 0.015] | 0.008 [0.002, 0.029] | +0.008 |\n"
        "| MMLU | accuracy | 0.500 [0.404, 0.596] | failed | — |\n"
    )
    assert render_comparison(base, [other]) == expected

    result = CliRunner().invoke(compare_command, [str(base), str(other), "--out", str(tmp_path / "table.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "table.md").read_text() == expected and expected in result.output


def test_comparison_with_two_other_runs_and_names(tmp_path):
    base = write_run(tmp_path / "a", "A", {"xstest": {"fnr": proportion(10, 20)}})
    b = write_run(tmp_path / "b", "B", {"xstest": {"fnr": proportion(0, 20)}})
    c = write_run(tmp_path / "c", "C", {"xstest": {"fnr": proportion(11, 20)}})
    table = render_comparison(base, [b, c], ["Original", "DPO", "GRPO"])
    assert table.splitlines()[0] == "| Benchmark | Metric | Original | DPO | Delta (DPO) | GRPO | Delta (GRPO) |"
    assert table.splitlines()[2].endswith("| **-0.500** | 0.550 [0.342, 0.742] | +0.050 |")


def test_interval_overlap_rule():
    a, b = Metric(0.1, 1, 10, 0.0, 0.2), Metric(0.5, 5, 10, 0.3, 0.7)
    assert intervals_disjoint(a, b) and intervals_disjoint(b, a)
    assert not intervals_disjoint(a, Metric(0.3, 3, 10, 0.2, 0.4))  # touching counts as overlapping
    assert not intervals_disjoint(a, Metric(0.5, None, 1, math.nan, math.nan))


# --------------------------------------------------------------------------- engine benchmark


def test_bench_engines_runs_on_cpu(tiny_path):
    from twophase.data.base.hub import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_path), load_tokenizer(tiny_path)
    report = bench_engines(model, tok, loglik_batch_size=2, gen_batch_size=2, n_questions=3,
                           context_tokens=64, max_new_tokens=5)
    ll, gen = report["loglikelihood"], report["generation"]
    assert report["device"] == "cpu" and ll["requests"] == 12 and not ll["oom"]
    assert ll["questions_per_s"] > 0 and ll["tokens_per_s"] > 0 and ll["peak_memory_gib"] is None
    assert gen["generated_tokens"] == 3 * 5 and gen["tokens_per_s"] > 0  # EOS ignored: every token generated


def test_mean_interval_is_clipped_to_the_values_range():
    from twophase.eval.benchmarks.metrics import mean_metric

    m = mean_metric([0.0, 0.0, 0.0, 1.0], bounds=(0.0, 1.0))
    assert m.value == 0.25
    # unclipped: 0.25 ± 1.96·0.5/2 = [-0.24, 0.74]
    assert m.ci_low == 0.0 and abs(m.ci_high - (0.25 + 1.959963984540054 * 0.5 / 2)) < 1e-9
    assert mean_metric([0.0, 0.0, 0.0, 1.0]).ci_low < 0


def test_eval_is_importable_without_the_trainers():
    """eval/ stands alone: importing all of it pulls in nothing from trainers/ or launch/."""
    import subprocess
    import sys

    code = (
        "import sys, twophase.eval.runner, twophase.eval.cli, twophase.eval.benchmarks, twophase.eval.judges\n"
        "import twophase.eval.engine.loglikelihood, twophase.eval.engine.generation\n"
        "import twophase.eval.benchmarks.humaneval, twophase.eval.benchmarks.mmlu, twophase.eval.benchmarks.betley\n"
        "print(sorted(m for m in sys.modules if m.split('.')[1:2] in (['trainers'], ['launch'])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_judge_groups_share_one_loaded_model(tiny_path, tmp_path, monkeypatch):
    """Betley gets a local judge, XSTest the phrase list: two judge groups, one evaluated model loaded once."""
    import twophase.data.base.hub as hub
    import twophase.eval.judges as judges

    loads = []
    real = hub.load_causal_lm
    for module, who in ((hub, "evaluated"), (judges, "judge")):
        monkeypatch.setattr(module, "load_causal_lm", lambda name, *a, who=who, **k: loads.append(who) or real(name, *a, **k))
    settings = EvalSettings("xstest,betley", limit=2, data_dir=SAMPLES_DIR, samples_per_question=1,
                            options={"max_new_tokens": 4}, benchmark_judges={"betley": {"kind": "local", "model": tiny_path}})  # fmt: skip
    assert [(kind, names) for kind, _, names in settings.checked().judge_groups()] == [("string-match", ["xstest"]), ("local", ["betley"])]
    summary = run_evaluation(tiny_path, tmp_path / "run", settings)
    assert {name: entry["status"] for name, entry in summary["benchmarks"].items()} == {"xstest": "ok", "betley": "ok"}
    assert loads == ["evaluated", "judge"]  # once each, although two judge groups ran
    assert read_json(tmp_path / "run" / "betley.json")["settings"]["judge"]["kind"] == "local"
    assert read_json(tmp_path / "run" / "xstest.json")["settings"]["judge"]["kind"] == "string-match"


def test_compare_refuses_runs_evaluated_with_different_settings(tmp_path, capsys):
    from twophase.launch.cli import main

    def run(name, model, limit, prompt_format="hh"):
        directory = write_run(tmp_path / name, name, {"xstest": {"fnr": proportion(1, 4)}})
        result = read_json(directory / "xstest.json")
        settings = {"benchmark": "xstest", "model": model, "limit": limit, "seed": 0, "source_digest": "sha256:ab",
                    "prompt_format": prompt_format}  # fmt: skip
        write_json_atomic(directory / "xstest.json", {**result, "settings": settings})
        return str(directory)

    base, same, other = run("a", "m1", 4), run("b", "m2", 4), run("c", "m2", 8)
    with pytest.raises(SystemExit):  # every setting that differs is named, not only the first
        main(["compare", base, run("d", "m2", 8, "chat")])
    assert "(xstest: limit 4 vs 8; xstest: prompt_format \"hh\" vs \"chat\")" in capsys.readouterr().err
    main(["compare", base, same])  # only the model differs: compared
    assert "| XSTest | fnr |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["compare", base, other])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "error: the runs were evaluated with different settings, so the table would not compare the models alone "
        "(xstest: limit 4 vs 8); rerun them alike, or pass --force to compare anyway\n")
    main(["compare", base, other, "--force"])
    captured = capsys.readouterr()
    assert "warning: compared despite different settings: xstest: limit 4 vs 8" in captured.err
    assert "| XSTest | fnr |" in captured.out


def test_a_delta_that_rounds_to_zero_has_no_minus_sign():
    from twophase.eval.results import _delta

    base, lower = Metric(0.25, None, 4, 0.0, 0.74), Metric(0.2499999, None, 4, 0.0, 0.74)
    assert _delta(base, lower, ".3f") == "+0.000"
    assert _delta(base, Metric(0.2494, None, 4, 0.0, 0.74), ".3f") == "-0.001"
    assert _delta(Metric(0.0, 0, 5, 0.0, 0.43), Metric(1.0, 5, 5, 0.57, 1.0), ".3f") == "**+1.000**"
