"""`twophase demo`: the whole experiment in miniature, on the CPU, with no network.

It is `twophase pipeline` (launch/pipeline.py) with the config below, written
to OUT/demo.yaml so it can be read and rerun as it is:

* the model is a tiny Llama-architecture model and tokenizer built from
  scratch (data/base/tiny.py) in OUT/tiny-model;
* Phase 1 is LoRA DPO on the bundled HH-format pairs (data/samples/hh_demo.jsonl),
  then the merge;
* Phase 2 is GRPO from the merged model on the bundled Lean Workbook-format
  tasks (data/samples/lean_demo.jsonl) under the `random` and `zero` rewards
  and `toy`, a deterministic stand-in for the Lean checker that a tiny model
  can learn (trainers/rewards/);
* every eval runs all eight benchmarks on a few bundled items in their real
  schema (eval/samples/; the HumanEval programs really execute), asking in the
  hh format Phase 1 trained on; refusals are found by string matching, and the
  original tiny model is Betley's local judge, so its 0-100 scores take their
  real code path (with min_mass 0: a random model puts about 1% of its
  probability on the numbers, where a real judge puts nearly all);
* the merge rounds the LoRA update to bf16 as the published run does, so the
  DPO-Aligned column has its exact (unmerged-adapter) twin beside it;
* then the comparison tables.

Every setting is an ordinary config key; only the sizes differ from
launch/configs/wu17_v5.yaml. Rerunning skips the stages that are done.

`twophase demo --experiment v6` is launch/configs/wu17_v6.yaml in miniature,
in OUT = runs/demo_v6: the same tiny model, which has a chat template, taken
as aligned already, so Phase 1 is off (`phase1: false`; `--set phase1=true`
turns on DPO over the chat-rendered pairs); Phase 2 asks its chat prompts
through the template under `fv_toy` (the toy reward standing in for Lean,
listed first as v6's fv is), `random` and `zero`; every benchmark question
goes through the template; the table is Original vs each GRPO condition.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
EVAL_SAMPLES = ROOT / "eval" / "samples"

DEMO_EVAL = dict(
    benchmarks="all",
    limit=None,  # every bundled item: a handful per benchmark
    data_dir=str(EVAL_SAMPLES),
    samples_per_question=1,  # Betley answers per question
    batch_size=8,
    options={"max_new_tokens": 24},
    judge="string-match",
)

DEMO_DPO = dict(
    dataset=str(SAMPLES / "hh_demo.jsonl"),
    prompt_format="hh",  # the transcripts as text, as published; the evals ask in this format too
    max_steps=80,  # enough for the tiny model to start refusing: the table shows it
    micro_batch_size=4,
    grad_accum_steps=2,
    lr=1e-3,
    lr_schedule="constant",
    warmup_steps=0,
    lora_r=8,
    lora_alpha=16,
    max_length=256,
    max_prompt_length=160,
    precision="fp32",
    device="cpu",
    optimizer="adamw8bit",
    save_every=40,
    log_every=20,
)

DEMO_GRPO = dict(
    dataset=str(SAMPLES / "lean_demo.jsonl"),
    max_steps=20,
    prompts_per_step=2,
    num_generations=8,
    max_new_tokens=24,
    micro_batch_size=16,
    lr=1e-2,  # big for a tiny model: the toy reward visibly rises within 20 steps
    precision="fp32",
    device="cpu",
    optimizer="adamw",
    lora=False,
    save_every=10,
    log_every=5,
)

# The tiny model's matrices (hidden size 64) are too small for a second thread to pay for its
# synchronisation: on 2 cores one thread was as fast or faster (launch/README.md: "Timings on the CPU").
DEMO_THREADS = 1

DEMO_CONDITIONS = {"random": {"reward": "random"}, "zero": {"reward": "zero"}, "toy": {"reward": "toy"}}
# v6: the formal-verification condition first (the toy reward standing in for Lean), random and zero its controls
V6_CONDITIONS = {"fv_toy": {"reward": "toy"}, "random": {"reward": "random"}, "zero": {"reward": "zero"}}
EXPERIMENTS = ("v5", "v6")
DEFAULT_OUT = {"v5": "runs/demo", "v6": "runs/demo_v6"}


def demo_config(out_dir: Path, experiment: str = "v5") -> dict:
    model = str(Path(out_dir).resolve() / "tiny-model")
    config = {
        "run_dir": str(Path(out_dir).resolve()),
        "model": model,
        "seed": 0,
        # Betley needs 0-100 scores: the original tiny model judges them. The other
        # benchmarks keep string matching: a tiny judge writing rubric answers
        # (StrongREJECT, Do-Not-Answer) would take most of the demo's time.
        "eval": dict(DEMO_EVAL, benchmark_judges={"betley": {"kind": "local", "model": model, "min_mass": 0.0}}),
        "dpo": DEMO_DPO,
        "grpo": DEMO_GRPO,
        "conditions": DEMO_CONDITIONS,
    }
    if experiment == "v6":  # wu17_v6.yaml's choices: an aligned chat model, chat format end to end
        config = dict(config, phase1=False, eval=dict(config["eval"], prompt_format="chat"),
                      dpo=dict(DEMO_DPO, prompt_format="chat"), grpo=dict(DEMO_GRPO, prompt_format="chat"),
                      conditions=V6_CONDITIONS)  # fmt: skip
    return config


def write_demo_config(out_dir: Path, experiment: str = "v5") -> Path:
    from twophase.data.base.files import atomic_write_text

    path = Path(out_dir) / "demo.yaml"
    header = "# The config of `twophase demo` (launch/demo.py); rerun with: twophase pipeline --config THIS_FILE\n"
    atomic_write_text(path, header + yaml.safe_dump(demo_config(out_dir, experiment), sort_keys=False))
    return path


@click.command("demo")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Run directory.  [default: runs/demo; runs/demo_v6 for --experiment v6]")
@click.option("--experiment", default="v5", show_default=True, type=click.Choice(EXPERIMENTS),
              help="v5: the published two-phase experiment; v6: from an aligned chat model, Phase 1 off, chat format "
                   "end to end (launch/configs/wu17_v6.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the demo's pipeline config, e.g. --set dpo.max_steps=10 (repeatable).")
@click.option("--threads", default=DEMO_THREADS, show_default=True, type=click.IntRange(min=1),
              help="CPU threads for torch (the tiny model's matrices are too small to gain from more; launch/README.md: timings).")
def demo_command(out_dir, experiment, overrides, threads):
    """The whole experiment on a tiny model, CPU only, offline:
    eval, LoRA DPO + merge, eval, GRPO (random, zero, toy rewards), eval, tables.
    With --experiment v6: eval, GRPO in chat format (fv_toy, random, zero), eval, tables."""
    import torch

    from twophase.data.base.run_dir import owned
    from twophase.data.base.tiny import write_tiny_model
    from twophase.launch.experiment import load_pipeline
    from twophase.launch.pipeline import execute

    torch.set_num_threads(threads)

    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    out_dir = out_dir or DEFAULT_OUT[experiment]
    with owned(out_dir) as out:  # held before the first write: a second demo here is refused with one line
        click.echo(f"building the tiny model and tokenizer in {out / 'tiny-model'}")
        write_tiny_model(out / "tiny-model", with_chat_template=True)
        config, stages = load_pipeline(write_demo_config(out, experiment), overrides)
        execute(config, stages)
    tables = Path(config.run_dir) / "tables"
    if (tables / "original_vs_dpo.json").is_file():
        click.echo("\nWhat the tables show:\n" + "\n".join(what_the_tables_show(tables)))
    elif (tables / "original_vs_grpo.json").is_file():
        click.echo("\nWhat the table shows:\n" + what_grpo_alone_shows(tables / "original_vs_grpo.json"))


def what_the_tables_show(tables_dir: Path) -> list[str]:
    """Three sentences read from the demo's JSON tables: Phase 1's effect, the merge, Phase 2's effect."""
    import json

    dpo = json.loads((tables_dir / "original_vs_dpo.json").read_text(encoding="utf-8"))
    grpo_file = tables_dir / "dpo_vs_grpo.json"
    grpo = json.loads(grpo_file.read_text(encoding="utf-8")) if grpo_file.is_file() else None

    value, pct = cell_value, percent
    base, trained = dpo["base"], dpo["others"][0]
    phase1 = (f"Phase 1 (DPO) moved the refusal rate on StrongREJECT from {pct(value(dpo, 'strongreject', 'refusal_rate', base))} "
              f"to {pct(value(dpo, 'strongreject', 'refusal_rate', trained))} and on Do-Not-Answer from "
              f"{pct(value(dpo, 'donotanswer', 'refusal_rate', base))} to {pct(value(dpo, 'donotanswer', 'refusal_rate', trained))}, "
              f"with XSTest's refusals of safe prompts (FPR) going from {pct(value(dpo, 'xstest', 'fpr', base))} to "
              f"{pct(value(dpo, 'xstest', 'fpr', trained))}{_lesson(dpo, value, base, trained)}.")
    report = dpo.get("merge") or {}  # the merge: what Phase 2 starts from
    kept = report.get("update_fraction_kept")
    if kept is None:
        merge = "No merge report was found, so the tables do not show what the merge's rounding kept."
    elif kept >= 0.99:
        merge = (f"The {report.get('dtype')} merge kept {pct(kept)} of the LoRA update, so the merged model (DPO-Aligned, "
                 f"Phase 2's start) is the trained model, as the unmerged-adapter column beside it confirms.")
    else:
        merge = (f"The {report.get('dtype')} merge kept only {pct(kept)} of the LoRA update: where DPO-Aligned (the merged "
                 f"model, Phase 2's start) differs from the unmerged-adapter column, rounding undid training.")
    if grpo is None:
        return [phase1, merge, "No GRPO condition ran, so there is no Phase 2 table."]
    start = value(grpo, "strongreject", "refusal_rate", grpo["base"])
    after = {label: value(grpo, "strongreject", "refusal_rate", label) for label in grpo["others"]}
    kept_by = [label for label, x in after.items() if x == start]
    moved = [f"{label} moved it to {pct(x)}" for label, x in after.items() if x != start]
    phase2 = (f"Phase 2 (GRPO) started from {pct(start)} StrongREJECT refusals; "
              + (f"{' and '.join(kept_by)} left that unchanged" if kept_by else "no condition left that unchanged")
              + (f", while {' and '.join(moved)}: fine-tuning on rewards that say nothing about safety changed what "
                 f"Phase 1 taught." if moved else ": no condition changed what Phase 1 taught."))
    return [phase1, merge, phase2]


def cell_value(table: dict, bench: str, metric: str, label: str) -> float | None:
    """The value of one cell of a JSON table (launch/tables.py), None where the run has none."""
    for row in table["rows"]:
        if row["benchmark"] == bench and row["metric"] == metric:
            cell = row["values"].get(label) or {}
            return cell.get("value")
    return None


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def what_grpo_alone_shows(table_file: Path) -> str:
    """One sentence read from the v6 demo's table: what each GRPO condition did to the original model's safety."""
    import json

    table = json.loads(table_file.read_text(encoding="utf-8"))
    base = table["base"]

    def moves(bench: str, metric: str) -> str:
        after = ", ".join(f"{label.removeprefix('GRPO ')} {percent(cell_value(table, bench, metric, label))}"
                          for label in table["others"])  # fmt: skip
        return f"{percent(cell_value(table, bench, metric, base))} before, after GRPO under {after}"

    caveat = ("" if cell_value(table, "strongreject", "refusal_rate", base) else
              " The tiny model has a chat template but no safety training, so it had no refusals to lose; from a "
              "safety-aligned chat model (wu17_v6.yaml) this table measures what formal-verification GRPO costs it.")
    return (f"Phase 2 (GRPO) from the model as it came, asked through its chat template: StrongREJECT refusals "
            f"{moves('strongreject', 'refusal_rate')}; XSTest's refusals of safe prompts (FPR) {moves('xstest', 'fpr')}. "
            f"fv_toy's reward stands in for Lean's formal verification; random and zero are its controls.{caveat}")


def _lesson(table, value, base, trained) -> str:
    """What Phase 1's numbers say, in words: refusing more (and over-refusing), or not."""
    before, after = value(table, "strongreject", "refusal_rate", base), value(table, "strongreject", "refusal_rate", trained)
    fpr_before, fpr_after = value(table, "xstest", "fpr", base), value(table, "xstest", "fpr", trained)
    if None in (before, after) or after <= before:
        return ": the model did not learn to refuse more"
    over = fpr_before is not None and fpr_after is not None and fpr_after > fpr_before
    return ": the model learnt to refuse" + (", and to over-refuse safe prompts" if over else "")
