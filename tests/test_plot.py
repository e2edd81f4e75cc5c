"""`twophase plot`: curves read from metrics.jsonl, one PNG with several runs overlaid; matplotlib optional."""

import json

import pytest

from twophase.launch.cli import main
from twophase.launch.plot import read_curves, training_runs


def write_metrics(run_dir, records, torn=False):
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + ('{"step": 9, "lo' if torn else "")
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_curves_and_runs_of_a_pipeline_directory(tmp_path):
    dpo = write_metrics(tmp_path / "run" / "dpo", [{"step": 1, "loss": 0.69, "rewards/accuracy": 0.5, "lr": 1e-3},
                                                    {"step": 2, "loss": 0.5, "rewards/accuracy": 1.0, "lr": 1e-3}], torn=True)
    grpo = write_metrics(tmp_path / "run" / "grpo_zero", [{"step": 1, "loss": 0.0, "reward/mean": 0.0, "kl": 0.25}])
    (tmp_path / "run" / "eval_dpo").mkdir()
    assert read_curves(dpo) == {"loss": ([1, 2], [0.69, 0.5]), "rewards/accuracy": ([1, 2], [0.5, 1.0]),
                                "lr": ([1, 2], [1e-3, 1e-3])}
    assert training_runs([tmp_path / "run"]) == [dpo, grpo]
    assert training_runs([grpo]) == [grpo]


def test_plot_writes_a_png_of_overlaid_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'twophase[plot]'), not installed here")
    runs = [write_metrics(tmp_path / name, [{"step": s, "loss": 1.0 / s, "reward/mean": s / 10, "grad_norm": 2.0,
                                             "tokens_per_s": 100.0} for s in (1, 2, 3)]) for name in ("grpo_random", "grpo_toy")]
    main(["plot", *map(str, runs), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'curves.png'} (2 run(s)")


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = write_metrics(tmp_path / "dpo", [{"step": 1, "loss": 0.7}])
    with pytest.raises(SystemExit) as stop:
        main(["plot", str(run)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: plots need matplotlib, an optional extra that is not installed: "
                                       "pip install 'twophase[plot]' (or pip install matplotlib)\n")


def test_tables_say_how_to_get_curves_without_matplotlib(tmp_path, monkeypatch):
    from twophase.launch.tables import training_curves

    run = write_metrics(tmp_path / "dpo", [{"step": 1, "loss": 0.7}])
    monkeypatch.setattr("twophase.launch.plot.plotting_available", lambda: False)
    assert training_curves([str(run)], tmp_path / "t_curves.png") == (
        None, "\nTraining curves: not drawn, matplotlib is not installed: pip install 'twophase[plot]' (or pip install matplotlib).\n")
    assert not (tmp_path / "t_curves.png").exists()
    assert training_curves([str(tmp_path / "nothing")], tmp_path / "t_curves.png") == (None, "")
