"""GRPO's audit log: every completion with its rewards and advantage in samples.jsonl, and the rollout's summary.

Not the algorithm (trainers/grpo.py is): what a person reads to see what the rewards rewarded.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from twophase.data.base import distributed
from twophase.losses.grpo import informative_groups
from twophase.trainers.infra.run import keep_records_up_to


class RolloutLog:
    def __init__(self, path: Path, num_generations: int):
        self.path = Path(path)
        self.num_generations = num_generations

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (all of them on a fresh start): they will be redone."""
        if self.path.exists():
            keep_records_up_to(self.path, step)

    def record(self, step: int, reports: list[dict], total, scores, advantages, scoring_seconds: float) -> dict[str, float]:
        """The rollout's summary metrics; rank 0 appends its rows to samples.jsonl. `reports`: every rank's, in row order."""
        rollout = {key: [v for report in reports for v in report[key]] for key in ("completions", "lengths", "truncated", "task_ids")}
        details = {name: [row for report in reports for row in (report["details"][name] or [])] for name in scores}
        generation_seconds = max(report["generation_seconds"] for report in reports)
        if distributed.is_main():
            self._write_samples(step, rollout, total, scores, advantages, details)
        summary = self._summary(total, scores, rollout, generation_seconds, scoring_seconds)
        summary.update(reports[0].get("dynamic_sampling", {}))  # how many batches filled the step (trainers/dynamic_sampling.py)
        return summary

    def _summary(self, total, scores, rollout, generation_seconds, scoring_seconds) -> dict[str, float]:
        lengths = torch.tensor(rollout["lengths"], dtype=torch.float32)
        generated = float(lengths.sum())
        metrics = {
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std()) if total.numel() > 1 else 0.0,
            "reward/zero_spread_groups": 1 - statistics.fmean(informative_groups(total, self.num_generations)),
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
        with open(self.path, "a", encoding="utf-8") as handle:
            for i, (task_id, text) in enumerate(zip(rollout["task_ids"], rollout["completions"])):
                record = {
                    "step": step + 1, "task_id": task_id, "sample": i % self.num_generations,
                    "completion": text, "reward": float(total[i]),
                    "rewards": {name: float(values[i]) for name, values in scores.items()},
                    "advantage": float(advantages[i]), "length": rollout["lengths"][i],
                    "truncated": rollout["truncated"][i],
                }  # fmt: skip
                for name, rows in details.items():
                    if rows:
                        record.setdefault("details", {})[name] = rows[i]
                handle.write(json.dumps(record) + "\n")
