"""Metrics with their uncertainty.

Every reported number is a `Metric`: its value, the counts behind it and a 95%
confidence interval. Two kinds of interval are used:

* proportions (refusal rate, accuracy, ...): the Wilson score interval, which
  stays inside [0, 1] and behaves at k = 0 or k = n, where the textbook
  normal interval collapses to a point;
* means of per-answer scores (judge scores): the normal approximation
  mean +/- 1.96 * s / sqrt(n) with the sample standard deviation s; with fewer
  than two values there is no interval (NaN, written as null).

Undefined values (n = 0) are NaN rather than an exception, so one empty
category never stops a benchmark from reporting the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021).

    pass@k = 1 - C(n-c, k) / C(n, k): one minus the chance that k samples drawn
    without replacement from the n are all failures. The binomials overflow a
    float for large n, so the ratio is taken as the product
    prod_{i=n-c+1}^{n} (1 - k/i), whose terms all lie in [0, 1].
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # fewer than k failures: every draw of k holds a pass
    all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        all_fail *= 1.0 - k / i
    return 1.0 - all_fail


Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass
class Metric:
    """One number with its counts and 95% interval.

    For proportions k is the count of successes out of n; for means k is None
    and n is the number of values averaged.
    """

    value: float
    k: float | None
    n: int
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        # NaN is not valid JSON; null says "undefined" to every reader.
        return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Metric":
        nan = float("nan")
        return cls(
            value=nan if d.get("value") is None else float(d["value"]),
            k=d.get("k"),
            n=int(d.get("n") or 0),
            ci_low=nan if d.get("ci_low") is None else float(d["ci_low"]),
            ci_high=nan if d.get("ci_high") is None else float(d["ci_high"]),
        )


def wilson_interval(k: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def proportion(k: int, n: int) -> Metric:
    """k out of n, with its Wilson 95% interval; NaN when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n, got k={k}, n={n}")
    low, high = wilson_interval(k, n)
    return Metric(value=k / n if n else float("nan"), k=k, n=n, ci_low=low, ci_high=high)


def mean_metric(values: list[float], bounds: tuple[float, float] | None = None) -> Metric:
    """The mean of `values` with a normal-approximation 95% interval.

    `bounds` = the range the values live in (e.g. (0, 1) for probabilities,
    (0, 100) for judge scores): the interval is clipped to it, since the
    normal approximation knows nothing of the range and can cross it on small n.
    """
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None, 0, float("nan"), float("nan"))
    mean = math.fsum(values) / n
    if n < 2:
        return Metric(mean, None, n, float("nan"), float("nan"))
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z_95 * math.sqrt(variance / n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Metric(mean, None, n, low, high)
