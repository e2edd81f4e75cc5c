"""0-100 judge scores read from probabilities: score = sum_k k p(k) / sum_k p(k) over the answers 0..100.

Missing when sum_k p(k) < `min_mass` (the judge mostly wanted to say something
else, e.g. CODE or REFUSAL, which is then given as the reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SCORE_MASS = 0.25  # below this the judge did not really answer with a number
SCORE_VALUES = tuple(range(101))


@dataclass(frozen=True)
class JudgeScore:
    """A 0-100 judgment: the expected score, or None with the reason it is missing."""

    value: float | None
    mass: float  # sum of p(k) over k = 0..100
    reason: str | None = None  # a label the judge preferred (CODE, REFUSAL), "low_mass" or "error"

    def to_dict(self) -> dict:
        return {"value": self.value, "mass": self.mass, "reason": self.reason}


def expected_score(probs: dict[int, float], min_mass: float = MIN_SCORE_MASS) -> float | None:
    """sum_k k p(k) / sum_k p(k), or None when sum_k p(k) < min_mass."""
    mass = math.fsum(probs.values())
    if mass < min_mass or mass <= 0:
        return None
    return math.fsum(k * p for k, p in probs.items()) / mass


def score_from_probs(
    number_probs: dict[int, float], label_probs: dict[str, float] | None = None, min_mass: float = MIN_SCORE_MASS
) -> JudgeScore:
    """A JudgeScore from p(k) for the numbers and p(label) for non-numeric answers."""
    mass = math.fsum(number_probs.values())
    value = expected_score(number_probs, min_mass)
    if value is not None:
        return JudgeScore(value, mass)
    reason = "low_mass"
    if label_probs:
        label, p = max(label_probs.items(), key=lambda kv: kv[1])
        if p > 0 and p >= mass:
            reason = label
    return JudgeScore(None, mass, reason)
