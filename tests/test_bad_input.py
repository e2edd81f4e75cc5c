"""Every bad input is one clear line and exit status 2, before any model is loaded where that can be known.

One table: each row is a command line of the real CLI (run in-process through
click's CliRunner), the fragment its one error line must hold, and whether
the error must come before a model is loaded. A row's `setup` may break
something first (a full disk, a GPU out of memory) by replacing one function.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner

import twophase.data.base.hub as hub
import twophase.trainers.models as models
from twophase.data.base.run_dir import LOCK_FILE
from twophase.eval.benchmarks import SAMPLES_DIR
from twophase.launch.cli import cli
from twophase.trainers.config import RULES, check_values

ROOT = Path(__file__).resolve().parents[1]
HH_DEMO = str(ROOT / "data" / "samples" / "hh_demo.jsonl")
LEAN_DEMO = str(ROOT / "data" / "samples" / "lean_demo.jsonl")


@dataclass
class Row:
    argv: Callable[[dict], list[str]]  # from the fixture paths {"model", "out", "files"}
    says: str  # a fragment of the one error line
    before_model: bool = True  # the error comes before any model is loaded
    setup: Callable | None = None  # (monkeypatch, paths) -> None: break something first
    refused: bool = True  # refused before it started: nothing written (unless the model had to load first)


def dpo(*settings: str, **paths_from) -> Callable[[dict], list[str]]:
    def argv(p):
        base = dict(model=p["model"], dataset=HH_DEMO, out_dir=p["out"], max_steps=2, micro_batch_size=1, grad_accum_steps=1,
                    lora_r=2, lora_alpha=4, max_length=64, max_prompt_length=32, precision="fp32", device="cpu",
                    optimizer="adamw", merge_after="false", log_every=0)  # fmt: skip
        base.update({key: p["files"][name] for key, name in paths_from.items()})
        return ["dpo", *[a for k, v in base.items() for a in ("--set", f"{k}={v}")], *[a for s in settings for a in ("--set", s)]]

    return argv


def grpo(*settings: str, **paths_from) -> Callable[[dict], list[str]]:
    def argv(p):
        base = dict(model=p["model"], dataset=LEAN_DEMO, out_dir=p["out"], max_steps=2, prompts_per_step=1, num_generations=2,
                    max_new_tokens=4, micro_batch_size=2, reward="zero", precision="fp32", device="cpu", optimizer="adamw",
                    lora="false", log_every=0)  # fmt: skip
        base.update({key: p["files"][name] for key, name in paths_from.items()})
        return ["grpo", *[a for k, v in base.items() for a in ("--set", f"{k}={v}")], *[a for s in settings for a in ("--set", s)]]

    return argv


BAD_REWARDS = """\
def nan(tasks, completions, *, step=0):
    return [float("nan")] * len(completions)


def inf(tasks, completions, *, step=0):
    return [0.0] * (len(completions) - 1) + [float("inf")]


def raises(tasks, completions, *, step=0):
    raise ValueError("my reward broke")


def too_few(tasks, completions, *, step=0):
    return [1.0]


def none(tasks, completions, *, step=0):
    return None


def words(tasks, completions, *, step=0):
    return ["good"] * len(completions)


def no_step(tasks, completions):
    return [0.0] * len(completions)
"""


def reward(name: str) -> Callable[[dict], list[str]]:
    return lambda p: grpo(f"reward={p['files']['bad_rewards']}:{name}")(p)


def _memory_of(monkeypatch, size: int):
    """This machine as one with `size` bytes of memory (as under `prlimit --as`)."""
    monkeypatch.setattr("twophase.trainers.infra.run.device_memory_bytes", lambda device: size)


def nan_loss_at_step(step: int):
    """The DPO loss turns NaN at `step` (as a bad batch or a diverging run would make it)."""

    def setup(monkeypatch, paths):
        from twophase.trainers.dpo import DPORecipe

        real = DPORecipe.loss
        calls = {"n": 0}

        def loss(self, micro_batch):
            value, metrics = real(self, micro_batch)
            calls["n"] += 1
            return (value * float("nan") if calls["n"] >= step else value), metrics

        monkeypatch.setattr(DPORecipe, "loss", loss)

    return setup


def evaluate(*extra: str, model: str | None = None, data: str | None = None) -> Callable[[dict], list[str]]:
    def argv(p):
        return ["eval", "--model", p["files"][model] if model else p["model"], "--benchmarks", "xstest", "--out", p["out"],
                "--data-dir", p["files"][data] if data else str(SAMPLES_DIR), *extra]  # fmt: skip

    return argv


def pipeline(*settings: str) -> Callable[[dict], list[str]]:
    return lambda p: ["pipeline", "--config", p["files"]["pipeline"], "--set", f"run_dir={p['out']}",
                      *[a for s in settings for a in ("--set", s)]]  # fmt: skip


def full_disk(monkeypatch, paths):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("twophase.trainers.infra.checkpoint.save_file", no_space)


def full_disk_in_safetensors(monkeypatch, paths):
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr("twophase.trainers.infra.checkpoint.save_file", no_space)


def refused_write(number: int, in_safetensors: bool = False):
    """A checkpoint write that the file system refuses with `number` (as Python, or as safetensors, reports it)."""

    def setup(monkeypatch, paths):
        from safetensors import SafetensorError

        def refuse(tensors, path, *args, **kwargs):
            if in_safetensors:
                raise SafetensorError(f"Error while serializing: IoError(Os {{ code: {number}, kind: Other, message: \"x\" }})")
            raise OSError(number, os.strerror(number), str(path))

        monkeypatch.setattr("twophase.trainers.infra.checkpoint.save_file", refuse)

    return setup


def gpu_out_of_memory(monkeypatch, paths):
    def too_big(self, micro_batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("twophase.trainers.dpo.DPORecipe.loss", too_big)


def unwritable(monkeypatch, paths):
    parent = Path(paths["out"]).parent / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    paths["out"] = str(parent / "out")
    if os.geteuid() == 0:  # root writes anywhere: make the check see what any other user would
        real_access = os.access
        monkeypatch.setattr("twophase.data.base.run_dir.os.access", lambda path, mode: False if Path(path) == parent / "out" else real_access(path, mode))


def out_is(name):
    def setup(monkeypatch, paths):
        paths["out"] = paths["files"][name] if name in paths["files"] else str(Path(paths["files"]["a_file"]) / "out")

    return setup


ROWS = {
    # data that yields nothing (was: "cannot sample from an empty dataset", a traceback)
    "empty dataset": Row(dpo(dataset="empty"), "no usable preference pair in"),
    "all-malformed dataset": Row(dpo(dataset="malformed"), "skipped 2 malformed JSON"),
    "wrong-column dataset": Row(dpo(dataset="columns"), "skipped 1 missing field"),
    "list-row dataset": Row(dpo(dataset="list_rows"), "skipped 1 not a JSON object"),
    "limit 0": Row(dpo("limit=0"), "config key limit = 0 in --set must be at least 1"),
    "empty GRPO dataset": Row(grpo(dataset="empty"), "no usable task in"),
    "list-row GRPO dataset": Row(grpo(dataset="list_rows"), "row is not an object"),
    # numbers
    "negative lr": Row(dpo("lr=-1e-4"), "lr = -0.0001 in --set must be a positive number"),
    "NaN lr": Row(dpo("lr=nan"), "lr = nan in --set must be a positive number"),
    "infinite lr": Row(dpo("lr=.inf"), "lr = inf in --set must be a positive number"),
    "zero lr": Row(dpo("lr=0"), "lr = 0.0 in --set must be a positive number"),
    "micro_batch_size 0": Row(dpo("micro_batch_size=0"), "micro_batch_size = 0 in --set must be at least 1"),
    "GRPO micro_batch_size 0": Row(grpo("micro_batch_size=0"), "micro_batch_size = 0 in --set must be at least 1"),
    "lora_r 0": Row(dpo("lora_r=0"), "lora_r = 0 in --set must be at least 1"),
    "lora_dropout 1": Row(dpo("lora_dropout=1"), "lora_dropout = 1.0 in --set must be in [0, 1)"),
    "max_steps 0": Row(dpo("max_steps=0"), "max_steps = 0 in --set must be at least 1 (fewer would save the untrained model)"),
    "max_steps negative": Row(dpo("max_steps=-3"), "max_steps = -3 in --set must be at least 1"),
    "grad_accum_steps 0": Row(dpo("grad_accum_steps=0"), "grad_accum_steps = 0 in --set must be at least 1"),
    "save_every -1": Row(dpo("save_every=-1"), "save_every = -1 in --set must be at least 0"),
    "keep_checkpoints -1": Row(dpo("keep_checkpoints=-1"), "keep_checkpoints = -1 in --set must be at least 0"),
    "seed -1": Row(dpo("seed=-1"), "seed = -1 in --set must be at least 0"),
    "DPO beta 0": Row(dpo("beta=0"), "beta = 0.0 in --set must be a positive number"),
    "max_new_tokens 0": Row(grpo("max_new_tokens=0"), "max_new_tokens = 0 in --set must be at least 1"),
    "num_generations 1": Row(grpo("num_generations=1"), "num_generations = 1 in --set must be at least 2 (advantages compare"),
    "num_iterations 0": Row(grpo("num_iterations=0"), "num_iterations = 0 in --set must be at least 1"),
    "temperature -1": Row(grpo("temperature=-1"), "temperature = -1.0 in --set must be a number >= 0"),
    "top_p 0": Row(grpo("top_p=0"), "top_p = 0.0 in --set must be in (0, 1]"),
    "unknown reward": Row(grpo("reward=nosuch"), "unknown reward 'nosuch'"),
    "unreachable Lean server": Row(grpo("reward=lean", "reward_options.lean.server=http://127.0.0.1:9",
                                        "reward_options.lean.retries=0"),
                                   "the Lean server at http://127.0.0.1:9 cannot be reached"),  # fmt: skip
    "Lean project and server both": Row(grpo("reward=lean", "reward_options.lean.server=http://127.0.0.1:9",
                                             "reward_options.lean.project_dir=/tmp"), "needs exactly one of the options"),
    "lean serve beyond localhost without a key": Row(lambda p: ["lean", "serve", "--project-dir", p["out"], "--host", "0.0.0.0"],
                                                     "listens beyond this machine: give it a key"),  # fmt: skip
    # LoRA targets and devices
    "unknown LoRA target": Row(dpo("lora_target_modules=[q_proj,qkv_proj]"), "has no module named qkv_proj; its linear layers are down_proj",
                               before_model=False),  # fmt: skip
    "no LoRA target": Row(dpo("lora_target_modules=[]"), "lora_target_modules = [] in --set must be a non-empty list"),
    "device tpu": Row(dpo("device=tpu"), "device = 'tpu' in --set must be auto, cpu, cuda or cuda:N"),
    "device of a GPU not here": Row(dpo("device=cuda:99"), "device cuda:99: "),
    # files
    "duplicate key in a config": Row(lambda p: ["dpo", "--config", p["files"]["duplicate"]],
                                     "is not valid YAML: key 'lr' is given twice in one mapping (again on line 3); keep one"),
    "YAML alias bomb": Row(lambda p: ["dpo", "--config", p["files"]["bomb"]], "more than 64 aliases (*name): refused"),
    "binary config file": Row(lambda p: ["dpo", "--config", p["files"]["binary"]], "is not a text file (byte 128 is not UTF-8)"),
    "truncated model.safetensors": Row(dpo(model="truncated"), "a weights file is damaged", before_model=False),
    "out_dir is a file": Row(dpo(), "is a file, not a directory", setup=out_is("a_file")),
    "out_dir inside a file": Row(dpo(), "a part of that path is a file", setup=out_is("inside a file")),
    "out_dir unwritable": Row(dpo(), "is not writable", setup=unwritable),
    "disk full": Row(dpo(), "no space left on device", before_model=False, setup=full_disk),
    "disk full, as safetensors says it": Row(dpo(), "no space left on device", before_model=False, setup=full_disk_in_safetensors),
    "read-only file system": Row(dpo(), "the file system is read-only; choose a writable output directory (EROFS writing ",
                                 before_model=False, setup=refused_write(errno.EROFS)),
    "immutable checkpoints folder": Row(dpo(), "operation not permitted; check the folder's permissions and flags",
                                        before_model=False, setup=refused_write(errno.EPERM)),
    "file-size limit, as safetensors says it": Row(dpo(), "file too large for this process's file-size limit (ulimit -f); "
                                                   "raise the limit (EFBIG)", before_model=False, setup=refused_write(errno.EFBIG, True)),
    "quota": Row(dpo(), "disk quota exceeded", before_model=False, setup=refused_write(errno.EDQUOT)),
    "GPU out of memory": Row(dpo(), "out of GPU memory in a training step (CUDA out of memory. Tried to allocate 20.00 GiB); lower "
                             "max_tokens_per_pass", before_model=False, setup=gpu_out_of_memory),  # fmt: skip
    "GPU out of memory, padded layout": Row(dpo("layout=stacked"), "; lower micro_batch_size (now 1; raise grad_accum_steps",
                                            before_model=False, setup=gpu_out_of_memory),  # fmt: skip
    # twophase eval
    "eval --limit -1": Row(evaluate("--limit", "-1"), "limit = -1 must be a whole number of at least 1"),
    "eval --limit 0": Row(evaluate("--limit", "0"), "limit = 0 must be a whole number of at least 1"),
    "eval --batch-size 0": Row(evaluate("--batch-size", "0"), "batch_size = 0 must be 'auto' or a whole number of at least 1"),
    "eval --option of no benchmark": Row(evaluate("--option", "xstest.nosuch=3"), "xstest has no option 'nosuch'; its options: max_new_tokens"),
    "eval --option nobody reads": Row(evaluate("--option", "num_shots=3"), "none of the benchmarks run (xstest) reads it"),
    "eval --option negative timeout": Row(evaluate("--option", "humaneval.timeout=-1"),
                                          "humaneval.timeout = -1 must be a number in (0, inf)"),
    "eval --option top_p 0": Row(evaluate("--option", "humaneval.top_p=0"), "humaneval.top_p = 0 must be a number in (0, 1]"),
    "eval --batch-size many": Row(evaluate("--batch-size", "many"), "batch_size = 'many' must be 'auto' or a whole number"),
    "eval --samples-per-question 0": Row(evaluate("--samples-per-question", "0"), "samples_per_question = 0 must be"),
    "eval max_new_tokens 0": Row(evaluate("--option", "max_new_tokens=0"), "max_new_tokens = 0 must be a whole number"),
    "eval n_samples 0": Row(evaluate("--option", "humaneval.n_samples=0"), "humaneval.n_samples = 0 must be"),
    "eval missing model": Row(evaluate(model="missing"), "model path "),
    "eval truncated model": Row(evaluate(model="truncated"), "a weights file is damaged", before_model=False),
    "eval failed benchmark": Row(evaluate(data="broken_benchmarks"), "1 benchmark(s) failed: xstest: ", refused=False),
    # the pipeline: checked before its first stage
    "pipeline dpo.max_steps 0": Row(pipeline("dpo.max_steps=0"), "max_steps = 0 in "),
    "pipeline eval.limit -1": Row(pipeline("eval.limit=-1"), "limit = -1 must be"),
    "pipeline run_dir is a file": Row(pipeline(), "is a file, not a directory", setup=out_is("a_file")),
    # rewards that misbehave, and a loss that is not finite: one line, no NaN model on disk
    "max_new_tokens past the model": Row(grpo("max_new_tokens=1000000000"), "max_prompt_length + max_new_tokens = "
                                         "1,000,000,512 tokens, but "),
    "max_length past the model": Row(dpo("max_length=100000", "max_prompt_length=32"), "max_length = 100,000 tokens, but "),
    "micro-batch past the memory": Row(dpo("micro_batch_size=100000", "layout=stacked"), "a forward pass of 12,800,000 "
                                       "tokens needs about ", before_model=False, setup=lambda mp, p: _memory_of(mp, 6 * 2**30)),
    "reward returns NaN": Row(reward("nan"), "returned 2 value(s) that are not finite numbers (row 0: nan, row 1: nan)",
                              before_model=False, refused=False),
    "reward returns inf": Row(reward("inf"), "returned 1 value(s) that are not finite numbers (row 1: inf)",
                              before_model=False, refused=False),
    "reward raises": Row(reward("raises"), "raised ValueError: my reward broke", before_model=False, refused=False),
    "reward returns too few": Row(reward("too_few"), "returned 1 values for 2 completions; a reward is fn(tasks, "
                                  "completions, *, step, rows=None)", before_model=False, refused=False),
    "reward returns None": Row(reward("none"), "returned None, not a list", before_model=False, refused=False),
    "reward returns strings": Row(reward("words"), "(row 0: 'good', row 1: 'good'", before_model=False, refused=False),
    "reward without step": Row(reward("no_step"), "does not take the keyword `step`; a reward is fn(tasks, completions"),
    "DPO loss turns NaN": Row(dpo("max_steps=3", "save_every=1"), "step 2: the loss is nan; the update was not applied "
                              "and the newest checkpoint, step 1, is intact", before_model=False, refused=False,
                              setup=nan_loss_at_step(2)),
}


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    texts = {
        "empty.jsonl": "",
        "malformed.jsonl": '{not json\n{"chosen": \n',
        "columns.jsonl": json.dumps({"prompt": "hi", "response": "there"}) + "\n",
        "list_rows.jsonl": json.dumps(["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"]) + "\n",
        "a_file": "not a directory\n",
        "broken_benchmarks/xstest.csv": "",
        "bad_rewards.py": BAD_REWARDS,
        "pipeline.yaml": yaml.safe_dump({"model": tiny_model_dir, "eval": {"benchmarks": "xstest"},
                                         "dpo": {"dataset": HH_DEMO}, "grpo": {"dataset": LEAN_DEMO}}),  # fmt: skip
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    (root / "duplicate.yaml").write_text("lr: 1.0e-6\nmax_steps: 2\nlr: 5.0e-7\n")
    # "billion laughs" under a valid key: each level names the one before nine times (9^9 leaves once expanded)
    levels = ["  - &l0 [x, x, x, x, x, x, x, x, x]"] + [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("lora_target_modules:\n" + "\n".join(levels) + "\n")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    found = {name.split(".")[0]: str(root / name) for name in texts}
    found.update(duplicate=str(root / "duplicate.yaml"), bomb=str(root / "bomb.yaml"), binary=str(root / "binary.yaml"), truncated=str(truncated), missing=str(root / "no" / "model"),
                 broken_benchmarks=str(root / "broken_benchmarks"), pipeline=str(root / "pipeline.yaml"))  # fmt: skip
    return found


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded before the error")


@pytest.mark.parametrize("row", ROWS.values(), ids=list(ROWS))
def test_bad_input_is_one_line_and_exit_status_two(row, files, tiny_model_dir, tmp_path, monkeypatch):
    paths = {"model": tiny_model_dir, "out": str(tmp_path / "out"), "files": files}
    if row.setup:
        row.setup(monkeypatch, paths)
    if row.before_model:
        monkeypatch.setattr(hub, "load_causal_lm", _no_model_loads)
        monkeypatch.setattr(models, "load_causal_lm", _no_model_loads)
    result = CliRunner().invoke(cli, row.argv(paths))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.stderr
    errors = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith("error: ")]  # besides progress bars
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert row.says in errors[0], errors[0]
    out = Path(paths["out"])
    if row.refused and row.before_model and out.is_dir():  # a refused run writes nothing (the lock file at most)
        assert [p.name for p in out.iterdir()] in ([], [LOCK_FILE])


def test_every_rule_names_a_key_of_its_config_and_the_defaults_pass():
    for cls, rules in RULES.items():
        assert set(rules) <= {field.name for field in dataclasses.fields(cls)}, cls
        check_values(cls())
