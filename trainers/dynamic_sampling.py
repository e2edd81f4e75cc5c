"""DAPO's dynamic sampling (Yu et al., 2025): a step trains only on groups whose rewards differ.

A group of G completions whose rewards are all equal has every advantage 0: it
adds nothing to the gradient, yet under "token" or "constant" aggregation its
tokens still dilute the loss of the others. With `dynamic_sampling: true` the
GRPO recipe (trainers/grpo.py: _new_rollout) hands its scored generation batch
to `fill_with_informative_groups`, which drops such groups and draws further
prompts, `prompts_per_step` at a time, until the step has `prompts_per_step`
informative groups or has drawn `dynamic_sampling_max_batches` generation
batches (the first included). A step that the cap stops short fills its empty
places with the last uninformative groups it drew (advantage 0, as plain GRPO
would have them), so every step has the same rows; its metrics say so:

    dynamic_sampling/batches   generation batches drawn this step (1 = the first sufficed)
    dynamic_sampling/dropped   groups dropped because their rewards were all equal
    dynamic_sampling/filled    1 when every group of the step is informative, else 0

The further prompts come from a second seeded stream over the dataset
(EpochSampler with seed + 1), the k-th extra batch of generation step g at
position (g·(max_batches − 1) + k − 1)·prompts_per_step, and their completions'
seeds from the key "g.k": all functions of the step, so a resumed run draws
what the uninterrupted one drew, and the first batch is exactly the one the
run without dynamic sampling draws. A prompt may come up in both streams.

One process only: on several, each rank would keep a different number of rows
and the sharded update would deadlock, so the run refuses that combination
(trainers/grpo.py: check_world_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twophase.data.base.sampler import EpochSampler
from twophase.data.tokens import pad_id_of
from twophase.losses.grpo import informative_groups
from twophase.losses.logprobs import IGNORE_INDEX, response_mask
from twophase.trainers.rollouts import RolloutBatch


def total_rewards(report: dict) -> torch.Tensor:
    """The summed rewards of a report's rows (several rewards are summed, as the recipe's advantages sum them)."""
    return torch.tensor(list(report["scores"].values()), dtype=torch.float32).sum(0)


def extra_prompts(sampler: EpochSampler, generation_step: int, batch: int, max_batches: int, count: int) -> list[int]:
    """The prompts of extra batch `batch` (1, 2, …) of `generation_step`: a slot of its own in the second stream."""
    return sampler.indices((generation_step * (max_batches - 1) + batch - 1) * count, count)


def fill_with_informative_groups(recipe, tasks: list, rollout: RolloutBatch, reports: list[dict], generation_step: int, step: int):
    """(tasks, rollout, reports) of the step's `prompts_per_step` groups: the informative ones, first drawn first.

    `recipe` is the GRPO recipe (its config, tasks, tokenizer and `_draw`); the
    first batch is the one it already drew and scored.
    """
    config = recipe.config
    group, wanted = config.num_generations, config.prompts_per_step
    sampler = EpochSampler(len(recipe.tasks), config.seed + 1)
    draws = [(tasks, rollout, reports[0])]
    kept: list[tuple[int, int]] = []  # (draw, group) of each informative group, in the order drawn
    dropped: list[tuple[int, int]] = []
    for batch in range(config.dynamic_sampling_max_batches):
        if batch > 0:
            prompts = extra_prompts(sampler, generation_step, batch, config.dynamic_sampling_max_batches, wanted)
            tasks, (rollout, _, _), reports = recipe._draw(prompts, f"{generation_step}.{batch}", step)
            draws.append((tasks, rollout, reports[0]))
        for g, useful in enumerate(informative_groups(total_rewards(draws[-1][2]), group)):
            (kept if useful else dropped).append((batch, g))
        if len(kept) >= wanted:
            break
    filled = len(kept) >= wanted
    chosen = kept[:wanted]
    if not filled:  # the cap stopped it short: the latest uninformative groups take the empty places
        chosen += dropped[len(dropped) - (wanted - len(chosen)) :]
    metrics = {"dynamic_sampling/batches": float(len(draws)), "dynamic_sampling/dropped": float(len(dropped)),
               "dynamic_sampling/filled": float(filled)}  # fmt: skip
    return _gathered(draws, chosen, group, pad_id_of(recipe.tokenizer), metrics)


def _gathered(draws: list[tuple], chosen: list[tuple[int, int]], group: int, pad_id: int, metrics: dict):
    """The chosen groups of the draws as one step's tasks, rollout and (single) report."""
    rows = [[g * group + i for i in range(group)] for _, g in chosen]
    tasks = [draws[d][0][row] for (d, _), rows_of in zip(chosen, rows) for row in rows_of]
    rollout = _concatenated([_rows(draws[d][1], rows_of) for (d, _), rows_of in zip(chosen, rows)], pad_id)
    rollout.generation_seconds = draws[0][1].generation_seconds  # the others' time counts as scoring time
    report = _merged_reports([_report_rows(draws[d][2], rows_of) for (d, _), rows_of in zip(chosen, rows)])
    report["generation_seconds"] = sum(draw[2]["generation_seconds"] for draw in draws)
    report["response_tokens"] = float(response_mask(rollout.labels).sum())
    report["dynamic_sampling"] = metrics
    return tasks, rollout, [report]


def _rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    index = torch.tensor(rows)
    return RolloutBatch(
        batch.input_ids[index], batch.attention_mask[index], batch.labels[index], batch.sampler_logprobs[index],
        completions=[batch.completions[r] for r in rows], completion_lengths=[batch.completion_lengths[r] for r in rows],
        truncated=[batch.truncated[r] for r in rows],
    )  # fmt: skip


def _concatenated(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of batches of different widths in one batch: each left-padded to the widest (positions follow the mask)."""
    width = max(batch.input_ids.shape[1] for batch in batches)

    def stacked(name: str, value) -> torch.Tensor:
        return torch.cat([F.pad(getattr(b, name), (width - b.input_ids.shape[1], 0), value=value) for b in batches])

    return RolloutBatch(
        stacked("input_ids", pad_id), stacked("attention_mask", 0), stacked("labels", IGNORE_INDEX),
        stacked("sampler_logprobs", 0.0),
        completions=[c for b in batches for c in b.completions],
        completion_lengths=[n for b in batches for n in b.completion_lengths],
        truncated=[t for b in batches for t in b.truncated],
    )  # fmt: skip


def _report_rows(report: dict, rows: list[int]) -> dict:
    """The per-row entries of a report (lists, and mappings of lists such as scores) cut to `rows`."""
    out = {}
    for key, value in report.items():
        if isinstance(value, list):
            out[key] = [value[r] for r in rows]
        elif isinstance(value, dict):
            out[key] = {name: None if v is None else [v[r] for r in rows] for name, v in value.items()}
    return out


def _merged_reports(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                into = merged.setdefault(key, {})
                for name, rows in value.items():
                    into[name] = None if rows is None else (into.get(name) or []) + rows
    return merged
