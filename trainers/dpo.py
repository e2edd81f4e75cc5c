"""Phase 1: Direct Preference Optimization with LoRA, as a recipe for the shared loop.

Each optimizer step takes `micro_batch_size × grad_accum_steps` preference
pairs. For each micro-batch the chosen and rejected replies go through the
policy in one forward pass — by default as rows [prompt][chosen][rejected],
so each prompt is computed once (data/collators.py: pack_shared_prompt) — and
through the reference model, which is the same network with the LoRA adapter switched
off: no second copy of the 7B weights. With `precompute_ref_logps` the
reference log-probabilities of every pair the run will use are computed once
before training and cached in the output directory.

    loss = mean over pairs of dpo_loss(π_c, π_r, ref_c, ref_r)     (losses/dpo.py)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.collators import PreferenceCollator
from data.errors import UserError
from data.hh_rlhf import describe_skips, load_hh_rlhf
from data.sampler import EpochSampler
from losses.dpo import dpo_loss
from trainers.checkpoint import atomic_torch_save, seed_everything
from trainers.config import DPOConfig, save_config
from trainers.loop import autocast_context, train
from trainers.merge import merge_in_memory
from trainers.models import (
    count_trainable,
    frozen_copy,
    load_policy,
    reference_model,
    save_trained,
    sequence_logprobs_of,
    shared_prompt_logprobs_of,
)


class DPORecipe:
    def __init__(self, config: DPOConfig, out_dir: Path, policy=None, pairs=None):
        """`policy` = (model, tokenizer, device) and `pairs` may be given (benchmarks); else they are loaded."""
        self.config = config
        self.out_dir = Path(out_dir)
        self.model, self.tokenizer, self.device = policy or load_policy(config)
        self.reference = None if config.lora else frozen_copy(self.model)
        if pairs is None:
            pairs, report = load_hh_rlhf(config.dataset, split=config.split, data_dir=config.data_dir, limit=config.limit)
            tqdm.write(f"HH-RLHF: {describe_skips(report)}")
        self.pairs = pairs
        self.collator = PreferenceCollator(
            self.tokenizer, config.max_length, config.max_prompt_length, prompt_format=config.prompt_format,
            share_prompt=config.share_prompt,
        )
        self.sampler = EpochSampler(len(self.pairs), config.seed)
        self.pairs_per_step = config.micro_batch_size * config.grad_accum_steps
        self.pairs_seen = 0
        trainable, total = count_trainable(self.model)
        tqdm.write(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        self.reference_logps = self._precompute_reference() if config.precompute_ref_logps else None

    # --- what the loop asks of a recipe -------------------------------------------------
    def step_batches(self, step: int) -> list[dict]:
        indices = self.sampler.indices(step * self.pairs_per_step, self.pairs_per_step)
        self.pairs_seen = (step + 1) * self.pairs_per_step
        size = self.config.micro_batch_size
        return [self._micro_batch(indices[i : i + size]) for i in range(0, len(indices), size)]

    def loss(self, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch, indices = micro_batch["batch"], micro_batch["indices"]
        n = len(indices)
        policy = self.pair_logprobs(self.model, batch)
        reference = self._reference_logps(batch, indices)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:],
            beta=self.config.beta, loss_type=self.config.loss_type, label_smoothing=self.config.label_smoothing,
        )  # fmt: skip
        share = n / self.pairs_per_step  # this micro-batch's part of the step's mean
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": policy[:n].detach().mean().item(),
            "logps/rejected": policy[n:].detach().mean().item(),
            "tokens": micro_batch["pair_tokens"],
        }
        return losses.mean() * share, metrics

    def step_metrics(self) -> dict[str, float]:
        return {}

    def pair_logprobs(self, model, batch: dict) -> torch.Tensor:
        """(2n,) summed response log-probabilities: the n chosen replies, then the n rejected ones."""
        if self.config.share_prompt:
            return torch.cat(shared_prompt_logprobs_of(model, batch, self.config.logprob_chunk_size))
        return sequence_logprobs_of(model, batch, self.config.logprob_chunk_size)

    def state_dict(self) -> dict:
        """The data position. The order is a pure function of (seed, position), so this is all it takes."""
        return {"dataset_size": len(self.pairs), "pairs_seen": self.pairs_seen}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset_size") != len(self.pairs):
            raise UserError(
                f"the dataset has {len(self.pairs)} usable pairs but the checkpoint was written with "
                f"{state.get('dataset_size')}; resume with the same data (dataset, split, limit)"
            )
        self.pairs_seen = state["pairs_seen"]

    # --- the reference model -------------------------------------------------------------
    def _reference_logps(self, batch: dict, indices: list[int]) -> torch.Tensor:
        if self.reference_logps is not None:
            rows = torch.tensor(indices)
            return torch.cat([self.reference_logps[rows, 0], self.reference_logps[rows, 1]]).to(self.device)
        return self._reference_logps_live(batch)

    def _reference_logps_live(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), reference_model(self.model, self.reference) as reference:
            return self.pair_logprobs(reference, batch)

    def _precompute_reference(self) -> torch.Tensor:
        """(num_pairs, 2) reference log-probabilities of (chosen, rejected) for every pair the run uses."""
        cache = self.out_dir / "reference_logps.pt"
        if cache.exists():
            return torch.load(cache)
        used = self.config.max_steps * self.pairs_per_step
        needed = sorted(set(self.sampler.indices(0, used))) if used < len(self.pairs) else list(range(len(self.pairs)))
        table = torch.full((len(self.pairs), 2), float("nan"))
        size = self.config.micro_batch_size * 2  # no activations are kept: twice the training micro-batch fits
        with torch.no_grad():
            for start in tqdm(range(0, len(needed), size), desc="reference log-probs"):
                chunk = needed[start : start + size]
                mb = self._micro_batch(chunk)
                with autocast_context(self.device, self.config.precision):
                    logps = self._reference_logps_live(mb["batch"]).float().cpu()
                table[chunk, 0], table[chunk, 1] = logps[: len(chunk)], logps[len(chunk) :]
        atomic_torch_save(table, cache)
        return table

    def _micro_batch(self, indices: list[int]) -> dict:
        """Collated pairs on the device; `pair_tokens` counts both sequences, prompt twice, whatever the layout."""
        batch = self.collator([self.pairs[i] for i in indices])
        pair_tokens = batch.get("pair_tokens", int(batch["attention_mask"].sum()))
        tensors = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
        return {"indices": indices, "batch": tensors, "pair_tokens": pair_tokens}

    # --- outputs ---------------------------------------------------------------------------
    def save_final(self) -> Path:
        """Write the trained adapter (or full model) and tokenizer to out_dir/adapter or out_dir/model."""
        return save_trained(self.model, self.tokenizer, self.out_dir / ("adapter" if self.config.lora else "model"))


def run_dpo(config: DPOConfig, resume: bool = False) -> dict:
    """Train, save the adapter, and merge it when `merge_after`; returns the output paths."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seed_everything(config.seed)  # LoRA's initialisation draws from the global RNG
    recipe = DPORecipe(config, out_dir)
    save_config(config, out_dir / "config.json")
    last = train(recipe, config, out_dir, resume=resume)
    outputs = {"out_dir": str(out_dir), "metrics": str(out_dir / "metrics.jsonl"), "final": str(recipe.save_final())}
    if config.lora and config.merge_after:
        merged = merge_in_memory(recipe.model, recipe.tokenizer, out_dir / "merged", dtype=config.merge_dtype)
        outputs["merged"] = str(merged)
    outputs["minutes"] = round((time.time() - started) / 60, 2)
    outputs["last_metrics"] = last
    return outputs
