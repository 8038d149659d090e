"""trainer/loss.py against docs/design.md's golden values, an independent implementation, and the
analytic gradient of the sigmoid loss."""

import math

import pytest
import torch

from trainer.loss import dpo_loss, nll_loss

GOLDEN = dict(
    policy_chosen=[-0.5, -10.0, -1.0],
    policy_rejected=[-0.1, -30.0, -21.0],
    reference_chosen=[-0.5, -10.1, -0.1],
    reference_rejected=[-0.1, -20.1, -0.1],
)


def _golden():
    return [torch.tensor(GOLDEN[k]) for k in GOLDEN]


@pytest.mark.parametrize(
    "label_smoothing, expected",
    [(0.0, [0.6931, 0.3133, 0.1269]), (0.1, [0.6931, 0.4133, 0.3269])],
)
def test_golden_values(label_smoothing, expected):
    losses, _, _ = dpo_loss(*_golden(), beta=0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-4, rtol=0)


def _reference_impl(pc, pr, rc, rr, beta, loss_type, eps):
    """Element by element in Python floats, straight from the papers' formulas."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            def log_sigmoid(x):
                return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

            out.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_matches_independent_implementation(loss_type, beta, eps):
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-torch.rand(64, generator=g, dtype=torch.float64) * 50 for _ in range(4))
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    torch.testing.assert_close(losses, _reference_impl(pc, pr, rc, rr, beta, loss_type, eps))
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))


def test_step_zero_is_ln2_and_zero_rewards():
    logps = -torch.rand(16) * 30
    losses, cr, rr = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    torch.testing.assert_close(losses, torch.full((16,), math.log(2)), atol=1e-6, rtol=0)
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_sigmoid_gradient_is_analytic():
    """d loss / d π_c = −β σ(−β h), d loss / d π_r = +β σ(−β h) (Rafailov et al. 2023, §4)."""
    beta = 0.3
    g = torch.Generator().manual_seed(3)
    pc = (-torch.rand(32, generator=g, dtype=torch.float64) * 20).requires_grad_()
    pr = (-torch.rand(32, generator=g, dtype=torch.float64) * 20).requires_grad_()
    rc = -torch.rand(32, generator=g, dtype=torch.float64) * 20
    rr = -torch.rand(32, generator=g, dtype=torch.float64) * 20
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    h = ((pc - rc) - (pr - rr)).detach()
    weight = torch.sigmoid(-beta * h)
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)


def test_rewards_are_detached():
    pc = torch.tensor([-1.0], requires_grad=True)
    _, cr, rr = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-2.0]),
                         beta=0.1)
    assert not cr.requires_grad and not rr.requires_grad


def test_nll_is_length_normalised():
    torch.testing.assert_close(
        nll_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])), torch.tensor([2.0, 0.5])
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [({"beta": 0.0}, "beta"), ({"beta": 0.1, "loss_type": "kto"}, "loss_type"),
     ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*_golden(), **kwargs)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_is_refused_outside_sigmoid(loss_type):
    """cDPO's ε belongs to the sigmoid loss; ipo and hinge would silently ignore it."""
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_golden(), beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    dpo_loss(*_golden(), beta=0.1, loss_type=loss_type, label_smoothing=0.0)
