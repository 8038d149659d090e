"""Per-sequence log-probabilities: the one function that serves both policy and reference.

DPO (Rafailov et al. 2023, eq. 7) needs log π(y|x) summed over the completion tokens. The same
function runs on the policy inside the trainer and on the reference in `odpo precompute`, so the
two sides of the log-ratio are computed identically (docs/design.md, Numerics).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def per_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and the mask of the positions that count.

    logits: (B, T, V) for input positions 0..T-1; labels: (B, T) aligned with the input ids
    (labels[:, t] is the id at position t, or `ignore_index` for prompt and padding). The function
    shifts: position t's logits predict labels[:, t + 1].

    Returns (per_token_logps (B, T-1) float32, exactly 0 where the mask is False; mask (B, T-1)
    bool). The log-softmax is taken in float32 whatever the logits' dtype, so a bf16 model's
    log-probs do not lose their low bits in the normaliser.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits (B, T, V) = {tuple(logits.shape)} and labels (B, T) = "
            f"{tuple(labels.shape)} disagree on (B, T)"
        )
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits, dim=-1)
    token_logps = torch.gather(logps, dim=2, index=safe_labels.unsqueeze(2)).squeeze(2)
    # where, not `* mask`: a padded position's log-prob may be -inf or NaN (a logit masked to
    # -inf, garbage past the sequence's end), and -inf * 0 is NaN, which would poison the sum.
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)), mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Summed completion log-prob per sequence: (B, T, V), (B, T) -> (B,) float64.

    labels are aligned with the input ids (this function shifts by one); positions whose label is
    `ignore_index` (prompt, padding) are left out of the sum. The float32 token log-probs are
    summed in float64: a float32 sum near -140 is off by ~1e-5 and its rounding depends on the
    padded width, which would break policy/reference agreement at that tolerance.
    """
    token_logps, _ = per_token_logps(logits, labels, ignore_index)
    return token_logps.double().sum(dim=-1)
