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


DPO_STEP = {"loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margin": 0.2, "rewards/accuracy": 0.5,
            "grad_norm": 1.5, "tokens_per_s": 300.0}  # fmt: skip
GRPO_STEP = {"loss": 0.0, "reward/mean": 0.4, "reward/std": 0.25, "grad_norm": 0.9, "tokens_per_s": 120.0,
             "generation_tokens_per_s": 80.0}  # fmt: skip


def test_each_phase_has_its_own_labelled_panels_and_each_run_one_colour(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'twophase[plot]'), not installed here")
    from twophase.launch.plot import draw_figure

    dpo = write_metrics(tmp_path / "dpo", [{"step": s, **DPO_STEP} for s in (1, 2)])
    grpo = [write_metrics(tmp_path / name, [{"step": s, **GRPO_STEP, "kl": 0.01 * s} for s in (1, 2, 3)])
            for name in ("grpo_zero", "grpo_toy")]  # fmt: skip
    figure = draw_figure([dpo, *grpo])
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert list(panels) == [
        "DPO loss", "DPO implicit rewards", "DPO reward accuracy (share of pairs ranked right)",
        "DPO grad norm (before clipping)", "DPO throughput (trained tokens/s)",
        "GRPO loss", "GRPO reward (over the step's completions)", "GRPO KL to the reference",
        "GRPO grad norm (before clipping)", "GRPO throughput (tokens/s)",
    ]  # fmt: skip
    lines = {title: {line.get_label(): line for line in axis.lines} for title, axis in panels.items()}
    # a phase's quantities only in its own row: DPO's run on no GRPO axis, and the other way round
    assert {title: sorted(drawn) for title, drawn in lines.items() if title.startswith("DPO")} == {
        "DPO loss": ["dpo: loss"], "DPO implicit rewards": ["dpo: chosen", "dpo: margin", "dpo: rejected"],
        "DPO reward accuracy (share of pairs ranked right)": ["dpo: accuracy"],
        "DPO grad norm (before clipping)": ["dpo: grad norm"], "DPO throughput (trained tokens/s)": ["dpo: trained"]}
    reward = lines["GRPO reward (over the step's completions)"]
    assert sorted(reward) == ["grpo_toy: mean", "grpo_toy: std", "grpo_zero: mean", "grpo_zero: std"]
    assert list(reward["grpo_toy: mean"].get_ydata()) == [0.4] * 3 and list(reward["grpo_toy: std"].get_ydata()) == [0.25] * 3
    assert list(lines["GRPO KL to the reference"]["grpo_zero: KL"].get_ydata()) == [0.01, 0.02, 0.03]
    # one colour per run in every panel, a different one for each run; line styles tell a panel's quantities apart
    colours = {}
    for drawn in lines.values():
        for label, line in drawn.items():
            colours.setdefault(label.split(": ")[0], set()).add(line.get_color())
    assert colours == {"dpo": {"C0"}, "grpo_zero": {"C1"}, "grpo_toy": {"C2"}}
    assert [reward[f"grpo_zero: {name}"].get_linestyle() for name in ("mean", "std")] == ["-", "--"]
    assert [text.get_text() for text in panels["GRPO reward (over the step's completions)"].get_legend().get_texts()] == ["mean", "std"]
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["dpo", "grpo_zero", "grpo_toy"]
    assert [handle.get_color() for handle in legend.legend_handles] == ["C0", "C1", "C2"]


def test_one_phase_is_one_row_and_an_unlogged_quantity_says_so(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'twophase[plot]'), not installed here")
    from twophase.launch.plot import draw_figure

    grpo = write_metrics(tmp_path / "grpo_zero", [{"step": 1, **GRPO_STEP}])  # beta = 0: no KL
    figure = draw_figure([grpo])
    visible = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in visible][:3] == ["GRPO loss", "GRPO reward (over the step's completions)",
                                                         "GRPO KL to the reference"]  # fmt: skip
    assert len(visible) == 5 and not visible[2].lines
    assert [text.get_text() for text in visible[2].texts] == ["not logged by these runs"]


def test_a_run_without_a_phases_metrics_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'twophase[plot]'), not installed here")
    run = write_metrics(tmp_path / "other", [{"step": 1, "loss": 0.7}])
    with pytest.raises(SystemExit) as stop:
        main(["plot", str(run)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: {run}/metrics.jsonl has no step of a DPO or GRPO run (no rewards/accuracy or "
                                       f"reward/mean); pass the out_dir of a run that trained at least one step\n")  # fmt: skip


def test_the_quickstart_installs_what_draws_the_demos_curves():
    """The README's demo command installs an extra that brings matplotlib, so the demo's tables get their curves."""
    import configparser
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    quickstart = next(line for line in (root / "README.md").read_text().splitlines() if line.endswith("twophase demo"))
    extras = re.search(r"pip install torch==[\d.]+ -e \"?\.\[([\w,]+)\]\"? ", quickstart).group(1).split(",")
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    required = [r for extra in extras for r in setup["options.extras_require"][extra].split()]
    assert any(r.startswith("matplotlib") for r in required), quickstart
