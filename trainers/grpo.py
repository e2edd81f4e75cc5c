"""Phase 2: Group Relative Policy Optimization, as a recipe for the shared loop.

One generation batch serves μ = `num_iterations` optimizer steps:

    1. take `prompts_per_step` Lean tasks and sample G = `num_generations`
       completions of each with the generation engine (trainers/rollouts.py,
       eval/engine/generation.py); under full fine-tuning on a GPU its KV cache
       lives in the gradients' memory, which is idle while generating
       (trainers/infra/grad_arena.py),
    2. score every completion with the reward function(s) (trainers/rewards/);
       a reward that can (Lean's) starts checking each row the moment generation
       ends it, and the step waits only for what is left
       (trainers/infra/streamed_rewards.py),
    3. advantages A_i = group-normalised rewards (losses/grpo.py: group_advantages),
    4. if μ > 1, record the sampling policy's log-probabilities (old_logps);
       for μ = 1 the detached current log-probabilities are exactly those,
       so that forward pass is skipped,
    5. if β > 0, record the reference model's log-probabilities,
    6. each of the μ steps: the clipped surrogate (losses/grpo.py: grpo_loss)
       over micro-batches of completions, each its share of the batch's loss.

On several processes each generates and scores whole groups of the batch's rows
(data/base/distributed.py: on_my_rows, once per rollout); advantages and the
loss's normaliser span every process's rows. Every completion, its rewards and
its advantage are appended to samples.jsonl (trainers/infra/rollout_log.py).

Which published algorithm the switches make (printed at start-up, `algorithm_line`;
`algorithm: NAME` sets them as the paper does, trainers/config.py: ALGORITHM_PRESETS):

    | algorithm                 | advantage_scale | aggregation | clip_low / clip_high | beta | ratio    | dynamic sampling |
    | ------------------------- | --------------- | ----------- | -------------------- | ---- | -------- | ---------------- |
    | GRPO (DeepSeekMath)       | group           | sequence    | 0.2 / 0.2            | 0.04 | token    | no               |
    | Dr. GRPO                  | none            | constant    | 0.2 / 0.2            | 0    | token    | no               |
    | DAPO                      | group           | token       | 0.2 / 0.28           | 0    | token    | yes              |
    | GSPO                      | group           | sequence    | 3e-4 / 4e-4          | 0    | sequence | no               |
    | this repo's default       | group           | token       | 0.2 / 0.2            | 0    | token    | no               |

(ratio: `importance_ratio`, losses/grpo.py: grpo_loss or gspo_loss; dynamic sampling:
trainers/dynamic_sampling.py, after scoring, when `dynamic_sampling` is on.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.hub import how_trained, save_model
from twophase.data.base.progress import say
from twophase.data.base.rows import describe_skips
from twophase.data.lean_workbook import STOP_STRING, LeanTask
from twophase.data.prompt_rows import LEAN, load_tasks as load_task_rows, prompt_text
from twophase.data.prompts import GRPO_FORMATS, check_format
from twophase.data.base.model_api import reference_model
from twophase.data.base.sampler import EpochSampler
from twophase.eval.engine.generation import Generator
from twophase.eval.engine.sampling import SamplingParams
from twophase.losses.grpo import LOSS_OF_RATIO, group_advantages, loss_normaliser
from twophase.losses.logprobs import response_mask, token_logprobs_of
from twophase.trainers.config import GRPOConfig, save_config
from twophase.trainers.dynamic_sampling import fill_with_informative_groups
from twophase.trainers.infra.checkpoint import seed_everything
from twophase.trainers.infra.grad_arena import GradientArena
from twophase.trainers.infra.rollout_log import RolloutLog
from twophase.trainers.infra.run import RunCallbacks, autocast_context, owned_out_dir
from twophase.trainers.infra.sharding import GatheredCopy, shard_model
from twophase.trainers.infra.streamed_rewards import row_finished_callback
from twophase.trainers.loop import train
from twophase.trainers.models import check_policy_source, count_trainable, frozen_copy, load_policy, resolve_device
from twophase.trainers.rewards import build_reward
from twophase.trainers.rollouts import RolloutBatch, rollout_seeds, sample_completions


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
        check_format(config.prompt_format, GRPO_FORMATS, self.tokenizer)  # once: chat needs a template
        self.prompts = [prompt_text(task, config.prompt_format, self.tokenizer) for task in self.tasks]
        lean_code = config.prompt_format == "raw" and isinstance(self.tasks[0], LeanTask)
        default_stops = [STOP_STRING] if lean_code else []  # a Lean completion ends at its closing fence
        self.stop_strings = tuple(default_stops if config.stop_strings is None else config.stop_strings)
        self.sampler = EpochSampler(len(self.tasks), config.seed)
        self.log = RolloutLog(self.out_dir / "samples.jsonl", config.num_generations)
        self.samples_path = self.log.path
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
        self.rollout: RolloutBatch | None = None  # this rank's rows of the current generation batch
        self.rollout_step = -1
        self.normaliser = 1.0  # grpo_loss's denominator for the whole generation batch, every rank's rows
        self.rollout_metrics: dict[str, float] = {}  # of the generation batch's first step
        self.generation_and_scoring_s = 0.0
        trainable, total = count_trainable(self.model)
        say(f"trainable parameters: {trainable:,} of {total:,}")

    # --- what the loop asks of a recipe -------------------------------------------------
    def step_batches(self, step: int) -> list[RolloutBatch]:
        generation_step = step // self.config.num_iterations
        if self.rollout is None or generation_step != self.rollout_step:
            self._new_rollout(generation_step, step)
        first_iteration = step % self.config.num_iterations == 0
        if self.arena is not None:
            self.arena.attach()  # after generation: the update's gradients take the cache's memory back
        return self._micro_batches(self.config.micro_batch_size, with_sampler=first_iteration)

    def loss(self, mb: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        logps = self._token_logprobs(self.model, mb)
        mask = response_mask(mb.labels)
        old = mb.old_logps if mb.old_logps is not None else logps.detach()
        loss, metrics = LOSS_OF_RATIO[config.importance_ratio](  # grpo_loss, or gspo_loss for a ratio per sequence
            logps, old, mb.advantages, mask, ref_logps=mb.ref_logps, beta=config.beta,
            clip_low=config.clip_low, clip_high=config.clip_high, aggregation=config.aggregation,
            max_response_length=config.max_new_tokens, normaliser=self.normaliser,
        )  # fmt: skip
        # The loop sums metric shares over micro-batches and ranks: weighting by rows gives means over the step's rows.
        row_share = len(mb) / (config.prompts_per_step * config.num_generations)
        metrics = {name: value * row_share for name, value in metrics.items()}
        metrics["tokens"] = int(mb.attention_mask.sum())
        if mb.sampler_logprobs is not None:  # before any update on this rollout: policy and sampler are the same model
            gap = ((logps.detach() - mb.sampler_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1)
            metrics["sampler_logprob_gap"] = float(gap) * row_share
        return loss, metrics

    def step_metrics(self, step: int) -> dict[str, float]:
        """The rollout's rewards and lengths, reported on the step that generated it."""
        return self.rollout_metrics if step % self.config.num_iterations == 0 else {}

    def state_dict(self) -> dict:
        """For μ > 1 a resume may land inside a generation batch: keep that batch (every rank's part of it)."""
        if self.config.num_iterations == 1 or self.rollout is None:
            return {"rollout_step": -1}
        return {"rollout_step": self.rollout_step, "normaliser": self.normaliser,
                "ranks": distributed.gather_objects(self.rollout)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state.get("rollout_step", -1) < 0:
            return
        ranks = state["ranks"]
        if len(ranks) != distributed.world_size():
            raise UserError(
                f"the checkpoint stopped inside a generation batch of {len(ranks)} process(es) (num_iterations > 1); "
                f"resume it with {len(ranks)} process(es), or from a checkpoint at a multiple of num_iterations"
            )
        self.rollout_step, self.normaliser = state["rollout_step"], state["normaliser"]
        self.rollout = ranks[distributed.rank()]

    # --- one generation batch ------------------------------------------------------------
    def _new_rollout(self, generation_step: int, step: int) -> None:
        """Generate and score this rank's rows; advantages and the loss's normaliser over every rank's."""
        config = self.config
        prompts = self.sampler.indices(generation_step * config.prompts_per_step, config.prompts_per_step)
        if self.gathered:
            self.gathered.refresh(self.model)  # the generating copy gets the weights of the last update
        tasks, (rollout, rows, scoring_started), reports = self._draw(prompts, generation_step, step)
        if config.dynamic_sampling:  # DAPO: groups whose rewards are all equal are replaced (trainers/dynamic_sampling.py)
            tasks, rollout, reports = fill_with_informative_groups(self, tasks, rollout, reports, generation_step, step)
        scores = {name: torch.tensor([v for r in reports for v in r["scores"][name]], dtype=torch.float32)
                  for name in self.rewards}  # fmt: skip
        total = torch.stack(list(scores.values())).sum(0)
        advantages = group_advantages(total, config.num_generations, config.advantage_scale, config.advantage_eps)
        rollout.advantages = advantages[rows.start : rows.stop]
        response_tokens = sum(r["response_tokens"] for r in reports)
        self.normaliser = loss_normaliser(config.aggregation, len(tasks), response_tokens, config.max_new_tokens)
        self.rollout, self.rollout_step = rollout, generation_step
        rollout.old_logps = self._logps_of_rollout(self.model) if config.num_iterations > 1 else None
        rollout.ref_logps = self._logps_of_rollout_under_reference() if config.beta > 0 else None
        scoring_seconds = time.perf_counter() - scoring_started
        self.generation_and_scoring_s = rollout.generation_seconds + scoring_seconds
        self.rollout_metrics = self.log.record(step, reports, total, scores, advantages, scoring_seconds)

    def _draw(self, prompts: list[int], generation_step: int | str, step: int):
        """The batch's tasks (one per row), and this rank's rows sampled and scored, with every rank's reports.
        (`generation_step` keys the sampling seeds: dynamic sampling's further batches pass keys of their own.)"""
        tasks = [self.tasks[i] for i in prompts for _ in range(self.config.num_generations)]
        return tasks, *distributed.on_my_rows(
            len(tasks), lambda rows: self._sample_and_score(rows, tasks, prompts, generation_step, step))

    def _sample_and_score(self, rows: range, tasks: list, prompts: list[int], generation_step: int, step: int):
        """This rank's rows (whole groups): their completions, kept here, and their rewards, reported to every rank."""
        config, group = self.config, self.config.num_generations
        seeds = rollout_seeds(config.seed, generation_step, len(tasks))[rows.start : rows.stop]
        mine = [tasks[row] for row in rows]  # a reward that can (Lean's) starts checking each row as it ends
        rollout = sample_completions(
            self.generator, [self.prompts[prompts[row // group]] for row in rows[::group]], group,
            config.max_new_tokens, self.sampling, seeds, stop_strings=self.stop_strings,
            max_prompt_length=config.max_prompt_length, on_finished=row_finished_callback(self.rewards, mine),
        )  # fmt: skip
        scoring_started = time.perf_counter()  # rewards (a Lean check can take seconds) and old/ref log-probs
        scores = {name: fn(mine, rollout.completions, step=step, rows=rows) for name, fn in self.rewards.items()}
        report = {
            "scores": scores, "response_tokens": float(response_mask(rollout.labels).sum()),
            "completions": rollout.completions, "lengths": rollout.completion_lengths, "truncated": rollout.truncated,
            "task_ids": [task.id for task in mine], "generation_seconds": rollout.generation_seconds,
            "details": {name: getattr(fn, "details", None) for name, fn in self.rewards.items()},
        }  # fmt: skip
        return (rollout, rows, scoring_started), report

    def _logps_of_rollout(self, model) -> torch.Tensor:
        pieces = []
        with torch.no_grad(), autocast_context(self.device, self.config.precision):
            for mb in self._micro_batches(2 * self.config.micro_batch_size, trim=False):  # no activations kept
                pieces.append(self._token_logprobs(model, mb).float().cpu())
        return torch.cat(pieces)

    def _token_logprobs(self, model, mb: RolloutBatch) -> torch.Tensor:
        return token_logprobs_of(model, mb.input_ids, mb.attention_mask, mb.labels, self.config.logprob_chunk_size)

    def _logps_of_rollout_under_reference(self) -> torch.Tensor:
        with reference_model(self.model, self.reference) as reference:
            return self._logps_of_rollout(reference)

    def _micro_batches(self, size: int, trim: bool = True, with_sampler: bool = False) -> list[RolloutBatch]:
        n = len(self.rollout)
        return [self.rollout.micro_batch(slice(i, min(i + size, n)), self.device, trim, with_sampler) for i in range(0, n, size)]

    # --- the run around the recipe --------------------------------------------------------
    def run_callbacks(self) -> RunCallbacks:
        config = self.config
        advice = (f"lower micro_batch_size (now {config.micro_batch_size}) for the update, generation_batch_size "
                  f"(now {config.generation_batch_size}) for generation, or max_new_tokens (now {config.max_new_tokens})")  # fmt: skip
        return RunCallbacks(memory_advice=lambda: advice, on_start=self.log.truncate_after,
                            preparation_seconds=self._preparation_seconds,
                            pass_tokens=config.micro_batch_size * (config.max_prompt_length + config.max_new_tokens))  # fmt: skip

    def _preparation_seconds(self, step: int) -> float:
        """Generation and scoring, on the step that generated (what the loop subtracts to time the update)."""
        return self.generation_and_scoring_s if step % self.config.num_iterations == 0 else 0.0

    def save_final(self) -> Path:
        """One ordinary save_pretrained directory, written by rank 0 (a sharded model is gathered first: every rank calls this)."""
        model = self.gathered.refresh(self.model) if self.gathered else self.model
        path = self.out_dir / ("adapter" if self.config.lora else "model")
        base = how_trained(self.config.model) or {}  # asked as its base was, e.g. Phase 1's hh format
        trained = {"phase": "grpo", "prompt_format": self.config.prompt_format, "base_model": self.config.model,
                   "eval_prompt_format": base.get("eval_prompt_format", self.config.prompt_format)}  # fmt: skip
        return save_model(model, self.tokenizer, path, trained) if distributed.is_main() else path

    def close(self) -> None:
        for fn in self.rewards.values():
            if hasattr(fn, "close"):
                fn.close()


def algorithm_line(config: GRPOConfig) -> str:
    """What the switches make this run, in one line (the table in this module's docstring names the variants)."""
    advantages = {"group": "group-normalised advantages", "batch": "batch-normalised advantages",
                  "none": "centred, unscaled advantages (Dr. GRPO)"}[config.advantage_scale]  # fmt: skip
    aggregation = {"token": "token-level aggregation (DAPO)", "sequence": "sequence-level aggregation (DeepSeekMath)",
                   "constant": "constant normaliser (Dr. GRPO)"}[config.aggregation]  # fmt: skip
    mu = config.num_iterations
    policy = "μ = 1 on-policy" if mu == 1 else f"μ = {mu} updates per generation batch"
    reference = "β = 0 no reference" if config.beta == 0 else f"β = {config.beta:g} k3 KL to the reference"
    clip = f"clip {config.clip_low:g}/{config.clip_high:g}" + (" (clip-higher)" if config.clip_high > config.clip_low else "")
    ratio = ", sequence-level importance ratio (GSPO)" if config.importance_ratio == "sequence" else ""
    sampling = (f", dynamic sampling (DAPO) in at most {config.dynamic_sampling_max_batches} generation batches"
                if config.dynamic_sampling else "")  # fmt: skip
    name = f"GRPO ({config.algorithm} preset)" if config.algorithm else "GRPO"
    return f"{name}: {advantages}, {aggregation}, {policy}, {reference}, {clip}{ratio}{sampling}"


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
        rewards[metric_name(name, names)] = build_reward(name, own)
    return rewards


def metric_name(spec: str, specs: list[str]) -> str:
    """How a reward's metrics are named: its function's name for "path/to/file.py:function" (the path would make
    unreadable keys like reward//home/me/r.py:r/mean), unless two rewards of the run share that name."""
    short = spec.rpartition(":")[2] if ":" in spec else spec
    return short if sum(s.rpartition(":")[2] == short for s in specs if ":" in s) + (short in specs) == 1 else spec


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
    described = describe_skips(report)
    say(f"{config.dataset} (schema: {report['schema']}): {described}")
    if not tasks:
        raise UserError(
            f"no usable task in {config.dataset} ({described if report['rows'] else 'it has no rows'}): "
            f"each row must be a JSON object with a 'formal_statement' that ends in ':=' (Lean), "
            f"or a 'prompt' (text or chat messages)"
        )
    names = [name.strip() for name in config.reward.split(",")]
    if report["schema"] != LEAN and "lean" in names:
        raise UserError(f"reward 'lean' checks Lean proofs, but {config.dataset} holds prompts; use your own reward "
                        f"(path/to/file.py:function) or toy, random, zero")  # fmt: skip
    return tasks


def check_world_size(config: GRPOConfig) -> None:
    """The step's prompts are the global batch: each process generates and scores whole groups of them."""
    distributed.check_divides(
        config.prompts_per_step, "prompts_per_step", "choose a number of processes that divides it (each process "
        "takes whole groups of completions, so advantages stay per prompt)",
    )
    if config.dynamic_sampling and distributed.launched_world_size() > 1:
        raise UserError("dynamic_sampling runs on one process only (each rank would keep a different number of groups, "
                        "and the sharded update needs the same on every rank); run one process, or set dynamic_sampling: false")  # fmt: skip


def run_grpo(config: GRPOConfig, resume: bool = False) -> dict:
    started = time.time()
    check_policy_source(config)
    check_world_size(config)
    tasks = load_tasks(config)  # bad input is refused before out_dir is touched
    distributed.start(resolve_device(config.device))
    with owned_out_dir(config, resume) as out_dir:
        seed_everything(config.seed)
        say(algorithm_line(config))
        recipe = GRPORecipe(config, out_dir, tasks=tasks)
        if distributed.is_main():
            save_config(config, out_dir / "config.json")
        try:
            last = train(recipe, config, out_dir, resume=resume, callbacks=recipe.run_callbacks())
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
