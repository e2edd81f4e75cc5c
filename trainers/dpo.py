"""Phase 1: Direct Preference Optimization with LoRA, as a recipe for the shared loop.

Each optimizer step takes `micro_batch_size × grad_accum_steps` preference
pairs. `layout` (data/collators.py: the batch layout) decides how they are laid out and grouped
into forward passes: `micro_batch_size` padded pairs a pass, either as two rows
a pair ("stacked") or as one row [prompt][chosen][rejected] so each prompt is
computed once ("shared_prompt", the default); or, packed, as many pairs end to
end in one unpadded row as fit in `max_tokens_per_pass` tokens ("packed",
"packed_shared_prompt"; data/packing.py). Each pass goes through the policy and
through the reference model, which is the same network with the LoRA adapter
switched off: no second copy of the 7B weights. With `precompute_ref_logps` the
reference log-probabilities of every pair the run will use are computed once
before training and cached in the output directory.

    loss = mean over pairs of dpo_loss(π_c, π_r, ref_c, ref_r)     (losses/dpo.py)

Which published loss `loss_type` makes it (printed at start-up, `algorithm_line`):

    | loss_type | algorithm                                   | label_smoothing ε               |
    | --------- | ------------------------------------------- | ------------------------------- |
    | sigmoid   | DPO (Rafailov et al., 2023)                 | > 0: conservative DPO (cDPO)    |
    | robust    | robust DPO (Chowdhury et al., 2024)         | the assumed label-flip rate     |
    | ipo       | IPO (Azar et al., 2023), π per reply token  | unused                          |
    | hinge     | SLiC-style hinge (Zhao et al., 2023)        | unused                          |
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twophase.data.base import distributed
from twophase.data.collators import PACKED_LAYOUTS, PreferenceCollator, TokenizedPair, collate_pairs, split_into_passes
from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_torch_save
from twophase.data.base.progress import progress, say
from twophase.data.base.rows import describe_skips
from twophase.data.preferences import SCHEMA_FIELDS, load_preferences
from twophase.data.base.hub import how_trained, save_model
from twophase.data.base.model_api import causal_lm_of, reference_model
from twophase.data.base.sampler import EpochSampler
from twophase.losses.dpo import dpo_loss
from twophase.trainers.infra.checkpoint import seed_everything
from twophase.trainers.config import DPOConfig, save_config
from twophase.trainers.infra.run import RunCallbacks, autocast_context, owned_out_dir
from twophase.trainers.loop import train
from twophase.trainers.merge import merge_in_memory
from twophase.losses.logprobs import response_mask, sequence_logprobs, token_logprobs_from_hidden, token_logprobs_of
from twophase.trainers.infra.packed_attention import PackedSegments, use_packed_attention, verify_packed_attention
from twophase.trainers.models import check_policy_source, count_trainable, frozen_copy, load_policy, resolve_device


class DPORecipe:
    def __init__(self, config: DPOConfig, out_dir: Path, policy=None, pairs=None):
        """`policy` = (model, tokenizer, device) and `pairs` may be given (benchmarks); else they are loaded."""
        self.config = config
        self.out_dir = Path(out_dir)
        packed = config.layout in PACKED_LAYOUTS
        if packed and config.max_tokens_per_pass < 2 * config.max_length:
            raise UserError(
                f"max_tokens_per_pass ({config.max_tokens_per_pass}) must be at least 2 x max_length "
                f"({2 * config.max_length}) so that any pair fits in one pass"
            )
        if policy is None:
            check_policy_source(config)
        self.pairs = pairs if pairs is not None else load_pairs(config)  # bad data fails before the model loads
        self.model, self.tokenizer, self.device = policy or load_policy(config)
        if packed:
            use_packed_attention(causal_lm_of(self.model))
            if self.device.type == "cuda":
                verify_packed_attention(self.device)
        self.reference = None if config.lora else frozen_copy(self.model)
        self.collator = PreferenceCollator(
            self.tokenizer, config.max_length, config.max_prompt_length, prompt_format=config.prompt_format,
            layout=config.layout,
        )
        self.sampler = EpochSampler(len(self.pairs), config.seed)
        self.pairs_per_step = config.micro_batch_size * config.grad_accum_steps
        self.pairs_seen = 0
        trainable, total = count_trainable(self.model)
        say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        self.reference_logps = self._precompute_reference() if config.precompute_ref_logps else None

    # --- what the loop asks of a recipe -------------------------------------------------
    def step_batches(self, step: int) -> list[dict]:
        """This rank's slice of the step's pairs (all of them for one process), grouped into passes."""
        indices = self.sampler.indices(step * self.pairs_per_step, self.pairs_per_step)
        self.pairs_seen = (step + 1) * self.pairs_per_step
        mine = indices[distributed.my_slice(self.pairs_per_step)]
        return self._micro_batches(mine, self.config.micro_batch_size, self.config.max_tokens_per_pass)

    def loss(self, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch, indices = micro_batch["batch"], micro_batch["indices"]
        n = len(indices)
        policy = self.pair_logprobs(self.model, batch)
        reference = self._reference_logps(batch, indices)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:],
            beta=self.config.beta, loss_type=self.config.loss_type, label_smoothing=self.config.label_smoothing,
        )  # fmt: skip
        share = n / self.pairs_per_step  # this micro-batch's part of the (global) step's mean
        # The loop sums the micro-batches' shares (over every rank): means over the step's pairs.
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item() * share,
            "rewards/rejected": rejected_rewards.mean().item() * share,
            "rewards/accuracy": float((chosen_rewards > rejected_rewards).sum()) / n * share,
            "rewards/margin": (chosen_rewards - rejected_rewards).mean().item() * share,
            "logps/chosen": policy[:n].detach().mean().item() * share,
            "logps/rejected": policy[n:].detach().mean().item() * share,
            "tokens": micro_batch["pair_tokens"],
        }
        return losses.mean() * share, metrics

    def step_metrics(self, step: int) -> dict[str, float]:
        return {}  # every DPO metric is a sum of micro-batch shares

    def pair_logprobs(self, model, batch: dict) -> torch.Tensor:
        """(2n,) reply log-probabilities, chosen then rejected: summed, or for IPO averaged over each reply's tokens (as TRL)."""
        summed = pair_logprobs_of(model, batch, self.config.layout, self.config.logprob_chunk_size)
        return summed / batch["reply_tokens"] if self.config.loss_type == "ipo" else summed

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
        # No activations are kept, so a pass can hold twice the training pass's pairs or tokens.
        pairs_per_pass, tokens_per_pass = 2 * self.config.micro_batch_size, 2 * self.config.max_tokens_per_pass
        chunk = 2 * self.pairs_per_step  # pairs collated at a time: bounds the host and device memory
        needed = distributed.shard_of(needed)  # each rank computes a share; the table is gathered below
        with torch.no_grad():
            for start in progress(range(0, len(needed), chunk), desc="reference log-probs", disable=not distributed.is_main()):
                for mb in self._micro_batches(needed[start : start + chunk], pairs_per_pass, tokens_per_pass):
                    with autocast_context(self.device, self.config.precision):
                        logps = self._reference_logps_live(mb["batch"]).float().cpu()
                    n = len(mb["indices"])
                    table[mb["indices"], 0], table[mb["indices"], 1] = logps[:n], logps[n:]
        for other in distributed.gather_objects(table):
            table = torch.where(other.isnan(), table, other)
        if distributed.is_main():
            atomic_torch_save(table, cache)
        return table

    def _micro_batches(self, indices: list[int], pairs_per_pass: int, tokens_per_pass: int) -> list[dict]:
        """These pairs, grouped into forward passes by the layout, on the device (order kept).

        `pair_tokens` counts the prompt twice and each reply once, whatever the layout.
        """
        pairs = [self.tokenized_pair(i) for i in indices]
        passes = split_into_passes(pairs, self.config.layout, pairs_per_pass, tokens_per_pass)
        return [self._on_device([indices[j] for j in group], [pairs[j] for j in group]) for group in passes]

    def tokenized_pair(self, index: int) -> TokenizedPair:
        """The token ids of pair `index`, truncated as configured."""
        return self.collator.tokenize_pair(self.pairs[index])

    def _on_device(self, indices: list[int], pairs: list[TokenizedPair]) -> dict:
        batch = collate_pairs(pairs, self.config.layout, self.collator.pad_id)
        on_device = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        on_device["reply_tokens"] = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], device=self.device)
        return {"indices": indices, "batch": on_device, "pair_tokens": batch["pair_tokens"]}

    # --- outputs ---------------------------------------------------------------------------
    def save_final(self) -> Path:
        """Write the trained adapter (or full model) and tokenizer to out_dir/adapter or out_dir/model."""
        trained = {"phase": "dpo", "prompt_format": self.config.prompt_format, "base_model": self.config.model,
                   "eval_prompt_format": self.config.prompt_format}  # fmt: skip
        return save_model(self.model, self.tokenizer, self.out_dir / ("adapter" if self.config.lora else "model"), trained)


def load_pairs(config: DPOConfig) -> list:
    """The run's preference pairs in any accepted row schema (data/preferences.py); none usable is one clear error."""
    pairs, report = load_preferences(config.dataset, split=config.split, data_dir=config.data_dir, limit=config.limit)
    say(f"{config.dataset} (schema: {report['schema']}): {describe_skips(report)}")
    if not pairs:
        raise UserError(
            f"no usable preference pair in {config.dataset} ({describe_skips(report) if report['rows'] else 'it has no rows'}): "
            f"read as schema '{report['schema']}', each row must be a JSON object with {SCHEMA_FIELDS[report['schema']]} "
            f"(trainers/README.md: 'Your own data')"
        )
    return pairs


def check_world_size(config: DPOConfig) -> None:
    """The step's pairs are the global batch: each of the processes takes an equal share of them."""
    distributed.check_divides(
        config.micro_batch_size * config.grad_accum_steps, "micro_batch_size x grad_accum_steps (pairs per step)",
        "choose a number of processes that divides it, or change grad_accum_steps",
    )


def algorithm_line(config: DPOConfig) -> str:
    """What `loss_type` and the other switches make this run, in one line (the table in this module's docstring)."""
    name = {"sigmoid": "DPO" if config.label_smoothing == 0 else f"cDPO (ε = {config.label_smoothing:g})",
            "robust": f"robust DPO (ε = {config.label_smoothing:g})", "ipo": "IPO", "hinge": "SLiC hinge"}[config.loss_type]  # fmt: skip
    reference = "reference = the base model under the LoRA adapter" if config.lora else "reference = a frozen copy"
    cached = ", reference log-probs precomputed" if config.precompute_ref_logps else ""
    return f"{name}: β = {config.beta:g}, {reference}{cached}, {config.layout} batch layout"


def pass_tokens(config: DPOConfig) -> int:
    """The most tokens one training pass holds: the packed budget, or the padded rows of a micro-batch."""
    return config.max_tokens_per_pass if config.layout in PACKED_LAYOUTS else 2 * config.micro_batch_size * config.max_length


def memory_advice(config: DPOConfig) -> str:
    """What to lower when a step does not fit in GPU memory."""
    if config.layout in PACKED_LAYOUTS:
        return f"lower max_tokens_per_pass (now {config.max_tokens_per_pass}; at least 2 x max_length) or max_length"
    return f"lower micro_batch_size (now {config.micro_batch_size}; raise grad_accum_steps to keep the step's pairs) or max_length"


def run_dpo(config: DPOConfig, resume: bool = False) -> dict:
    """Train, save the adapter, and merge it when `merge_after`; returns the output paths."""
    started = time.time()
    check_policy_source(config)
    check_world_size(config)
    pairs = load_pairs(config)  # bad input is refused before out_dir is touched
    distributed.start(resolve_device(config.device))
    with owned_out_dir(config, resume) as out_dir:
        seed_everything(config.seed)  # LoRA's initialisation draws from the global RNG: the same on every rank
        say(algorithm_line(config))
        recipe = DPORecipe(config, out_dir, pairs=pairs)
        if distributed.is_main():
            save_config(config, out_dir / "config.json")
        callbacks = RunCallbacks(memory_advice=lambda: memory_advice(config), pass_tokens=pass_tokens(config))
        last = train(recipe, config, out_dir, resume=resume, callbacks=callbacks)
        outputs = {"out_dir": str(out_dir), "metrics": str(out_dir / "metrics.jsonl")}
        if distributed.is_main():  # every rank holds the same weights: one writes them
            outputs["final"] = str(recipe.save_final())
            if config.lora and config.merge_after:
                merged = merge_in_memory(recipe.model, recipe.tokenizer, out_dir / "merged", dtype=config.merge_dtype,
                                         trained=how_trained(outputs["final"]))  # fmt: skip
                outputs["merged"] = str(merged)
        distributed.barrier()  # every rank returns once rank 0's outputs exist
    outputs["minutes"] = round((time.time() - started) / 60, 2)
    outputs["last_metrics"] = last
    return outputs


# --- the policy's forward pass on a collated batch (data/collators.py: the batch layouts) -----------------
def shared_prompt_logprobs_of(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected log-probabilities from one pass over [prompt][chosen][rejected] rows.

    See data/collators.py: pack_shared_prompt for the layout.
    """
    lm = causal_lm_of(model)
    mask = batch["allowed"][:, None, :, :]  # (B, 1, T, T): one mask for every head
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    head = lm.get_output_embeddings()
    sums = []
    for labels in (batch["chosen_labels"], batch["rejected_labels"]):
        sums.append(sequence_logprobs(token_logprobs_from_hidden(hidden, head, labels, chunk_size), response_mask(labels)))
    return sums[0], sums[1]


def packed_logprobs_of(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """(2n,) summed chosen then rejected log-probabilities of the n pairs of one packed row.

    See data/packing.py for the layout; the model must use packed attention
    (trainers/infra/packed_attention.py: use_packed_attention).
    """
    lm = causal_lm_of(model)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
        packed_segments=PackedSegments.of_batch(batch),
    ).last_hidden_state  # fmt: skip
    head = lm.get_output_embeddings()
    owner = batch["pair_of_token"][0, 1:]  # the state at t predicts the label at t + 1, which belongs to that pair
    sums = []
    for labels in (batch["chosen_labels"], batch["rejected_labels"]):
        logps = token_logprobs_from_hidden(hidden, head, labels, chunk_size)[0]
        sums.append(logps.new_zeros(batch["num_pairs"]).index_add(0, owner, logps))
    return torch.cat(sums)


def pair_logprobs_of(model, batch: dict, layout: str, chunk_size: int) -> torch.Tensor:
    """(2n,) summed reply log-probabilities of a collated batch: the n chosen replies, then the n rejected ones."""
    if layout == "stacked":
        return sequence_logprobs_of(model, batch, chunk_size)
    if layout == "shared_prompt":
        return torch.cat(shared_prompt_logprobs_of(model, batch, chunk_size))
    return packed_logprobs_of(model, batch, chunk_size)


def sequence_logprobs_of(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """Summed response log-probability of each sequence in a collated batch."""
    logps = token_logprobs_of(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size)
    return sequence_logprobs(logps, response_mask(batch["labels"]))
