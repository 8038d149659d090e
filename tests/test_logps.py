"""trainer/logps.py against an explicit per-token loop and against transformers' own loss."""

import pytest
import torch

from trainer.collate import collate
from trainer.logps import IGNORE_INDEX, per_token_logps, sequence_logps


def _loop_logps(logits, labels):
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            total += float(row[target] - torch.logsumexp(row, 0))
        out.append(total)
    return torch.tensor(out)


def test_matches_explicit_loop_with_masking():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # nothing counts
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, _loop_logps(logits, labels).double(), atol=1e-5, rtol=0)
    assert got[2] == 0


def test_bf16_logits_are_normalised_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 50, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 50, (2, 5), generator=g)
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _loop_logps(logits.float(), labels).double(), atol=1e-5,
                               rtol=0)


def test_token_mask_and_shift():
    logits = torch.zeros(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 2]])
    token_logps, mask = per_token_logps(logits, labels)
    assert mask.tolist() == [[True, False, True]]
    torch.testing.assert_close(token_logps, torch.tensor([[-torch.log(torch.tensor(5.0)), 0.0,
                                                           -torch.log(torch.tensor(5.0))]]))


@pytest.mark.parametrize("bad", ["-inf", "nan"])
def test_masked_positions_add_zero_even_when_not_finite(bad):
    """An ignored position adds exactly 0 even when its log-prob is -inf (a token's logit masked
    to -inf: ignored positions gather token 0) or NaN (garbage logits in the padding); masking by
    multiplication made the whole sum NaN (-inf * 0)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(1, 9, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 4:] = IGNORE_INDEX  # padding: positions 3 and 4 predict it
    if bad == "-inf":
        logits[:, :, 0] = float("-inf")
    else:
        logits[1, 3:5, :] = float("nan")
    expected = _loop_logps(logits, labels).double()
    assert torch.isfinite(expected).all()
    logits.requires_grad_(True)
    got = sequence_logps(logits, labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if bad == "-inf":
        got.sum().backward()
        assert torch.isfinite(logits.grad).all()


def test_matches_transformers_causal_lm_loss(toy_model_dir):
    """HF computes mean NLL over the shifted labels; our sum / count must equal it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    prompts = [tok("12+34=")["input_ids"], tok("5+6=")["input_ids"]]
    completions = [tok("46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                   tok("11", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    batch = collate(prompts, completions, tok.pad_token_id)
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    ours = sequence_logps(out.logits, batch["labels"])
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close((-ours.sum() / n_tokens).float(), out.loss, atol=1e-5, rtol=0)
