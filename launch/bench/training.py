"""`twophase bench`: speed and memory of the real training code on this machine.

The model is built from an architecture config with random weights (no
download needed): `deepseek-prover-v2-7b` is DeepSeek-Prover-V2-7B's layout
(LlamaForCausalLM, hidden 4096, intermediate 11008, 30 layers, 32 heads,
vocabulary 102,400); `qwen2.5-7b` and `llama-3-8b` are the chat models of the
next experiment (launch/configs/wu17_v6.yaml), from their published configs;
`tiny` and `tiny-qwen2` run anywhere, for testing this command.

The step code is the real one: the DPO and GRPO recipes on the shared loop.
Only the data is synthetic — random token ids of exactly the benchmark's
lengths — because speed must not depend on what the tokens say.

DPO pairs have either one fixed shape (`--lengths fixed`: a --seq-len/2 prompt
and two --seq-len/2 replies) or the lengths of real HH-RLHF harmless-base pairs
(`--lengths hh-rlhf`: drawn from the token-length profile in launch/profiles/,
launch/bench/length_profile.py, and cut by the trainer's own truncation rule at
max_length 1024 / max_prompt_length 512, as in Phase 1).

Definitions, printed with every result:
    DPO tokens/s   tokens as TRL counts them — each pair's prompt twice, its two
                   replies once, no padding — over the steps after warm-up,
                   divided by their total step time; the step-time spread
                   (min / median / max) is over the same steps
    GRPO           generation tokens/s = completion tokens / generation time;
                   update tokens/s = prompt + completion tokens / update time
    peak memory    torch.cuda.max_memory_allocated over the run
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from twophase.data.collators import LAYOUTS

ARCHITECTURES = {
    "deepseek-prover-v2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=102400, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    # The pipeline check's model (`twophase bench pipeline`): DeepSeek-Prover-V2-7B's family at 0.8B parameters,
    # over the project's tiny byte-level BPE tokenizer (data/tiny.py), whose 1,024 ids it takes as its vocabulary.
    "llama-0.8b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=1024, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    # Qwen/Qwen2.5-7B(-Instruct)'s config.json: grouped-query attention (7 query heads per KV head) and
    # biases on q, k and v (Qwen2ForCausalLM), a 152,064-word vocabulary, untied embeddings.
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    ),
    # meta-llama/Meta-Llama-3-8B(-Instruct)'s config.json: grouped-query attention (4 per KV head), 128,256 words.
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2048, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    "tiny-qwen2": dict(  # the Qwen2 layout's code paths (biases, grouped-query attention) at test size
        model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096,
    ),
}  # fmt: skip


def random_model(architecture: str, device: torch.device, dtype: torch.dtype, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    layout = ARCHITECTURES[architecture] | changes
    family = layout.pop("model_type", "llama")
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_class(**layout, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    return model


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over exactly the model's vocabulary: any id decodes, every id it gives is < vocab_size.

    Ids 0, 1 and 2 are <pad>, <s> (BOS) and </s> (EOS), and id i >= 3 is the word "t{i}".
    The special tokens are part of the vocabulary itself: registered on top of it, they
    would get the ids vocab_size and up, past the end of the model's embedding. It adds
    nothing by itself: a text that should start with BOS says "<s>".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


BOS_ID, EOS_ID = 1, 2  # as in synthetic_tokenizer and random_model


def _random_ids(rows: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=generator)  # never pad, BOS or EOS


def bench_dpo(architecture="deepseek-prover-v2-7b", steps=5, micro_batch_size=4, grad_accum_steps=4, seq_len=512,
              prompt_len=256, precompute=False, optimizer="adamw8bit", lora_r=64, device="auto", logprob_chunk_size=256,
              layout=None, lengths="fixed", tokens_per_pass=None, warmup_steps=1, process_group=False,
              profile=False, compile_layers=False) -> dict:  # fmt: skip
    """Phase 1 steps on synthetic pairs; `layout` and `tokens_per_pass` default to DPOConfig's."""
    from twophase.data.hh_rlhf import PreferencePair
    from twophase.trainers.config import DPOConfig, make_config
    from twophase.trainers.infra.run import MetricsLog
    from twophase.trainers.loop import train
    from twophase.trainers.models import prepare_policy, resolve_device, weight_dtype

    device = join_processes(resolve_device(device), process_group)
    precision = "bf16" if device.type == "cuda" else "fp32"
    pairs_per_step = micro_batch_size * grad_accum_steps
    pair_lengths = pair_lengths_of(lengths, seq_len, prompt_len, steps * pairs_per_step)
    max_length, max_prompt_length = dpo_truncation(lengths, seq_len, prompt_len)
    with tempfile.TemporaryDirectory() as out_dir:
        config = make_config(DPOConfig, dict(
            model=architecture, out_dir=out_dir, max_steps=steps, micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps, lora_r=lora_r, lora_alpha=2 * lora_r, precision=precision,
            device=str(device), optimizer=optimizer, save_every=0, log_every=1, merge_after=False,
            max_length=max_length, max_prompt_length=max_prompt_length, lr=5e-7, logprob_chunk_size=logprob_chunk_size,
            compile_layers=compile_layers,
            **{k: v for k, v in dict(layout=layout, max_tokens_per_pass=tokens_per_pass).items() if v is not None},
        ))  # fmt: skip
        model = prepare_policy(random_model(architecture, device, weight_dtype(precision, device)), config)
        tokenizer = synthetic_tokenizer(model.config.vocab_size)
        pairs = [PreferencePair("p", " c", " r")] * len(pair_lengths)  # only their number matters: the sampler's range
        recipe = _synthetic_dpo_class()(config, Path(out_dir), policy=(model, tokenizer, device), pairs=pairs)
        recipe.pair_lengths = pair_lengths
        if precompute:  # reference log-probs read from a table, as with precompute_ref_logps
            recipe.reference_logps = torch.randn(len(pairs), 2) - 300
        _reset_peak(device)
        train(recipe, config, Path(out_dir), final_checkpoint=False)
        profiled = _profile_last_update(recipe, config, steps, device) if profile else {}
        records = MetricsLog(Path(out_dir) / "metrics.jsonl").read()
    if not records:  # under torchrun only rank 0 writes the metrics; the other ranks have nothing to report
        return {}
    measured = records[warmup_steps:] or records  # the first steps pay for warm-up (allocator, kernels)
    shape = f"fixed {prompt_len}+2x{seq_len - prompt_len}" if lengths == "fixed" else lengths
    return {
        "benchmark": "dpo", "architecture": architecture, "device": device_name(device), **_processes(), "lengths": shape,
        "layout": config.layout, "pairs_per_step": pairs_per_step, "micro_batch_size": micro_batch_size,
        "tokens_per_pass": config.max_tokens_per_pass if config.layout in ("packed", "packed_shared_prompt") else None,
        "lora_r": lora_r, "precomputed_reference": precompute, "optimizer": optimizer,
        "compile_layers": compile_layers, **first_step(records),
        "logprob_chunk_size": logprob_chunk_size, "steps": steps, "warmup_steps": len(records) - len(measured),
        **step_spread([r["step_time_s"] for r in measured], [r["tokens"] for r in measured]),
        "peak_memory_gib": round(_peak_gib(device), 2), **profiled,
    }  # fmt: skip


def first_step(records: list[dict]) -> dict:
    """Step 1's loss and gradient norm: the same random model and batch give the same numbers with or without a
    speed option (up to bf16 rounding), which is how the GPU checks an optimised path against the plain one."""
    return {"first_step_loss": records[0]["loss"], "first_step_grad_norm": records[0]["grad_norm"]} if records else {}


def _profile_last_update(recipe, config, steps: int, device) -> dict:
    """`--profile`: the last step's forward and backward passes once more, kernel by kernel (CUDA only)."""
    from twophase.launch.bench.kernel_profile import profile_update

    return {"update_profile": profile_update(recipe, config, steps - 1)} if device.type == "cuda" else {}


def step_spread(step_seconds: list[float], step_tokens: list[int]) -> dict:
    """Tokens a step and per second over the measured steps, and their step-time spread."""
    median = statistics.median(step_seconds)
    return {
        "tokens_per_step": round(sum(step_tokens) / len(step_tokens)),
        "tokens_per_s": round(sum(step_tokens) / sum(step_seconds), 1),
        "step_s_min": round(min(step_seconds), 3), "step_s_median": round(median, 3),
        "step_s_max": round(max(step_seconds), 3), "slowest_over_median": round(max(step_seconds) / median, 2),
    }  # fmt: skip


def dpo_truncation(lengths: str, seq_len: int, prompt_len: int) -> tuple[int, int]:
    """(max_length, max_prompt_length): Phase 1's 1024 / 512 for real lengths; the fixed shape is never cut."""
    return (seq_len, prompt_len) if lengths == "fixed" else (1024, 512)


def pair_lengths_of(lengths: str, seq_len: int, prompt_len: int, count: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of the benchmark's pairs, before truncation."""
    if lengths == "fixed":
        return [(prompt_len, seq_len - prompt_len, seq_len - prompt_len)] * count
    from twophase.launch.bench.length_profile import load_length_profile

    return load_length_profile(lengths)


COMPLETION_LENGTHS = ("full", "mixed")


def bench_grpo(architecture="deepseek-prover-v2-7b", steps=3, prompts=2, generations=8, max_new_tokens=512,
               prompt_len=200, micro_batch_size=4, generation_batch_size=16, optimizer="adamw8bit", device="auto",
               cuda_graphs=True, logprob_chunk_size=256, stochastic_rounding=True, completion_lengths="full",
               process_group=False, gradient_checkpointing=True, profile=False, compile_layers=False,
               fake_lean: str | None = None) -> dict:  # fmt: skip
    """Phase 2 steps on random prompts of `prompt_len` tokens.

    completion_lengths "full": every completion runs to max_new_tokens (EOS is ignored: a random model
    hardly ever says it). "mixed": half the completions run to the limit, the other half end early, as if
    at EOS, at a length drawn uniformly from [max_new_tokens / 8, max_new_tokens), seeded per row.
    `fake_lean` ("median,sigma,timeout_share,timeout,workers", e.g. "2,1,0.05,60,8"): the `lean` reward, streamed
    behind generation, on a fake Lean of that latency (launch/bench/lean.py) instead of the random reward.
    """
    from twophase.data.lean_workbook import LeanTask
    from twophase.trainers.config import GRPOConfig, make_config
    from twophase.trainers.grpo import GRPORecipe
    from twophase.trainers.infra.run import MetricsLog
    from twophase.trainers.loop import train
    from twophase.trainers.models import prepare_policy, resolve_device, weight_dtype

    device = join_processes(resolve_device(device), process_group)
    precision = "bf16" if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as out_dir:
        config = make_config(GRPOConfig, dict(
            model=architecture, out_dir=out_dir, max_steps=steps, prompts_per_step=prompts, num_generations=generations,
            max_new_tokens=max_new_tokens, micro_batch_size=micro_batch_size, generation_batch_size=generation_batch_size,
            precision=precision, device=str(device), optimizer=optimizer, save_every=0, log_every=1, lora=False,
            reward="random", stop_strings=[], lr=1e-6, max_prompt_length=prompt_len,
            generation_cuda_graphs=cuda_graphs, logprob_chunk_size=logprob_chunk_size,
            stochastic_rounding=stochastic_rounding, gradient_checkpointing=gradient_checkpointing,
            compile_layers=compile_layers,
        ))  # fmt: skip
        model = prepare_policy(random_model(architecture, device, weight_dtype(precision, device)), config)
        tokenizer = synthetic_tokenizer(model.config.vocab_size)
        tasks = [LeanTask(id=f"task{i}", statement="theorem t : True := by\n", header="", informal="") for i in range(prompts * steps)]
        recipe = GRPORecipe(config, Path(out_dir), policy=(model, tokenizer, device), tasks=tasks)
        generator = torch.Generator().manual_seed(0)
        # BOS and prompt_len − 1 random words: prompts of exactly prompt_len tokens
        recipe.prompts = ["<s> " + " ".join(f"t{i}" for i in _random_ids(1, prompt_len - 1, 1000, generator)[0].tolist()) for _ in tasks]
        recipe.generator = _scripted_generator(recipe, completion_lengths)
        if fake_lean:
            from twophase.launch.bench.lean import fake_lean_reward

            recipe.rewards = {"lean": fake_lean_reward(fake_lean)}
        _reset_peak(device)
        train(recipe, config, Path(out_dir), final_checkpoint=False, callbacks=recipe.run_callbacks())
        profiled = _profile_last_update(recipe, config, steps, device) if profile else {}
        records = MetricsLog(Path(out_dir) / "metrics.jsonl").read()
    if not records:  # under torchrun only rank 0 writes the metrics; the other ranks have nothing to report
        return {}
    measured = records[1:] or records
    median = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
    return {
        "benchmark": "grpo", "architecture": architecture, "device": device_name(device), **_processes(),
        "completions_per_step": prompts * generations, "max_new_tokens": max_new_tokens, "prompt_len": prompt_len,
        "micro_batch_size": micro_batch_size, "gradient_checkpointing": gradient_checkpointing,
        "compile_layers": compile_layers, **first_step(records),
        "cuda_graphs": cuda_graphs, "completion_lengths": completion_lengths,
        "stochastic_rounding": stochastic_rounding, "first_step_s": round(records[0]["step_time_s"], 2),
        "mean_completion_len": round(median("completion/length_mean"), 1), "steps": steps,
        "median_step_s": round(median("step_time_s"), 2), "generation_s": round(median("time/generation_s"), 2),
        "update_s": round(median("time/update_s"), 2),
        "generation_tokens_per_s": round(median("generation_tokens_per_s"), 1),
        "update_tokens_per_s": round(median("tokens_per_s"), 1), "peak_memory_gib": round(_peak_gib(device), 2),
        "sampler_logprob_gap": round(median("sampler_logprob_gap"), 5),
        "reward": f"lean on a fake Lean ({fake_lean})" if fake_lean else "random",
        "scoring_s": round(median("time/scoring_s"), 2), **profiled,
    }  # fmt: skip


def _scripted_generator(recipe, completion_lengths: str):
    """The recipe's generation engine, with EOS replaced by lengths the benchmark chooses."""
    from twophase.eval.engine.generation import Generator

    class ScriptedLengths(Generator):
        calls = 0

        def generate(self, prompts, max_new_tokens, *args, **kwargs):
            self.limit = max_new_tokens
            lengths = [max_new_tokens] * len(prompts)
            if completion_lengths == "mixed":
                rng = torch.Generator().manual_seed(self.calls)
                early = torch.randint(max_new_tokens // 8, max_new_tokens, (len(prompts),), generator=rng).tolist()
                lengths = [e if row % 2 else max_new_tokens for row, e in enumerate(early)]
            self.calls += 1
            return super().generate(prompts, lengths, *args, **kwargs)

        def _finish_reason(self, row, token):
            reason = super()._finish_reason(row, token)
            return "eos" if reason == "length" and row.max_new < self.limit else reason

    config = recipe.config
    generating = recipe.gathered.model if recipe.gathered else recipe.model  # sharded: the gathered copy generates
    return ScriptedLengths(
        generating, recipe.tokenizer, max_batch=config.generation_batch_size, cuda_graphs=config.generation_cuda_graphs,
        stop_at_eos=False, cache_storage=recipe.arena.buffer if recipe.arena else None,
    )  # fmt: skip


def synthetic_pair(index: int, lengths: tuple[int, int, int], vocab_size: int, max_length: int, max_prompt_length: int):
    """Pair `index` of a synthetic benchmark: random ids of the (prompt, chosen, rejected) `lengths`.

    The prompt starts with BOS and each reply ends with EOS, as the collator makes them,
    and the pair is cut by the trainer's truncation rule. The same index always gives the
    same ids (launch/bench/trl_baseline.py feeds TRL exactly these pairs).
    """
    from twophase.data.collators import TokenizedPair, truncate_pair

    generator = torch.Generator().manual_seed(index)
    prompt, chosen, rejected = (_random_ids(1, n - 1, vocab_size, generator)[0].tolist() for n in lengths)
    pair = TokenizedPair([BOS_ID, *prompt], [*chosen, EOS_ID], [*rejected, EOS_ID])
    return truncate_pair(pair, max_length, max_prompt_length, bos_id=BOS_ID)


def _synthetic_dpo_class():
    """Defined on demand so that importing this module does not import the trainers."""
    from twophase.trainers.dpo import DPORecipe

    class SyntheticDPO(DPORecipe):
        """DPORecipe whose pair i is `synthetic_pair(i, pair_lengths[i], ...)`; the rest of the recipe is the real one."""

        pair_lengths: list[tuple[int, int, int]]

        def tokenized_pair(self, index):
            vocab, config = self.model.config.vocab_size, self.config
            return synthetic_pair(index, self.pair_lengths[index], vocab, config.max_length, config.max_prompt_length)

    return SyntheticDPO


def join_processes(device: torch.device, alone: bool) -> torch.device:
    """The device this process benchmarks on. Under torchrun: its rank's GPU, in the job's process group
    (the global batch split over ranks, as in training). `alone`: a one-process group that runs the
    multi-process code path on this one device (data/base/distributed.py: start_alone)."""
    from twophase.data.base import distributed

    device = distributed.local_device(device)
    if distributed.launched_world_size() > 1:
        distributed.start(device)
    elif alone:
        distributed.start_alone(device)
    return device


def _processes() -> dict:
    """How many processes measured together, and whether they ran the multi-process code path."""
    from twophase.data.base import distributed

    return {"processes": distributed.world_size(), "process_group": distributed.active()}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def emit(result: dict, out: str | None) -> None:
    from twophase.data.base import distributed

    if not distributed.is_main():  # under torchrun, rank 0 reports for the job (its memory: one GPU's)
        return
    click.echo(json.dumps(result))
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result | {"date": time.strftime("%Y-%m-%d")}) + "\n")


ARCH = click.Choice(sorted(ARCHITECTURES))


PROCESS_GROUP_HELP = ("Run the multi-GPU code path (GRPO: FSDP2 shards and a gathered copy; DPO: the gradient all-reduce) "
                      "in a process group of this one process, to check and measure it on one GPU. Under torchrun the "
                      "job's own group is used.")


COMPILE_HELP = "The config key compile_layers: torch.compile each layer's blocks on a GPU (trainers/models.py)."
PROFILE_HELP = ("CUDA: run the last step's forward and backward passes once more under torch.profiler and report "
                "kernel time by kind and GPU idle time (launch/bench/kernel_profile.py).")


@click.group("bench")
def bench_group():
    """Measure speed and memory (random-weight model, synthetic tokens, the real step code)."""


@bench_group.command("dpo")
@click.option("--arch", type=ARCH, default="deepseek-prover-v2-7b", show_default=True)
@click.option("--lengths", type=click.Choice(["fixed", "hh-rlhf"]), default="fixed", show_default=True,
              help="fixed: every pair a --seq-len/2 prompt and two --seq-len/2 replies; hh-rlhf: real HH-RLHF "
                   "harmless-base pair lengths, truncated at 1024/512 as in Phase 1.")
@click.option("--steps", default=5, show_default=True)
@click.option("--warmup-steps", default=1, show_default=True, help="First steps left out of every figure.")
@click.option("--layout", "layouts", type=click.Choice(LAYOUTS), multiple=True,
              help="How a pass holds its pairs [default: DPOConfig's]; repeat it to compare layouts in one process.")
@click.option("--tokens-per-pass", type=int, default=None, help="Packed layouts: tokens in one pass [default: DPOConfig's].")
@click.option("--micro-batch-size", default=4, show_default=True, help="Pairs per forward pass (padded layouts).")
@click.option("--grad-accum-steps", default=4, show_default=True)
@click.option("--seq-len", default=512, show_default=True, help="--lengths fixed: prompt + one reply.")
@click.option("--precompute", is_flag=True, help="Reference log-probs from a precomputed table.")
@click.option("--optimizer", type=click.Choice(["adamw8bit", "adamw"]), default="adamw8bit", show_default=True)
@click.option("--logprob-chunk-size", default=256, show_default=True, help="Rows projected onto the vocabulary at once.")
@click.option("--compile-layers/--no-compile-layers", default=False, show_default=True, help=COMPILE_HELP)
@click.option("--profile", is_flag=True, help=PROFILE_HELP)
@click.option("--device", default="auto", show_default=True)
@click.option("--process-group", is_flag=True, help=PROCESS_GROUP_HELP)
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def bench_dpo_command(arch, lengths, steps, warmup_steps, layouts, tokens_per_pass, micro_batch_size, grad_accum_steps,
                      seq_len, precompute, optimizer, logprob_chunk_size, compile_layers, profile, device, process_group,
                      out):  # fmt: skip
    """Phase 1 setting: LoRA r=64, 4 x 4 pairs a step, checkpointing, 8-bit AdamW.

    Tokens are counted as TRL counts them (prompt twice, replies once, no padding), whatever the layout.
    Each layout gets a freshly built model, so one result never carries memory of another.
    """
    import gc

    for layout in layouts or [None]:
        emit(bench_dpo(arch, steps, micro_batch_size, grad_accum_steps, seq_len, seq_len // 2, precompute, optimizer,
                        device=device, logprob_chunk_size=logprob_chunk_size, layout=layout, lengths=lengths,
                        tokens_per_pass=tokens_per_pass, warmup_steps=warmup_steps, process_group=process_group,
                        profile=profile, compile_layers=compile_layers), out)  # fmt: skip
        gc.collect()  # the last model's weights go before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@bench_group.command("grpo")
@click.option("--arch", type=ARCH, default="deepseek-prover-v2-7b", show_default=True)
@click.option("--steps", default=4, show_default=True)
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--prompt-len", default=200, show_default=True)
@click.option("--micro-batch-size", default=4, show_default=True)
@click.option("--generation-batch-size", default=16, show_default=True)
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True)
@click.option("--completion-lengths", type=click.Choice(COMPLETION_LENGTHS), default="full", show_default=True,
              help="full: every completion to the limit; mixed: half end early at uniform lengths in [limit/8, limit).")
@click.option("--stochastic-rounding/--no-stochastic-rounding", default=True, show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--compile-layers/--no-compile-layers", default=False, show_default=True, help=COMPILE_HELP)
@click.option("--profile", is_flag=True, help=PROFILE_HELP)
@click.option("--fake-lean", default=None, metavar="MEDIAN,SIGMA,SHARE,TIMEOUT,WORKERS",
              help="Score with the lean reward on a fake Lean of this latency (e.g. 2,1,0.05,60,8), not the random reward.")
@click.option("--device", default="auto", show_default=True)
@click.option("--process-group", is_flag=True, help=PROCESS_GROUP_HELP)
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def bench_grpo_command(arch, steps, max_new_tokens, prompt_len, micro_batch_size, generation_batch_size, cuda_graphs,
                       completion_lengths, stochastic_rounding, gradient_checkpointing, compile_layers, profile, fake_lean,
                       device, process_group, out):  # fmt: skip
    """Phase 2 setting: full fine-tuning, 2 prompts x 8 completions, checkpointing, 8-bit AdamW."""
    emit(bench_grpo(arch, steps, max_new_tokens=max_new_tokens, prompt_len=prompt_len, micro_batch_size=micro_batch_size,
                     generation_batch_size=generation_batch_size, device=device, cuda_graphs=cuda_graphs,
                     stochastic_rounding=stochastic_rounding, completion_lengths=completion_lengths,
                     process_group=process_group, gradient_checkpointing=gradient_checkpointing, profile=profile,
                     compile_layers=compile_layers, fake_lean=fake_lean), out)  # fmt: skip


@bench_group.command("decode")
@click.option("--arch", type=ARCH, default="deepseek-prover-v2-7b", show_default=True)
@click.option("--rows", default=16, show_default=True)
@click.option("--prompt-len", default=200, show_default=True)
@click.option("--new-tokens", default=512, show_default=True)
@click.option("--profile-steps", default=0, show_default=True, help="Trace this many steps at the longest cache (0: no trace).")
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def bench_decode_command(arch, rows, prompt_len, new_tokens, profile_steps, out):
    """The decoder alone (CUDA GPU): step time per cache length against the bandwidth floor, and a kernel profile."""
    from twophase.launch.bench.decode_profile import bench_decode

    if not torch.cuda.is_available():
        raise click.UsageError("bench decode measures the CUDA-graph decoder: it needs a CUDA GPU")
    timings = bench_decode(arch, rows, prompt_len, new_tokens, profile_steps=profile_steps, report=lambda r: emit(r, out))
    if profile_steps:
        emit(timings, out)  # again, with the profile


def bench_evaluation(architecture: str, data_dir: str, out_dir: str, tokenizer_dir: str | None = None,
                     benchmarks: str = "all", limit: int | None = None, samples_per_question: int | None = None,
                     prompt_format: str = "hh", batch_size="auto") -> dict:  # fmt: skip
    """`twophase eval` of a random-weight `architecture` on the benchmark files in `data_dir`; each benchmark's time.

    The runner is the real one (eval/runner.py) with the shipped settings; Betley's
    0-100 judge is the evaluated model itself, so its judging costs what a local
    judge of the same size costs. With `tokenizer_dir` the texts are tokenized as
    that tokenizer does and the model's vocabulary is the tokenizer's size.
    """
    from twophase.data.base.hub import load_tokenizer
    from twophase.eval.runner import run_evaluation
    from twophase.eval.settings import EvalSettings
    from twophase.trainers.models import resolve_device, weight_dtype

    device = resolve_device("auto")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else synthetic_tokenizer(ARCHITECTURES[architecture]["vocab_size"])
    model = random_model(architecture, device, weight_dtype("bf16", device), vocab_size=len(tokenizer)).eval()
    judge = {"kind": "local", "model": f"random {architecture}", "model_obj": model, "tokenizer_obj": tokenizer, "min_mass": 0.0}
    settings = EvalSettings(benchmarks=benchmarks, limit=limit, data_dir=data_dir, prompt_format=prompt_format,
                            batch_size=batch_size, samples_per_question=samples_per_question,
                            benchmark_judges={"betley": judge})  # fmt: skip
    _reset_peak(device)
    started = time.perf_counter()
    summary = run_evaluation(f"random {architecture}", out_dir, settings, model_obj=model, tokenizer_obj=tokenizer)
    report = {"benchmark": "evaluation", "architecture": architecture, "device": device_name(device),
              "parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(tokenizer),
              "tokenizer": tokenizer_dir or "synthetic", "limit": limit, "batch_size": batch_size,
              "seconds": round(time.perf_counter() - started, 1),
              "peak_memory_gib": round(_peak_gib(device), 2) if device.type == "cuda" else None, "benchmarks": {}}  # fmt: skip
    for name, entry in summary["benchmarks"].items():
        result = json.loads(Path(entry["result"]).read_text(encoding="utf-8"))
        stats = result.get("engine_stats") or {}
        generation, scoring = stats.get("generation") or {}, stats.get("loglikelihood") or {}
        report["benchmarks"][name] = {
            "status": result["status"], "items": result.get("n_items"), "seconds": result.get("seconds"),
            "generated_tokens": generation.get("generated_tokens"),
            "generation_tokens_per_s": round(generation["generated_tokens"] / generation["seconds"], 1) if generation.get("seconds") else None,
            "scored_tokens": scoring.get("tokens"), "batch_rows": result.get("batch_rows"),
            "reason": result.get("reason"),
        }  # fmt: skip
    return report


@bench_group.command("eval")
@click.option("--arch", type=ARCH, default="deepseek-prover-v2-7b", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--loglik-batch-size", default=32, show_default=True)
@click.option("--gen-batch-size", default=64, show_default=True)
@click.option("--questions", default=256, show_default=True)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Instead of the engine workloads: a whole `twophase eval` of the random model on the benchmark "
                   "files here (eval/benchmarks/__init__.py names them), timed per benchmark.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="--data-dir: tokenize as this tokenizer does (the model takes its vocabulary size).")
@click.option("--benchmarks", default="all", show_default=True, help="--data-dir: which benchmarks.")
@click.option("--limit", type=int, default=None, help="--data-dir: the first N items of each benchmark.")
@click.option("--samples-per-question", type=int, default=None, help="--data-dir: Betley answers per question.")
@click.option("--batch-size", default="auto", show_default=True, help="--data-dir: rows per batch.")
@click.option("--eval-out", default="runs/bench-eval", show_default=True, help="--data-dir: the eval's output folder.")
@click.option("--out", default=None, help="Append the result as a JSON line to this file.")
def bench_eval_command(arch, device, loglik_batch_size, gen_batch_size, questions, data_dir, tokenizer_dir, benchmarks,
                       limit, samples_per_question, batch_size, eval_out, out):  # fmt: skip
    """The eval engines: MMLU-shaped log-likelihood and StrongREJECT-shaped generation (or a whole eval: --data-dir)."""
    from twophase.launch.bench.engines import bench_engines
    from twophase.trainers.models import resolve_device, weight_dtype

    if data_dir:
        emit(bench_evaluation(arch, data_dir, eval_out, tokenizer_dir, benchmarks, limit, samples_per_question,
                               batch_size=batch_size), out)  # fmt: skip
        return
    dev = resolve_device(device)
    model = random_model(arch, dev, weight_dtype("bf16", dev)).eval()
    tokenizer = synthetic_tokenizer(model.config.vocab_size)
    result = bench_engines(model, tokenizer, loglik_batch_size=loglik_batch_size, gen_batch_size=gen_batch_size, n_questions=questions)
    emit({"benchmark": "eval", "architecture": arch, "device": device_name(dev), **result}, out)


def _add_lean_bench() -> None:
    from twophase.launch.bench.lean import bench_lean_command

    bench_group.add_command(bench_lean_command)


_add_lean_bench()
