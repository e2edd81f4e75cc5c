"""Several processes (torchrun, gloo on the CPU) run the same experiment as one process.

One 2-process launch (tests/distributed_job.py) trains LoRA DPO and full-parameter GRPO (FSDP2) for 3 steps,
each rank with 2 micro-batches a step (gradient accumulation), and evaluates two benchmarks; the 1-process
runs are made here. Then: the same weights, the same GRPO samples, the same eval files, a 2-process
checkpoint resumed by one process, a world size that does not divide the batch, and a rank that dies.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from twophase.eval.runner import run_evaluation
from twophase.eval.settings import EvalSettings
from twophase.launch.cli import main
from twophase.trainers.config import DPOConfig, GRPOConfig, make_config
from twophase.trainers.dpo import run_dpo
from twophase.trainers.grpo import run_grpo

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "finished_at", "started_at")


def _dpo(model, out):
    return dict(
        model=model, dataset=str(ROOT / "data/samples/hh_demo.jsonl"), out_dir=str(out), max_steps=3,
        micro_batch_size=1, grad_accum_steps=4, layout="shared_prompt", lr=2e-3, lora_r=4, lora_alpha=8,
        max_length=160, max_prompt_length=96, precision="fp32", device="cpu", save_every=0, log_every=0,
        optimizer="adamw", merge_after=False,
    )  # fmt: skip


def _grpo(model, out):
    return dict(
        model=model, dataset=str(ROOT / "data/samples/lean_demo.jsonl"), out_dir=str(out), max_steps=3,
        prompts_per_step=2, num_generations=4, max_new_tokens=8, micro_batch_size=2, lr=1e-2, reward="toy",
        precision="fp32", device="cpu", save_every=2, keep_checkpoints=0, log_every=0, optimizer="adamw", lora=False,
    )  # fmt: skip


def _eval(model, out):
    settings = dict(benchmarks="mmlu,xstest", limit=4, data_dir=str(ROOT / "eval/samples"), batch_size=2)
    return {"model": model, "out": str(out), "settings": settings}


def _torchrun(spec: dict, tmp: Path, timeout: float):
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWOPHASE_COLLECTIVE_TIMEOUT_S": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests/distributed_job.py"), str(path)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The 2-process runs (one launch) and the same runs in this process."""
    tmp = tmp_path_factory.mktemp("distributed")
    two = tmp / "two"
    spec = {"dpo": _dpo(tiny_model_dir, two / "dpo"), "grpo": _grpo(tiny_model_dir, two / "grpo"),
            "eval": _eval(tiny_model_dir, two / "eval")}  # fmt: skip
    done = _torchrun(spec, tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp / "one"
    run_dpo(make_config(DPOConfig, _dpo(tiny_model_dir, one / "dpo")))
    run_grpo(make_config(GRPOConfig, _grpo(tiny_model_dir, one / "grpo")))
    run_evaluation(tiny_model_dir, one / "eval", EvalSettings(**_eval(tiny_model_dir, one / "eval")["settings"]))
    return {"one": one, "two": two, "tmp": tmp, "model": tiny_model_dir}


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_lora_dpo_two_processes_give_the_weights_of_one(runs):
    one = load_file(str(runs["one"] / "dpo/adapter/adapter_model.safetensors"))
    two = load_file(str(runs["two"] / "dpo/adapter/adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # B starts at 0: it trained
    assert _max_difference(one, two) < 1e-6
    steps = [json.loads(line) for line in (runs["two"] / "dpo/metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (runs["one"] / "dpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3]  # rank 0 alone wrote the log
    assert [r["tokens"] for r in steps] == [r["tokens"] for r in reference]  # every rank's pairs counted once
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in reference], abs=1e-6)


def test_full_grpo_two_sharded_processes_give_the_weights_and_samples_of_one(runs):
    initial = load_file(str(Path(runs["model"]) / "model.safetensors"))
    one = load_file(str(runs["one"] / "grpo/model/model.safetensors"))
    two = load_file(str(runs["two"] / "grpo/model/model.safetensors"))  # one ordinary directory, gathered
    assert _max_difference(one, initial) > 1e-3
    assert _max_difference(one, two) < 2e-5  # lr 1e-2 over weights of size ~1: float32 summation order
    # each rank generated and scored its own prompt's group; rank 0 wrote them all, in the order of one process
    assert (runs["two"] / "grpo/samples.jsonl").read_text() == (runs["one"] / "grpo/samples.jsonl").read_text()
    shards = sorted(p.name for p in (runs["two"] / "grpo/checkpoints/step-000002/sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((runs["two"] / "grpo/checkpoints/step-000002/manifest.json").read_text())
    assert set(manifest["files"]) == {"state.pt", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    out = runs["tmp"] / "resumed"
    shutil.copytree(runs["two"] / "grpo", out)
    shutil.rmtree(out / "checkpoints/step-000003")
    shutil.rmtree(out / "model")
    run_grpo(make_config(GRPOConfig, _grpo(runs["model"], out)), resume=True)
    one = load_file(str(runs["one"] / "grpo/model/model.safetensors"))
    assert _max_difference(one, load_file(str(out / "model/model.safetensors"))) < 2e-5
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sharded_evaluation_writes_the_files_of_one_process(runs):
    for name in ("mmlu", "xstest"):
        assert (runs["two"] / f"eval/{name}.jsonl").read_bytes() == (runs["one"] / f"eval/{name}.jsonl").read_bytes()
        one, two = (json.loads((runs[k] / f"eval/{name}.json").read_text()) for k in ("one", "two"))
        for result in (one, two):
            for key in TIMING:
                result.pop(key, None)
            for stats in result["engine_stats"].values():
                stats.pop("seconds", None)
        assert one == two
        assert one["engine_stats"]["loglikelihood"]["requests"] + one["engine_stats"]["generation"]["requests"] > 0


def test_a_world_size_that_does_not_divide_the_batch_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc-per-node 3 tells rank 0
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", *sum((["--set", f"{k}={v}"] for k, v in _dpo(tiny_model_dir, tmp_path / "run").items()), [])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: micro_batch_size x grad_accum_steps (pairs per step) = 4 cannot be split evenly over 3 "
                   "processes; choose a number of processes that divides it, or change grad_accum_steps"]  # fmt: skip
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_a_rank_that_dies_ends_the_job_with_its_error(tmp_path):
    started = time.monotonic()
    done = _torchrun({"fail_on_rank": 1}, tmp_path, timeout=120)
    assert done.returncode != 0
    assert "rank 1 breaks on purpose" in done.stdout + done.stderr
    assert time.monotonic() - started < 60  # the other rank did not wait out its collective


def test_slurm_scripts_for_several_nodes_run_torchrun_on_each(tmp_path, capsys):
    published = ROOT / "launch/configs/wu17_v5.yaml"
    out = tmp_path / "slurm"
    main(["slurm", "--config", str(published), "--out", str(out), "--set", f"run_dir={tmp_path / 'run'}",
          "--nodes", "2", "--gpus-per-node", "4"])  # fmt: skip
    capsys.readouterr()
    dpo = (out / "02_dpo.sbatch").read_text().splitlines()
    assert "#SBATCH --gres=gpu:a100:4" in dpo and "#SBATCH --nodes=2" in dpo and "#SBATCH --ntasks-per-node=1" in dpo
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host' in dpo
    srun = [line for line in dpo if line.startswith("srun ")]
    assert len(srun) == 1
    words = srun[0].split()
    assert words[:2] == ["srun", "--ntasks-per-node=1"] and words[2].endswith("torchrun")
    assert words[3:8] == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=$head:29500",
                          "--rdzv-id=$SLURM_JOB_ID"]  # fmt: skip
    assert words[8:14] == ["-m", "twophase.launch.cli", "pipeline", "--config", str(published), "--stage"] and words[14] == "dpo"
    tables = (out / "09_tables.sbatch").read_text()
    assert "torchrun" not in tables and "--gres" not in tables and "--nodes" not in tables  # one CPU job, as before
