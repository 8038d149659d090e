"""Preference losses as pure functions of (B,) log-prob tensors.

Every `*_logps` argument is a (B,) tensor of log-probs *summed* over a response's completion tokens
(`trainer.logps.sequence_logps`); `*_lengths` are the (B,) completion token counts behind those
sums, for the length-normalised losses. With h = (π_c − ref_c) − (π_r − ref_r), the log-ratio
difference ("logits" in TRL), the losses are, by TRL 1.16's names so a TRL config carries over:

reference-based (`dpo_loss`):
- `sigmoid`: DPO, Rafailov et al. 2023 (arXiv:2305.18290), eq. 7; with `label_smoothing` ε > 0 it
  is conservative DPO (cDPO, Mitchell 2023: the label is flipped with probability ε). TRL 1.16's
  `sigmoid` ignores `label_smoothing`; at ε = 0 the two agree.
- `ipo`: Azar et al. 2023 (arXiv:2310.12036), eq. 17: (h − 1/(2β))², in the paper's form: h is
  built from the *summed* log-probs, like every loss here, so the target margin 1/(2β) is in nats
  summed over the response.
- `ipo_mean`: what TRL 1.16 calls `ipo`: the same square on the per-token *mean* log-ratios
  (h_c/|y_c| − h_r/|y_r| − 1/(2β))². TRL's authors report this is what the IPO paper's experiments
  used; its h is about 1/length of ours, so a β tuned under one name does not carry over to the
  other. The names are kept apart so that neither silently means the other.
- `hinge`: the SLiC hinge, max(0, 1 − β·h) (Zhao et al. 2023, arXiv:2305.10425; RSO, Liu et al.
  2023, arXiv:2309.06657, with β the reciprocal margin).
- `robust`: robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409): the DPO loss de-biased for labels
  flipped with probability ε = `label_smoothing`.
- `bco_pair`: BCO, Jung et al. 2024 (arXiv:2404.04656): a binary classifier on the implicit
  rewards, chosen → 1 and rejected → 0, around the reward shift δ (`bco_delta`).
- `sppo_hard`: SPPO, Wu et al. 2024 (arXiv:2405.00675), eq. 4.7 (Algorithm 1) with the hard
  win-probability (1 for chosen, 0 for rejected) and η = 1/β, as TRL implements it.
- `nca_pair`: NCA, Chen et al. 2024 (arXiv:2402.05369), the pairwise noise-contrastive loss.
- `apo_zero`, `apo_down`: APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 7 and eq. 8.
- `exo_pair`: EXO, Ji et al. 2024 (arXiv:2402.00856), eq. 16 with K = 2: KL(p_θ ‖ p_label), the
  label distribution smoothed by ε = `label_smoothing` > 0 (the paper uses 1e-3).
- `aot`, `aot_unpaired`: AOT, Melnyk et al. 2024 (arXiv:2406.05882): the logistic loss on the
  *sorted* batch (first-order stochastic dominance through quantiles), paired and unpaired.
- `discopop`: DiscoPOP, Lu et al. 2024 (arXiv:2406.08414), eq. 5: the log-ratio modulated loss.
- `sigmoid_norm`: length-normalised DPO, Tülu 3 (Lambert et al. 2024, arXiv:2411.15124, §5.1.2,
  eq. 6): the sigmoid loss on per-token mean log-ratios.

reference-free (`dpo_loss`; the reference arguments may be None):
- `simpo`: SimPO, Meng et al. 2024 (arXiv:2405.14734), eq. 6: sigmoid loss on β times the per-token
  mean log-probs, with a target margin γ (`simpo_gamma`).
- `orpo`: ORPO, Hong et al. 2024 (arXiv:2403.07691), eqs. 4, 6 and 7: the chosen NLL (per-token
  mean) plus λ = β times the log odds-ratio loss.
- `sft`: TRL's NLL term: the token mean of −log π over all chosen tokens of the batch.
- `nll`: the per-response length-normalised NLL of Iterative RPO (Pang et al. 2024,
  arXiv:2404.19733, eq. 1), today's `alpha` term (`nll_loss`).

unpaired (`kto_loss`): KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), with the reference-point KL
estimate from mismatched (prompt, response) pairs passed in (`kto_kl_baseline`).

`weighted_loss` sums a list of these with weights (MPO, Wang et al. 2024, arXiv:2411.10442:
`[sigmoid, bco_pair, sft]` with `[0.8, 0.2, 1.0]`); `[sigmoid, nll]` with `[1, alpha]` is DPO+NLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Every name `dpo_loss` accepts; `kto_loss` (unpaired data) has its own function.
LOSS_TYPES = (
    "sigmoid", "ipo", "ipo_mean", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair",
    "apo_zero", "apo_down", "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm",
    "simpo", "orpo", "sft", "nll",
)
# Losses of the policy alone: they need no reference log-probs (and no reference stage).
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo", "sft", "nll")
# Losses that need the completion token counts (`chosen_lengths`, `rejected_lengths`).
LENGTH_LOSS_TYPES = ("ipo_mean", "sigmoid_norm", "simpo", "orpo", "sft", "nll")
# Losses that read `label_smoothing` ε; any other with ε > 0 is refused rather than ignored.
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")
# Losses of unpaired rows (prompt, completion, desirable label): `kto_loss`, trained alone.
UNPAIRED_LOSS_TYPES = ("kto",)


def loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """A config's `loss_type` (one name, or a list for `weighted_loss`) as a tuple of names."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def reference_free(loss_type: str | Sequence[str]) -> bool:
    """Whether training with `loss_type` (a name or a list) needs no reference log-probs: every
    listed loss is reference-free. The one test behind `odpo train`'s columns, `odpo precompute
    --no-logps` and `odpo iterate`'s skipping of the reference forward."""
    types = loss_types(loss_type)
    return bool(types) and all(t in REFERENCE_FREE_LOSS_TYPES for t in types)


def unpaired(loss_type: str | Sequence[str]) -> bool:
    """Whether `loss_type` trains on unpaired rows (`kto`) rather than on pairs."""
    return any(t in UNPAIRED_LOSS_TYPES for t in loss_types(loss_type))


def _per_token(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x / |y| per response: (B,), (B,) -> (B,); an empty response counts as one token (TRL)."""
    return x / lengths.to(x.device).clamp(min=1).to(x.dtype)


def sigmoid_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7; cDPO for ε > 0: (B,) -> (B,).

    −(1−ε)·log σ(β h) − ε·log σ(−β h), h the log-ratio difference.
    """
    return (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
            - label_smoothing * F.logsigmoid(-beta * h))


def ipo_loss(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17 (β is the paper's τ): (h − 1/(2β))², (B,) -> (B,)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def ipo_mean_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """IPO eq. 17 on per-token mean log-ratios (TRL 1.16's `ipo`): four (B,) -> (B,).

    (h_c/|y_c| − h_r/|y_r| − 1/(2β))², h_c = π_c − ref_c and h_r = π_r − ref_r summed log-ratios.
    """
    h = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios,
                                                                  rejected_lengths)
    return ipo_loss(h, beta=beta)


def hinge_loss(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023; RSO's `hinge`): max(0, 1 − β h), (B,) -> (B,)."""
    return torch.relu(1.0 - beta * h)


def robust_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024: (B,) -> (B,).

    With ℓ(z) = −log σ(z) and ε the label-flip rate:
    [(1−ε)·ℓ(β h) − ε·ℓ(−β h)] / (1 − 2ε), an unbiased estimate of the clean-label DPO loss.
    """
    return ((1.0 - label_smoothing) * -F.logsigmoid(beta * h)
            - label_smoothing * -F.logsigmoid(-beta * h)) / (1.0 - 2.0 * label_smoothing)


def bco_pair_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    delta: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """BCO on pairs, Jung et al. 2024: (B,), (B,) -> (B,).

    −log σ(r_c − δ) − log σ(−(r_r − δ)), r = β·(π − ref) the implicit rewards and δ the paper's
    reward shift: a running mean of the rewards seen so far (`bco_running_delta`). TRL 1.16
    drops δ (δ = 0), which is the default here.
    """
    return (-F.logsigmoid(beta * chosen_logratios - delta)
            - F.logsigmoid(-(beta * rejected_logratios - delta)))


def bco_running_delta(
    delta: float, num_batches: int, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[float, int]:
    """BCO's δ after one more batch: the running mean over batches of each batch's mean reward
    (chosen and rejected together), as TRL computed it before 1.16. Returns (δ, num_batches)."""
    batch_mean = float(torch.cat([chosen_rewards.detach(), rejected_rewards.detach()]).mean())
    return (delta * num_batches + batch_mean) / (num_batches + 1), num_batches + 1


def sppo_hard_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """SPPO with hard win-probabilities, Wu et al. 2024, eq. 4.7 (η = 1/β): (B,), (B,) -> (B,).

    (h_c − 1/(2β))² + (h_r + 1/(2β))², h = π − ref per response: the chosen log-ratio is pushed to
    +η/2 and the rejected to −η/2.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def nca_pair_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """NCA on pairs, Chen et al. 2024: (B,), (B,) -> (B,).

    −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r), r = β·(π − ref): an absolute likelihood per
    response rather than DPO's relative one.
    """
    chosen_rewards = beta * chosen_logratios
    return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-beta * rejected_logratios))


def apo_zero_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7: (B,), (B,) -> (B,).

    1 − σ(β h_c) + σ(β h_r): raise the chosen likelihood, lower the rejected (for chosen responses
    better than the model's own).
    """
    return 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024, eq. 8: (B,), (B,) -> (B,).

    σ(β h_c) + 1 − σ(β (h_c − h_r)): lower both, the rejected more (for chosen responses worse than
    the model's own).
    """
    return (torch.sigmoid(beta * chosen_logratios)
            + 1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def exo_pair_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO, Ji et al. 2024, eq. 16 with K = 2: KL(p_θ ‖ p_ε), (B,) -> (B,).

    p_θ = (σ(β h), σ(−β h)) over (chosen, rejected), p_ε = (1−ε, ε):
    σ(β h)·(log σ(β h) − log(1−ε)) + σ(−β h)·(log σ(−β h) − log ε). Needs ε > 0.
    """
    return (torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log1p(-label_smoothing))
            + torch.sigmoid(-beta * h) * (F.logsigmoid(-beta * h) - math.log(label_smoothing)))


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """AOT on pairs, Melnyk et al. 2024: four (B,) -> (B,), one term per *quantile*, not per pair.

    The policy's margins π_c − π_r and the reference's ref_c − ref_r are each sorted over the
    batch, and the (cDPO-smoothed) sigmoid loss is taken on the differences of the sorted values:
    the policy's margin distribution is pushed to dominate the reference's. Only the mean over
    the batch is meaningful, and it grows more faithful with the batch size.
    """
    policy_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    reference_sorted, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    return sigmoid_loss(policy_sorted - reference_sorted, beta=beta,
                        label_smoothing=label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """AOT for unpaired data, Melnyk et al. 2024: (B,), (B,) -> (B,), one term per quantile.

    The chosen and the rejected log-ratios π − ref are sorted separately over the batch, and the
    (cDPO-smoothed) sigmoid loss is taken on sorted chosen − sorted rejected.
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return sigmoid_loss(chosen_sorted - rejected_sorted, beta=beta,
                        label_smoothing=label_smoothing)


def discopop_loss(h: torch.Tensor, *, beta: float, tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024, eq. 5: (B,) -> (B,).

    With ρ = β h and m = σ(ρ/τ): (1 − m)·(−log σ(ρ)) + m·exp(−ρ), a blend of the logistic and the
    exponential loss. m·exp(−ρ) is computed as exp(log σ(ρ/τ) − ρ), which stays finite where
    exp(−ρ) alone would overflow.
    """
    rho = beta * h
    return (torch.sigmoid(-rho / tau) * -F.logsigmoid(rho)
            + torch.exp(F.logsigmoid(rho / tau) - rho))


def sigmoid_norm_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Length-normalised DPO, Tülu 3 (Lambert et al. 2024), §5.1.2 eq. 6: four (B,) -> (B,).

    −log σ(β (h_c/|y_c| − h_r/|y_r|)), h = π − ref summed per response.
    """
    h = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios,
                                                                  rejected_lengths)
    return sigmoid_loss(h, beta=beta)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO, Meng et al. 2024, eq. 6 (no reference model): four (B,) -> (B,).

    With the length-normalised reward r = β·π/|y| (eq. 4) and z = r_c − r_r − γ:
    −(1−ε)·log σ(z) − ε·log σ(−z). γ (`simpo_gamma`, TRL's default 0.5) is the target margin in
    reward units; ε as in TRL's CPOTrainer (0 in the paper).
    """
    z = beta * (_per_token(policy_chosen_logps, chosen_lengths)
                - _per_token(policy_rejected_logps, rejected_lengths)) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """ORPO, Hong et al. 2024, eqs. 4, 6 and 7 (no reference model): four (B,) -> (B,).

    With P(y|x) = exp(π/|y|) (the per-token mean log-prob, as in the paper) and
    odds(y) = P/(1 − P): −π_c/|y_c| − β·log σ(log odds(y_c) − log odds(y_r)), i.e. the chosen
    NLL plus λ = β times the odds-ratio loss. TRL's ORPOTrainer counts the prompt's tokens in its
    NLL term as well; here the NLL is over the response, like every log-prob in this project.
    """
    chosen = _per_token(policy_chosen_logps, chosen_lengths)
    rejected = _per_token(policy_rejected_logps, rejected_lengths)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds)


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """TRL's `sft` term: −Σ π_c / Σ |y_c|, the token mean over all chosen tokens of the batch,
    repeated to (B,) so it combines with the per-pair losses (only its mean is meaningful).
    (B,), (B,) -> (B,)."""
    total = -policy_chosen_logps.sum() / chosen_lengths.to(policy_chosen_logps.device).sum().clamp(
        min=1).to(policy_chosen_logps.dtype)
    return total.expand(policy_chosen_logps.shape[0])


def nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the chosen responses: (B,), (B,) -> (B,).

    Iterative RPO (Pang et al. 2024, eq. 1): −log M(y_w|x) / |y_w|. Added with weight `alpha` to
    the DPO loss, it keeps the chosen log-prob from falling, which plain DPO lets happen.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    bco_delta: float | torch.Tensor = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unreduced pairwise loss `loss_type` (module docstring) and the implicit rewards.

    Inputs are (B,) summed completion log-probs (for `ipo` too: the paper's form; TRL's per-token
    mean is `ipo_mean`). The reference log-probs may be None for `REFERENCE_FREE_LOSS_TYPES`;
    `chosen_lengths` / `rejected_lengths` (B,) completion token counts are required by
    `LENGTH_LOSS_TYPES`. `label_smoothing` ε is read by `LABEL_SMOOTHING_LOSS_TYPES` only (any
    other loss with ε > 0 is a ValueError, not a silently different objective); `exo_pair` needs
    ε > 0. Keyword defaults are TRL 1.16's (`simpo_gamma` from its CPOConfig).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards detached: β·(policy
    − reference) as TRL's DPOTrainer logs them; for `simpo` and `orpo`, and for `sft` / `nll`
    without reference log-probs, β·policy/|y|, the length-normalised reward TRL's CPO and ORPO
    trainers log (SimPO eq. 4).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
        # Ignoring ε would train something other than what was asked for.
        raise ValueError(
            f"label_smoothing applies to {LABEL_SMOOTHING_LOSS_TYPES} only, got "
            f"{label_smoothing} with loss_type {loss_type!r}"
        )
    if loss_type == "exo_pair" and label_smoothing == 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (EXO's ε; the paper uses 1e-3): at "
                         "ε = 0 its KL to the hard label is infinite")
    if loss_type in LENGTH_LOSS_TYPES and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
    has_reference = reference_chosen_logps is not None and reference_rejected_logps is not None
    if loss_type not in REFERENCE_FREE_LOSS_TYPES and not has_reference:
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")

    if has_reference:
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = sigmoid_loss(h, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(h, beta=beta)
    elif loss_type == "ipo_mean":
        losses = ipo_mean_loss(chosen_logratios, rejected_logratios, chosen_lengths,
                               rejected_lengths, beta=beta)
    elif loss_type == "hinge":
        losses = hinge_loss(h, beta=beta)
    elif loss_type == "robust":
        losses = robust_loss(h, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "bco_pair":
        losses = bco_pair_loss(chosen_logratios, rejected_logratios, beta=beta, delta=bco_delta)
    elif loss_type == "sppo_hard":
        losses = sppo_hard_loss(chosen_logratios, rejected_logratios, beta=beta)
    elif loss_type == "nca_pair":
        losses = nca_pair_loss(chosen_logratios, rejected_logratios, beta=beta)
    elif loss_type == "apo_zero":
        losses = apo_zero_loss(chosen_logratios, rejected_logratios, beta=beta)
    elif loss_type == "apo_down":
        losses = apo_down_loss(chosen_logratios, rejected_logratios, beta=beta)
    elif loss_type == "exo_pair":
        losses = exo_pair_loss(h, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "aot":
        losses = aot_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                          reference_rejected_logps, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "aot_unpaired":
        losses = aot_unpaired_loss(chosen_logratios, rejected_logratios, beta=beta,
                                   label_smoothing=label_smoothing)
    elif loss_type == "discopop":
        losses = discopop_loss(h, beta=beta, tau=discopop_tau)
    elif loss_type == "sigmoid_norm":
        losses = sigmoid_norm_loss(chosen_logratios, rejected_logratios, chosen_lengths,
                                   rejected_lengths, beta=beta)
    elif loss_type == "simpo":
        losses = simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                            rejected_lengths, beta=beta, gamma=simpo_gamma,
                            label_smoothing=label_smoothing)
    elif loss_type == "orpo":
        losses = orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                           rejected_lengths, beta=beta)
    elif loss_type == "sft":
        losses = sft_loss(policy_chosen_logps, chosen_lengths)
    else:  # nll
        losses = nll_loss(policy_chosen_logps, chosen_lengths)

    if has_reference and loss_type not in ("simpo", "orpo"):
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
    else:
        chosen_rewards = beta * _per_token(policy_chosen_logps.detach(), chosen_lengths)
        rejected_rewards = beta * _per_token(policy_rejected_logps.detach(), rejected_lengths)
    return losses, chosen_rewards, rejected_rewards


def weighted_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_k w_k · loss_k, per pair: TRL's `loss_type` list with `loss_weights` (MPO).

    Each entry is a `dpo_loss` type, called with the same inputs and keyword arguments `kwargs`;
    weights default to 1 each. `label_smoothing` ε goes to the listed losses that read it
    (`LABEL_SMOOTHING_LOSS_TYPES`) and to no other; ε > 0 with none of them is a ValueError.
    The mean of the result is TRL's Σ_k w_k · mean(loss_k). `[sigmoid, nll]` with `[1, alpha]`
    is DPO + alpha·NLL (Iterative RPO); `[sigmoid, sft]` is TRL's form of it (token mean over
    the batch). Returns (losses (B,), and the first loss type's chosen and rejected rewards).
    """
    if isinstance(loss_types, str) or not loss_types:
        raise ValueError(f"loss_types must be a non-empty list of loss types, got {loss_types!r}")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(weights)} loss_weights for {len(loss_types)} loss_types")
    eps = kwargs.pop("label_smoothing", 0.0)
    if eps and not set(loss_types) & set(LABEL_SMOOTHING_LOSS_TYPES):
        raise ValueError(f"label_smoothing applies to {LABEL_SMOOTHING_LOSS_TYPES} only, got "
                         f"{eps} with loss_types {list(loss_types)}")
    total, rewards = 0.0, None
    for loss_type, weight in zip(loss_types, weights, strict=True):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, beta=beta, loss_type=loss_type,
            label_smoothing=eps if loss_type in LABEL_SMOOTHING_LOSS_TYPES else 0.0, **kwargs)
        total = total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    return total, rewards[0], rewards[1]


def kto_kl_baseline(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024): (M,), (M,) -> () detached.

    max(0, mean(π − ref)) over mismatched (prompt, response) pairs (each prompt with another
    row's response), a biased but cheap estimate of KL(π ‖ ref). No gradient flows through it,
    as in the paper and TRL.
    """
    return (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Ethayarajh et al. 2024, eq. 7 (TRL's numbering), on unpaired responses.

    policy_logps, reference_logps: (B,) summed completion log-probs; desirable: (B,) bool; kl:
    the reference point z₀ (`kto_kl_baseline`), a scalar. With r = β·(π − ref):
      desirable:   λ_D·(1 − σ(r − β z₀))
      undesirable: λ_U·(1 − σ(β z₀ − r))
    λ_D = `desirable_weight`, λ_U = `undesirable_weight` (TRL's defaults 1; the paper advises
    λ_D·n_D / (λ_U·n_U) in [1, 4/3]). Returns (losses (B,), rewards r (B,) detached), in the
    input order.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    logratios = policy_logps - reference_logps
    kl = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device)
    losses = torch.where(
        desirable.to(logratios.device),
        desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios))),
    )
    return losses, beta * logratios.detach()
