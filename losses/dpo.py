"""The Direct Preference Optimization loss and its variants.

Notation, for one preference pair (x, y_c, y_r) of a prompt, a chosen and a
rejected response:

    π_c, π_r     summed log-probabilities log π_θ(y_c | x), log π_θ(y_r | x)
                 under the policy being trained
    ref_c, ref_r the same under the frozen reference model
    Δ            (π_c − ref_c) − (π_r − ref_r), the policy's log-ratio margin
    β            the strength of the implicit KL constraint (0.1 by default)
    ε            label smoothing: the assumed probability that a label is flipped

The implicit rewards are r_c = β(π_c − ref_c) and r_r = β(π_r − ref_r), so
βΔ = r_c − r_r. DPO (Rafailov et al., 2023) maximises log σ(βΔ).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "robust", "ipo", "hinge"]
LOSS_TYPES = get_args(LossType)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards, each of shape (B,).

    Loss types, with Δ and ε as in the module docstring:

        sigmoid  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)
                 (ε = 0 is DPO; ε > 0 is conservative DPO, cDPO)
        robust   (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)
                 (robust DPO, Chowdhury et al. 2024: unbiased under flipped labels)
        ipo      (Δ − 1/(2β))²
                 (IPO, Azar et al. 2023; Δ of log-probs averaged per reply token, as TRL)
        hinge    relu(1 − βΔ)
                 (SLiC-style hinge on the margin)

    log σ(z) is evaluated as −softplus(−z), which never overflows.

    Returns (losses, chosen_rewards, rejected_rewards); the rewards are
    β·(policy − reference), detached: they are for logging, not for gradients.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid types: {', '.join(LOSS_TYPES)}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5 (it divides by 1 - 2*label_smoothing)")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * delta)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
