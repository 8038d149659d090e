"""Preference losses as pure functions of (B,) log-prob tensors.

- `sigmoid`: DPO, Rafailov et al. 2023, eq. 7; with `label_smoothing` ε > 0 it is conservative DPO
  (cDPO: the label is flipped with probability ε).
- `ipo`: Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
  Preferences"), eq. 17: (h − 1/(2β))², in the paper's form: h is built from the *summed*
  completion log-probs, like every loss here. TRL's `ipo` averages the log-probs over each
  response's tokens first, so its h is about 1/length of ours and a β tuned in TRL does not carry
  over: here the target margin 1/(2β) is in nats summed over the response.
- `hinge`: the SLiC hinge, max(0, 1 − β·h) (Zhao et al. 2023).
- `nll_loss`: the NLL term on the chosen response that turns DPO into DPO+NLL (Iterative RPO, Pang
  et al. 2024, eq. 1), normalised by the chosen length as in that paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unreduced preference loss and the implicit rewards.

    All four inputs are (B,) summed completion log-probs (for `ipo` too: the paper's form, not
    TRL's per-token mean). With
    h = (π_c − ref_c) − (π_r − ref_r) (the log-ratio difference, "logits" in TRL):
      sigmoid: −(1−ε)·log σ(β h) − ε·log σ(−β h)
      ipo:     (h − 1/(2β))²
      hinge:   max(0, 1 − β h)
    `label_smoothing` ε is for `sigmoid` only; any other loss_type with ε > 0 is a ValueError.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are
    β·(policy − reference), detached, as TRL logs them.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        # cDPO's label noise is defined for the sigmoid loss only; ignoring it would train
        # something other than what was asked for.
        raise ValueError(
            f"label_smoothing applies to the sigmoid loss only, got {label_smoothing} with "
            f"loss_type {loss_type!r}"
        )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (
            -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
            - label_smoothing * F.logsigmoid(-beta * h)
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the chosen responses: (B,), (B,) -> (B,).

    Iterative RPO (Pang et al. 2024, eq. 1): −log M(y_w|x) / |y_w|. Added with weight `alpha` to
    the DPO loss, it keeps the chosen log-prob from falling, which plain DPO lets happen.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype)
