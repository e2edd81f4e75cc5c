"""TRL 1.16 on the workloads of `twophase bench`: the bar that BENCHMARKS.md measures twophase against.

This file exists only to measure that bar. TRL is not a dependency of twophase and
nothing in twophase imports this file; install TRL where it runs (`pip install
trl==1.16.0`, which needs accelerate), on a CUDA GPU. No network is needed: the model
and the data are built here, exactly as `twophase bench` builds them.

- the model: launch/bench/training.py `random_model`, the random-weight DeepSeek-Prover-V2-7B
  layout (LlamaForCausalLM, hidden 4096, intermediate 11008, 30 layers, 32 heads and
  32 KV heads, vocabulary 102,400, rms_norm_eps 1e-6, rope_theta 10,000), in bf16;
- the tokenizer: launch/bench/training.py `synthetic_tokenizer` (the word "t{i}" is id i);
- `dpo`: DPOTrainer, LoRA r64 / alpha 128 on all seven projections, 4 x 4 pairs a step,
  gradient checkpointing, bitsandbytes 8-bit AdamW, bf16, lr 5e-7, beta 0.1. The pairs
  are those `twophase bench dpo` trains on, step by step in the same order and with the
  same token ids (launch/bench/training.py `synthetic_pair`), written as text that the tokenizer
  turns back into those ids. Both workloads are already within the truncation limits
  (max_length 1024, prompt 512; TRL 1.16 has no prompt limit of its own), so TRL
  truncates nothing either.
- Phase 2's bar is launch/bench/trl_grpo_baseline.py.

Each run prints one JSON line with the same figures as `twophase bench`: tokens as
TRL counts them (its own `num_tokens`: each pair's prompt twice, replies once, no
padding), the step-time spread after warm-up, and peak memory. A step's time runs
from the end of the previous step to the end of this one, so it includes TRL's data
loading, as twophase's does.

    python launch/bench/trl_baseline.py dpo --lengths hh-rlhf --steps 12 --warmup-steps 2
    python launch/bench/trl_baseline.py dpo --lengths fixed --steps 6
"""

from __future__ import annotations

import tempfile
import time

import click

from twophase.launch.bench.training import (
    ARCH,
    BOS_ID,
    EOS_ID,
    device_name,
    emit,
    _peak_gib,
    _reset_peak,
    dpo_truncation,
    pair_lengths_of,
    random_model,
    step_spread,
    synthetic_pair,
    synthetic_tokenizer,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def words(ids: list[int]) -> list[str]:
    """The synthetic tokenizer's text for each id."""
    return ["<s>" if i == BOS_ID else "</s>" if i == EOS_ID else f"t{i}" for i in ids]


def dpo_rows(lengths: str, count: int, seq_len: int, vocab_size: int) -> list[dict]:
    """The first `count` pairs `twophase bench dpo` trains on, in its order, as TRL's prompt/chosen/rejected text.

    TRL appends the EOS text to every reply, so a reply's own EOS is left out of its text.
    """
    from twophase.data.base.sampler import EpochSampler

    pair_lengths = pair_lengths_of(lengths, seq_len, seq_len // 2, count)
    max_length, max_prompt_length = dpo_truncation(lengths, seq_len, seq_len // 2)
    rows = []
    for index in EpochSampler(len(pair_lengths), seed=0).indices(0, count):  # DPOConfig's seed 0, as in the benchmark
        prompt, chosen, rejected = synthetic_pair(index, pair_lengths[index], vocab_size, max_length, max_prompt_length)
        rows.append({"prompt": " ".join(words(prompt)), "chosen": _reply_text(chosen), "rejected": _reply_text(rejected)})
    return rows


def _reply_text(ids: list[int]) -> str:
    if ids and ids[-1] == EOS_ID:
        ids = ids[:-1]
    return "".join(" " + word for word in words(ids))  # follows the prompt's last word after a space


def _step_timer():
    """A TrainerCallback that records each step's time (end of the previous step to end of this one) and logs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.logs, self._last = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                _synchronize()
                self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # a training step's log, not the final summary
                self.logs.append(dict(logs))

    return StepTimer()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model(architecture: str):
    """The benchmark's random-weight model: bf16 on the GPU; float32 on a CPU (`--arch tiny`, a smoke test)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(architecture, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.config.use_cache = False  # training; GRPO's generation turns the cache on by itself
    return model, device


def _common_args(out_dir: str, steps: int, micro_batch_size: int, grad_accum_steps: int, device) -> dict:
    """TrainingArguments shared by both trainers: twophase bench's optimizer, precision and checkpointing."""
    return dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps, optim="adamw_bnb_8bit", bf16=device.type == "cuda",
        use_cpu=device.type == "cpu", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_grad_norm=1.0, weight_decay=0.0, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=0,
    )  # fmt: skip


def trl_dpo(architecture: str, lengths: str, steps: int, warmup_steps: int, seq_len: int, micro_batch_size: int,
            grad_accum_steps: int) -> dict:  # fmt: skip
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, device = _model(architecture)
    tokenizer = synthetic_tokenizer(model.config.vocab_size)
    pairs_per_step = micro_batch_size * grad_accum_steps
    rows = dpo_rows(lengths, steps * pairs_per_step, seq_len, model.config.vocab_size)
    expected_tokens = [_trl_tokens(tokenizer, rows[i : i + pairs_per_step]) for i in range(0, len(rows), pairs_per_step)]
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **_common_args(out_dir, steps, micro_batch_size, grad_accum_steps, device),
            learning_rate=5e-7, lr_scheduler_type="linear", beta=0.1, loss_type=["sigmoid"],
            max_length=dpo_truncation(lengths, seq_len, seq_len // 2)[0], train_sampling_strategy="sequential",
        )  # fmt: skip
        lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=lora, callbacks=[timer],
        )  # fmt: skip
        _reset_peak(device)
        trainer.train()
    # TRL's num_tokens is cumulative; each step's is the difference
    totals = [log["num_tokens"] for log in timer.logs]
    step_tokens = [b - a for a, b in zip([0, *totals], totals)]
    measured = slice(warmup_steps, None)
    shape = f"fixed {seq_len // 2}+2x{seq_len // 2}" if lengths == "fixed" else lengths
    return {
        "benchmark": "trl-dpo", "trl": _trl_version(), "architecture": architecture, "device": device_name(device),
        "lengths": shape, "pairs_per_step": pairs_per_step, "micro_batch_size": micro_batch_size, "lora_r": 64,
        "steps": steps, "warmup_steps": warmup_steps,
        "trl_tokens_match_twophase_count": step_tokens == expected_tokens[: len(step_tokens)],
        **step_spread(timer.seconds[measured], step_tokens[measured]), "peak_memory_gib": round(_peak_gib(device), 2),
    }  # fmt: skip


def _trl_tokens(tokenizer, rows: list[dict]) -> int:
    """The tokens of these rows as twophase counts them: prompt twice, each reply (with EOS) once."""
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    return sum(2 * count(r["prompt"]) + count(r["chosen"] + "</s>") + count(r["rejected"] + "</s>") for r in rows)


def _trl_version() -> str:
    import trl

    return trl.__version__


@click.group()
def main():
    """TRL baselines of `twophase bench` (needs trl, accelerate and a CUDA GPU)."""


ARCH_OPTION = click.option("--arch", type=ARCH, default="deepseek-prover-v2-7b", show_default=True,
                           help="tiny: a smoke test of this script, on any machine.")


@main.command("dpo")
@ARCH_OPTION
@click.option("--lengths", type=click.Choice(["fixed", "hh-rlhf"]), default="fixed", show_default=True)
@click.option("--steps", default=6, show_default=True)
@click.option("--warmup-steps", default=1, show_default=True)
@click.option("--seq-len", default=512, show_default=True, help="--lengths fixed: prompt + one reply.")
@click.option("--micro-batch-size", default=4, show_default=True)
@click.option("--grad-accum-steps", default=4, show_default=True)
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def dpo_command(arch, lengths, steps, warmup_steps, seq_len, micro_batch_size, grad_accum_steps, out):
    """Phase 1 through TRL's DPOTrainer on the pairs of `twophase bench dpo`."""
    emit(trl_dpo(arch, lengths, steps, warmup_steps, seq_len, micro_batch_size, grad_accum_steps), out)


if __name__ == "__main__":
    main()
