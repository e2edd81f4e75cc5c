"""Phase 2: Group Relative Policy Optimization, as a recipe for the shared loop.

One generation batch serves μ = `num_iterations` optimizer steps:

    1. take `prompts_per_step` Lean tasks and sample G = `num_generations`
       completions of each with the generation engine (trainers/rollouts.py,
       eval/engine/generation.py); under full fine-tuning on a GPU its KV cache lives
       in the gradients' memory, which is idle while generating
       (trainers/infra/grad_arena.py),
    2. score every completion with the reward function(s) (trainers/rewards/),
    3. advantages A_i = group-normalised rewards (losses/grpo.py: group_advantages),
    4. if μ > 1, record the sampling policy's log-probabilities (old_logps);
       for μ = 1 the detached current log-probabilities are exactly those,
       so that forward pass is skipped,
    5. if β > 0, record the reference model's log-probabilities,
    6. each of the μ steps: the clipped surrogate (losses/grpo.py: grpo_loss)
       over micro-batches of completions.

Every completion, its rewards and its advantage are appended to samples.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.hub import save_model
from twophase.data.lean_workbook import STOP_STRING, LeanTask
from twophase.data.prompt_rows import LEAN, load_tasks as load_task_rows, prompt_text
from twophase.data.sampler import EpochSampler
from twophase.losses.grpo import group_advantages, grpo_loss
from twophase.losses.logprobs import response_mask
from twophase.trainers.infra.checkpoint import seed_everything
from twophase.eval.engine.generation import Generator
from twophase.eval.engine.sampling import SamplingParams
from twophase.trainers.config import GRPOConfig, save_config
from twophase.trainers.infra.grad_arena import GradientArena
from twophase.trainers.loop import autocast_context, keep_records_up_to, owned_out_dir, train
from twophase.trainers.models import (
    check_policy_source,
    count_trainable,
    frozen_copy,
    load_policy,
    reference_model,
    resolve_device,
    token_logprobs_of,
)
from twophase.trainers.rewards import build_reward
from twophase.trainers.infra.sharding import GatheredCopy, shard_model
from twophase.trainers.rollouts import Rollout, RolloutSlice, rollout_seeds, rollout_slice, sample_completions


class GRPORecipe:
    def __init__(self, config: GRPOConfig, out_dir: Path, policy=None, tasks=None):
        """`policy` = (model, tokenizer, device) and `tasks` may be given (benchmarks); else they are loaded."""
        self.config = config
        self.out_dir = Path(out_dir)
        if policy is None:
            check_policy_source(config)
        # Bad data or a bad reward fails before the model loads.
        self.tasks = tasks if tasks is not None else load_tasks(config)
        self.rewards = build_rewards(config)
        try:
            self.model, self.tokenizer, self.device = policy or load_policy(config)
        except BaseException:
            self.close()  # a Lean reward has started its REPLs
            raise
        self.reference = frozen_copy(self.model) if config.beta > 0 and not config.lora else None
        # Several processes, full fine-tuning: train sharded (FSDP2), generate with a gathered copy (trainers/infra/sharding.py).
        self.gathered = None
        if distributed.active() and not config.lora:
            self.gathered = GatheredCopy(self.model)
            shard_model(self.model, self.device)
        self.prompts = [prompt_text(task, config.prompt_format, self.tokenizer) for task in self.tasks]
        lean_code = config.prompt_format == "raw" and isinstance(self.tasks[0], LeanTask)
        default_stops = [STOP_STRING] if lean_code else []  # a Lean completion ends at its closing fence
        self.stop_strings = tuple(default_stops if config.stop_strings is None else config.stop_strings)
        self.sampler = EpochSampler(len(self.tasks), config.seed)
        self.samples_path = self.out_dir / "samples.jsonl"
        self.sampling = SamplingParams(config.temperature, config.top_p, config.top_k).check()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Full fine-tuning on a GPU: the KV cache borrows the gradients' memory (see trainers/infra/grad_arena.py).
        # (Not when sharded: the gradients are DTensor shards, and generation uses the gathered copy.)
        full_on_gpu = self.device.type == "cuda" and not config.lora and self.gathered is None
        self.arena = GradientArena(trainable) if full_on_gpu else None
        self.generator = Generator(
            self.gathered.model if self.gathered else self.model, self.tokenizer, max_batch=config.generation_batch_size,
            cuda_graphs=config.generation_cuda_graphs, cache_storage=self.arena.buffer if self.arena else None,
        )  # fmt: skip
        self.rollout: Rollout | None = None  # this rank's part of the current generation batch
        self.rollout_step = -1
        self.advantages = self.old_logps = self.ref_logps = None
        self.rollout_tokens = 0.0  # response tokens of the whole generation batch, every rank's
        self.rollout_metrics: dict[str, float] = {}
        self.generation_and_scoring_s = 0.0
        trainable, total = count_trainable(self.model)
        tqdm.write(f"trainable parameters: {trainable:,} of {total:,}")

    # --- what the loop asks of a recipe -------------------------------------------------
    def step_batches(self, step: int) -> list[RolloutSlice]:
        generation_step = step // self.config.num_iterations
        if self.rollout is None or generation_step != self.rollout_step:
            self._new_rollout(generation_step, step)
        first_iteration = step % self.config.num_iterations == 0
        if self.arena is not None:
            self.arena.attach()  # after generation: the update's gradients take the cache's memory back
        return self._micro_batches(self.config.micro_batch_size, compare_sampler=first_iteration)

    def loss(self, mb: RolloutSlice) -> tuple[torch.Tensor, dict[str, float]]:
        logps = self._token_logprobs(self.model, mb)
        mask = response_mask(mb.labels)
        old = mb.old_logps if mb.old_logps is not None else logps.detach()
        loss, metrics = grpo_loss(
            logps, old, mb.advantages, mask, ref_logps=mb.ref_logps, beta=self.config.beta,
            clip_low=self.config.clip_low, clip_high=self.config.clip_high,
            aggregation=self.config.aggregation, max_response_length=self.config.max_new_tokens,
        )  # fmt: skip
        # The loop sums metric shares over micro-batches and ranks: weighting by rows gives means over the step's rows.
        metrics = {name: value * mb.row_share for name, value in metrics.items()}
        metrics["tokens"] = int(mb.attention_mask.sum())
        if mb.sampler_logprobs is not None:  # before any update on this rollout: policy and sampler are the same model
            gap = ((logps.detach() - mb.sampler_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1)
            metrics["sampler_logprob_gap"] = float(gap) * mb.row_share
        share = mask.sum().item() / max(self.rollout_tokens, 1.0) if self.config.aggregation == "token" else mb.row_share
        return loss * share, metrics

    def step_metrics(self) -> dict[str, float]:
        metrics, self.rollout_metrics = self.rollout_metrics, {}  # reported once, on the step that generated
        return metrics

    def preparation_seconds(self) -> float:
        """Generation and scoring, on the step that generated (what the loop subtracts to time the update)."""
        seconds, self.generation_and_scoring_s = self.generation_and_scoring_s, 0.0
        return seconds

    def memory_advice(self) -> str:
        """What to lower when a step does not fit in GPU memory."""
        config = self.config
        return (f"lower micro_batch_size (now {config.micro_batch_size}) for the update, generation_batch_size "
                f"(now {config.generation_batch_size}) for generation, or max_new_tokens (now {config.max_new_tokens})")  # fmt: skip

    def state_dict(self) -> dict:
        """For μ > 1 a resume may land inside a generation batch: keep that batch (every rank's part of it)."""
        if self.config.num_iterations == 1 or self.rollout is None:
            return {"rollout_step": -1}
        mine = {
            "rollout": self.rollout,
            "advantages": self.advantages,
            "old_logps": self.old_logps,
            "ref_logps": self.ref_logps,
        }
        return {"rollout_step": self.rollout_step, "rollout_tokens": self.rollout_tokens,
                "ranks": distributed.gather_objects(mine)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state.get("rollout_step", -1) < 0:
            return
        ranks = state["ranks"] if "ranks" in state else [state]  # checkpoints of one process before "ranks" existed
        if len(ranks) != distributed.world_size():
            raise UserError(
                f"the checkpoint stopped inside a generation batch of {len(ranks)} process(es) (num_iterations > 1); "
                f"resume it with {len(ranks)} process(es), or from a checkpoint at a multiple of num_iterations"
            )
        mine = ranks[distributed.rank()]
        self.rollout_step = state["rollout_step"]
        self.rollout = mine["rollout"]
        self.advantages, self.old_logps, self.ref_logps = mine["advantages"], mine["old_logps"], mine["ref_logps"]
        self.rollout_tokens = state.get("rollout_tokens") or float(response_mask(self.rollout.labels).sum())

    # --- one generation batch ------------------------------------------------------------
    def _new_rollout(self, generation_step: int, step: int) -> None:
        """This rank's prompts (all of them for one process): generate, score, and their advantages."""
        config = self.config
        indices = self.sampler.indices(generation_step * config.prompts_per_step, config.prompts_per_step)
        indices = indices[distributed.my_slice(config.prompts_per_step)]  # whole groups: advantages stay per prompt
        rows = config.prompts_per_step * config.num_generations
        seeds = rollout_seeds(config.seed, generation_step, rows)[distributed.my_slice(rows)]
        if self.gathered:
            self.gathered.refresh(self.model)  # the generating copy gets the weights of the last update
        self.rollout = sample_completions(
            self.generator, [self.prompts[i] for i in indices], config.num_generations, config.max_new_tokens,
            self.sampling, seeds, stop_strings=self.stop_strings, max_prompt_length=config.max_prompt_length,
        )  # fmt: skip
        self.rollout_step = generation_step
        scoring_started = time.perf_counter()  # rewards (a Lean check can take seconds) and old/ref log-probs
        tasks = [self.tasks[i] for i in indices for _ in range(config.num_generations)]
        scores = {
            name: torch.tensor(fn(tasks, self.rollout.completions, step=step), dtype=torch.float32)
            for name, fn in self.rewards.items()
        }
        # Every rank's rewards, in global row order: "batch" advantages and the logged summaries span all ranks.
        everyone = distributed.gather_objects(scores)
        all_scores = {name: torch.cat([s[name] for s in everyone]) for name in scores}
        total = torch.stack(list(all_scores.values())).sum(0)
        advantages = group_advantages(total, config.num_generations, config.advantage_scale, config.advantage_eps)
        self.advantages = advantages[distributed.my_slice(rows)]
        self.rollout_tokens = distributed.sum_over_ranks(float(response_mask(self.rollout.labels).sum()))
        self.old_logps = self._logps_of_rollout(self.model) if config.num_iterations > 1 else None
        self.ref_logps = self._logps_of_rollout_under_reference() if config.beta > 0 else None
        scoring_seconds = time.perf_counter() - scoring_started
        self.generation_and_scoring_s = self.rollout.generation_seconds + scoring_seconds
        self._log_rollout(step, tasks, total, all_scores, advantages, scoring_seconds)

    def _logps_of_rollout(self, model) -> torch.Tensor:
        pieces = []
        with torch.no_grad(), autocast_context(self.device, self.config.precision):
            for mb in self._micro_batches(2 * self.config.micro_batch_size, trim=False):  # no activations kept
                pieces.append(self._token_logprobs(model, mb).float().cpu())
        return torch.cat(pieces)

    def _token_logprobs(self, model, mb: RolloutSlice) -> torch.Tensor:
        return token_logprobs_of(model, mb.input_ids, mb.attention_mask, mb.labels, self.config.logprob_chunk_size)

    def _logps_of_rollout_under_reference(self) -> torch.Tensor:
        with reference_model(self.model, self.reference) as reference:
            return self._logps_of_rollout(reference)

    def _micro_batches(self, size: int, trim: bool = True, compare_sampler: bool = False) -> list[RolloutSlice]:
        global_rows = self.config.prompts_per_step * self.config.num_generations
        return [
            rollout_slice(self.rollout, slice(i, min(i + size, len(self.rollout))), self.device, global_rows,
                          self.advantages, self.old_logps, self.ref_logps, trim=trim, compare_sampler=compare_sampler)
            for i in range(0, len(self.rollout), size)
        ]  # fmt: skip

    # --- logging ----------------------------------------------------------------------------
    def _log_rollout(self, step, tasks, total, scores, advantages, scoring_seconds) -> None:
        """The step's reward and length summaries and its samples.jsonl records, over every rank's rows."""
        mine = {
            "completions": self.rollout.completions,
            "lengths": self.rollout.completion_lengths,
            "truncated": self.rollout.truncated,
            "task_ids": [task.id for task in tasks],
            "details": {name: getattr(fn, "details", None) for name, fn in self.rewards.items()},
        }
        everyone = distributed.gather_objects(mine)
        rollout = {key: [v for rank in everyone for v in rank[key]] for key in ("completions", "lengths", "truncated", "task_ids")}
        details = {name: [row for rank in everyone for row in (rank["details"][name] or [])] for name in self.rewards}
        generation_seconds = max(distributed.gather_objects(self.rollout.generation_seconds))
        self.rollout_metrics = self._rollout_summary(total, scores, rollout, generation_seconds, scoring_seconds)
        if distributed.is_main():
            self._write_samples(step, rollout, total, scores, advantages, details)

    def _rollout_summary(self, total, scores, rollout, generation_seconds, scoring_seconds) -> dict[str, float]:
        groups = total.view(-1, self.config.num_generations)
        lengths = torch.tensor(rollout["lengths"], dtype=torch.float32)
        generated = float(lengths.sum())
        metrics = {
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std()) if total.numel() > 1 else 0.0,
            "reward/zero_spread_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "completion/length_mean": float(lengths.mean()),
            "completion/length_min": float(lengths.min()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated_fraction": sum(rollout["truncated"]) / len(rollout["truncated"]),
            "time/generation_s": generation_seconds,
            "time/scoring_s": scoring_seconds,
            "generation_tokens_per_s": generated / max(generation_seconds, 1e-9),
        }
        for name, values in scores.items():
            metrics[f"reward/{name}"] = float(values.mean())
        return metrics

    def _write_samples(self, step, rollout, total, scores, advantages, details) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for i, (task_id, text) in enumerate(zip(rollout["task_ids"], rollout["completions"])):
                record = {
                    "step": step + 1, "task_id": task_id, "sample": i % self.config.num_generations,
                    "completion": text, "reward": float(total[i]),
                    "rewards": {name: float(values[i]) for name, values in scores.items()},
                    "advantage": float(advantages[i]), "length": rollout["lengths"][i],
                    "truncated": rollout["truncated"][i],
                }  # fmt: skip
                for name, rows in details.items():
                    if rows:
                        record.setdefault("details", {})[name] = rows[i]
                handle.write(json.dumps(record) + "\n")

    def truncate_logs_after(self, step: int) -> None:
        """Drop audit records of steps after `step` (all of them on a fresh start): they will be redone."""
        if self.samples_path.exists():
            keep_records_up_to(self.samples_path, step)

    def save_final(self) -> Path:
        """One ordinary save_pretrained directory, written by rank 0 (a sharded model is gathered first: every rank calls this)."""
        model = self.gathered.refresh(self.model) if self.gathered else self.model
        path = self.out_dir / ("adapter" if self.config.lora else "model")
        return save_model(model, self.tokenizer, path) if distributed.is_main() else path

    def close(self) -> None:
        for fn in self.rewards.values():
            if hasattr(fn, "close"):
                fn.close()


def build_rewards(config: GRPOConfig) -> dict:
    """name -> reward function, for each name in `config.reward` (comma-separated rewards are summed)."""
    names = [name.strip() for name in config.reward.split(",") if name.strip()]
    if not names:
        raise UserError("config key reward is empty; use random, zero, lean, toy or module:function")
    unused = sorted(set(config.reward_options) - set(names))
    if unused:
        raise UserError(f"reward_options.{unused[0]} gives options to a reward that reward = {config.reward!r} does not use")
    rewards = {}
    for name in names:
        own = dict(config.reward_options.get(name, {}))
        if name == "random":
            own.setdefault("seed", config.seed)
        if name == "lean":
            own = _lean_options(own, config.prompt_format)
        rewards[name] = build_reward(name, own)
    return rewards


def _lean_options(options: dict, prompt_format: str) -> dict:
    """The Lean reward checks the text the prompts ask for: its prompt format is the recipe's."""
    given = options.get("prompt_format", prompt_format)
    if given != prompt_format:
        raise UserError(
            f"reward_options.lean.prompt_format = {given!r} but the prompts are {prompt_format!r}: the reward would "
            f"check the wrong part of each answer; drop that option (it follows prompt_format)"
        )
    return {**options, "prompt_format": prompt_format}


def load_tasks(config: GRPOConfig) -> list:
    """The run's tasks, Lean theorems or prompts (data/prompt_rows.py); a source that yields none is one clear error."""
    tasks, report = load_task_rows(config.dataset, split=config.split, limit=config.limit)
    described = f"used {report['used']} of {report['rows']} rows; skipped {report['skipped'] or 'none'}"
    tqdm.write(f"{config.dataset} (layout: {report['layout']}): {described}")
    if not tasks:
        raise UserError(
            f"no usable task in {config.dataset} ({described if report['rows'] else 'it has no rows'}): "
            f"each row must be a JSON object with a 'formal_statement' that ends in ':=' (Lean), "
            f"or a 'prompt' (text or chat messages)"
        )
    names = [name.strip() for name in config.reward.split(",")]
    if report["layout"] != LEAN and "lean" in names:
        raise UserError(f"reward 'lean' checks Lean proofs, but {config.dataset} holds prompts; use your own reward "
                        f"(path/to/file.py:function) or toy, random, zero")  # fmt: skip
    return tasks


def check_world_size(config: GRPOConfig) -> None:
    """The step's prompts are the global batch: each process generates and scores whole groups of them."""
    distributed.check_divides(
        config.prompts_per_step, "prompts_per_step", "choose a number of processes that divides it (each process "
        "takes whole groups of completions, so advantages stay per prompt)",
    )


def run_grpo(config: GRPOConfig, resume: bool = False) -> dict:
    started = time.time()
    check_policy_source(config)
    check_world_size(config)
    tasks = load_tasks(config)  # bad input is refused before out_dir is touched
    distributed.start(resolve_device(config.device))
    with owned_out_dir(config.out_dir, resume) as out_dir:
        seed_everything(config.seed)
        recipe = GRPORecipe(config, out_dir, tasks=tasks)
        if distributed.is_main():
            save_config(config, out_dir / "config.json")
        try:
            last = train(recipe, config, out_dir, resume=resume)
            final = recipe.save_final()
            distributed.barrier()  # every rank returns once rank 0's outputs exist
        finally:
            recipe.close()
    return {
        "out_dir": str(out_dir),
        "metrics": str(out_dir / "metrics.jsonl"),
        "samples": str(recipe.samples_path),
        "final": str(final),
        "minutes": round((time.time() - started) / 60, 2),
        "last_metrics": last,
    }
