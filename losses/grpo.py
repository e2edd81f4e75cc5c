"""Group Relative Policy Optimization: group advantages and the clipped surrogate loss.

GRPO (Shao et al., 2024, DeepSeekMath) samples G completions for each prompt,
scores them, and uses each completion's reward relative to its own group as
the advantage of every one of its tokens, so no value network is needed.

Order: rewards, advantages and sequences come as consecutive groups,
[prompt 0: completions 0..G−1, prompt 1: completions 0..G−1, …].
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

AdvantageScale = Literal["group", "batch", "none"]
Aggregation = Literal["token", "sequence", "constant"]
ImportanceRatio = Literal["token", "sequence"]  # GRPO's per-token ρ | GSPO's per-sequence s (grpo_loss | gspo_loss)
ADVANTAGE_SCALES = get_args(AdvantageScale)
AGGREGATIONS = get_args(Aggregation)
MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: large enough to mean "clipped", small enough never to overflow float32


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages A_i of rewards r_i laid out as consecutive groups of `group_size`.

        scale="group"  A_i = (r_i − mean_g) / (std_g + eps)   (GRPO; std_g over the group)
        scale="batch"  A_i = (r_i − mean_g) / (std_B + eps)   (std over the whole batch)
        scale="none"   A_i =  r_i − mean_g                    (Dr. GRPO: no scaling)

    Standard deviations are Bessel-corrected (divide by n − 1), torch's default.
    A group whose rewards are all equal carries no signal: its advantages are
    exactly 0 (the centred rewards are 0, whatever the scale), never NaN.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid scales: {', '.join(ADVANTAGE_SCALES)}")
    rewards = rewards.to(torch.float32)
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    if scale == "group":
        spread = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    else:
        spread = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    # where() keeps a zero-spread group at exactly 0 even when eps = 0.
    return torch.where(centred == 0, torch.zeros_like(centred), centred / (spread + eps)).flatten()


def informative_groups(total_rewards: torch.Tensor, group_size: int) -> list[bool]:
    """Per group of `group_size` consecutive rewards: whether they differ (all equal: every advantage is 0,
    group_advantages above; DAPO's dynamic sampling drops such groups)."""
    groups = total_rewards.view(-1, group_size)
    return (groups.max(1).values != groups.min(1).values).tolist()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token",
    max_response_length: int | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective over response tokens, as a loss to minimise.

    Inputs are (N, T) per-token log-probabilities of the sampled tokens under
    the current policy (`logps`, with gradients), the policy that generated
    them (`old_logps`) and the reference model (`ref_logps`); `advantages`
    has shape (N,); `mask` (N, T) marks response tokens.

    Per token, with ρ = exp(logp − old_logp):

        ℓ = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A) + β·k3
        k3 = exp(ref − logp) − (ref − logp) − 1      (Schulman's unbiased KL estimator, ≥ 0)

    Log-ratios are clamped to ±20 before exp. Aggregation over the B rows of
    the whole batch (the step's, every process's), of which these N are a part:

        "token"     Σ ℓ / Σ mask                         (all tokens weigh the same; DAPO)
        "sequence"  Σ over sequences of (Σ_t ℓ / |y|) / B  (each sequence weighs the same; DeepSeekMath)
        "constant"  Σ ℓ / (B · L)                        (L = max_response_length, default T; Dr. GRPO)

    The denominator is `normaliser` (`loss_normaliser` of the whole batch), so
    the loss returned is exactly these rows' share: the shares of a batch's
    micro-batches add up to its loss, however it is split. Without it, these
    N rows are the whole batch.

    At ρ = 1 (the first update on fresh samples) the gradient of the
    surrogate is −A·∇logp per token, normalised as the aggregation says.

    Returns the loss and metrics over these rows: clip fractions of tokens clipped
    below (A < 0 and ρ < 1 − clip_low) and above (A > 0 and ρ > 1 + clip_high),
    and the mean k3 KL over response tokens.
    """
    mask = mask.to(logps.dtype)
    advantages = advantages.to(logps.dtype).unsqueeze(1)

    ratio = torch.exp(torch.clamp(logps - old_logps, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)

    kl = None
    if ref_logps is not None and beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl

    if normaliser is None:
        normaliser = loss_normaliser(aggregation, mask.shape[0], float(mask.sum()), max_response_length or mask.shape[1])
    loss = aggregate(per_token, mask, aggregation) / normaliser
    metrics = _clip_metrics(ratio.detach(), advantages.detach(), mask, clip_low, clip_high)
    if kl is not None:
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    return loss, metrics


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    aggregation: str = "sequence",
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al., 2025, Group Sequence Policy Optimization): `grpo_loss` with one ratio per sequence.

    The importance ratio of sequence i is the length-normalised (geometric-mean)
    ratio of its tokens, clipped per sequence:

        s_i = exp( (1/|y_i|) Σ_t (logp_t − old_logp_t) )
        ℓ_i = −min(s_i·A_i, clip(s_i, 1 − clip_low, 1 + clip_high)·A_i)

    carried by every response token of sequence i, so "sequence" aggregation
    (the paper's, and the `gspo` preset's) is the mean of ℓ_i over sequences.
    Unclipped, ∇ℓ_i = −A_i·s_i·(1/|y_i|)·Σ_t ∇logp_t: every token of a sequence
    gets the same weight; a clipped sequence gets none.

    Computed in the paper's GSPO-token form, token ratios sg[s_i]·π_t/sg[π_t]
    (sg: stop-gradient), passed to `grpo_loss` as old log-probs logp_t − log s_i:
    its value is s_i on every token and its gradient that of the sequence form,
    since advantages are per sequence here. The other keywords (`ref_logps`,
    `beta`, `max_response_length`, `normaliser`) and the metrics are grpo_loss's;
    a clip fraction counts the tokens of clipped sequences. The paper's clip range
    is 3e-4 / 4e-4: a geometric mean moves far less than one token's ratio.
    """
    weights = mask.to(logps.dtype)
    log_ratio = ((logps.detach() - old_logps) * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1)
    return grpo_loss(logps, logps.detach() - log_ratio, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                     aggregation=aggregation, **options)  # fmt: skip


LOSS_OF_RATIO = {"token": grpo_loss, "sequence": gspo_loss}  # config key importance_ratio -> the loss it selects


def loss_normaliser(aggregation: str, rows: int, response_tokens: float, max_response_length: int) -> float:
    """The denominator of `grpo_loss` for a whole batch of `rows` sequences holding `response_tokens` response tokens."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "token":
        return max(response_tokens, 1.0)
    if aggregation == "sequence":
        return float(rows)
    return float(rows * max_response_length)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1 per token: non-negative, zero iff logp = ref."""
    log_ratio = torch.clamp(ref_logps - logps, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The numerator of `grpo_loss`: (N, T) per-token losses summed over response tokens, per sequence for "sequence"."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    masked = per_token * mask
    if aggregation == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    return masked.sum()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def _clip_metrics(ratio, advantages, mask, clip_low, clip_high) -> dict[str, float]:
    clipped_low = (ratio < 1 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1 + clip_high) & (advantages > 0)
    return {
        "clip_fraction_low": _masked_mean(clipped_low.to(mask.dtype), mask),
        "clip_fraction_high": _masked_mean(clipped_high.to(mask.dtype), mask),
    }
