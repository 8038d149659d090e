"""Issue 17, memory-lean log-probs: `label_logps` (the LM head and float32 log-softmax in chunks
of completion positions, recomputed in the backward) and `model_token_logps` (the model's body,
then `label_logps`) against the full-logits path — autograd through `log_softmax` of the whole
(B, T, V) logits, written out in each test — in values and gradients to 1e-5."""

import pytest
import torch

from trainer.collate import collate
from trainer.logps import (
    IGNORE_INDEX,
    TokenLogps,
    chunk_positions,
    label_logps,
    lean_supported,
    model_token_logps,
    per_token_logps,
)


def _full(hidden, weight, labels, bias=None):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_label_logps_equal_the_full_log_softmax_in_values_and_gradients(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # a loss that weighs every position differently
    params = [t for t in (hidden, weight, bias) if t is not None]

    expected = _full(hidden, weight, labels, bias)
    want = torch.autograd.grad((expected * upstream).sum(), params)
    got = label_logps(hidden, weight, labels, bias, chunk=chunk)
    grads = torch.autograd.grad((got * upstream).sum(), params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_label_logps_of_bf16_weights_normalise_in_float32():
    """A bf16 head: logits are cast to float32 before the log-softmax, as on the full path, and
    the gradients come back in bf16 from the same cast."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 32, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 32, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (20,), generator=g)
    expected = _full(hidden, weight, labels)
    want = torch.autograd.grad(expected.sum(), [hidden, weight])
    got = label_logps(hidden, weight, labels, chunk=7)
    grads = torch.autograd.grad(got.sum(), [hidden, weight])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(grads, want, strict=True):
        assert a.dtype == torch.bfloat16
        # one bf16 rounding of each chunk's sum apart at most
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("with_bias", [False, True])
def test_under_autocast_the_backward_runs_the_forwards_matmul(with_bias):
    """Mixed precision: float32 hidden states (what the body's float32 norm hands over) and a
    float32 head under bf16 autocast. The forward's matmul is autocast's bf16 one; the backward,
    which runs outside autocast, must recompute the logits with that same bf16 matmul, or its
    softmax is not the one its saved log-normaliser belongs to (a float32 recompute was 3.6% off
    in the hidden states' gradient here). Against autocast's own full-logits path: the values,
    the hidden states' gradient, and the weight's and bias's up to bf16 rounding of each chunk's
    share."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 64, 32, 500
    hidden = (2 * torch.randn(n, h, generator=g)).requires_grad_()  # logits of std ~11
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.rand(n, generator=g)
    params = [t for t in (hidden, weight, bias) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        got = label_logps(hidden, weight, labels, bias, chunk=16)
    assert logits.dtype == torch.bfloat16
    expected = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]
    want = torch.autograd.grad((expected * upstream).sum(), params)
    grads = torch.autograd.grad((got * upstream).sum(), params)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, want, strict=False):
        assert a.dtype == torch.float32, name
        # the hidden states' gradient is one bf16 matmul on both paths; the weight's and the
        # bias's sum chunks (bf16 products, float32 sums) where autocast rounds the whole once
        assert float((a - b).norm() / b.norm()) < (1e-5 if name == "hidden" else 5e-3), name


def test_without_gradients_no_graph_is_kept():
    hidden, weight = torch.randn(9, 4), torch.randn(6, 4)
    labels = torch.randint(0, 6, (9,))
    with torch.inference_mode():
        got = label_logps(hidden, weight, labels, chunk=2)
    torch.testing.assert_close(got, _full(hidden, weight, labels), atol=1e-6, rtol=0)
    assert label_logps(hidden[:0], weight, labels[:0]).shape == (0,)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_positions(151_936) == 441  # 256 MiB of float32 logits
    assert chunk_positions(96) > 100_000
    assert chunk_positions(10**12) == 1


def _batch(tokenizer, rows):
    p = tokenizer([r[0] for r in rows])["input_ids"]
    c = [ids + [tokenizer.eos_token_id]
         for ids in tokenizer([r[1] for r in rows], add_special_tokens=False)["input_ids"]]
    return collate(p, c, tokenizer.pad_token_id)


ROWS = [("12+34=", "46"), ("7+5=", "12"), ("100+250=", "350"), ("9+9=", "18 and more")]


def _model(toy_model_dir, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(toy_model_dir)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if not config:
        model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    return model.train()


@pytest.mark.parametrize("tied", [False, True])
def test_a_real_forward_equals_the_full_logits_path(toy_model_dir, toy_tokenizer, tied):
    """The toy Llama (and its tied-embedding twin): token log-probs and every parameter's
    gradient equal transformers' own logits through `per_token_logps`, with chunks of 3
    positions so that rows straddle chunks."""
    model = _model(toy_model_dir, tie_word_embeddings=True) if tied else _model(toy_model_dir)
    t = _batch(toy_tokenizer, ROWS)
    assert lean_supported(model)

    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    want, want_mask = per_token_logps(logits, t["labels"])
    want.double().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got, mask = model_token_logps(model, t["input_ids"], t["attention_mask"], t["labels"],
                                  chunk=3)
    got.double().sum().backward()
    assert torch.equal(mask, want_mask)
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], atol=1e-5, rtol=0, msg=name)


def test_heads_it_cannot_chunk_take_the_full_path(toy_model_dir, toy_tokenizer):
    """Logit soft-capping (Gemma 2) or scaling (Cohere, Granite) sit between the head and the
    softmax: such models keep the full-logits path, with their own logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=toy_tokenizer.vocab_size + 8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        final_logit_softcapping=5.0))
    assert not lean_supported(model)
    t = _batch(toy_tokenizer, ROWS)
    with torch.no_grad():
        want, _ = per_token_logps(model(input_ids=t["input_ids"],
                                        attention_mask=t["attention_mask"]).logits, t["labels"])
        got, _ = model_token_logps(model, t["input_ids"], t["attention_mask"], t["labels"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_the_module_wrapper_is_what_ddp_wraps(toy_model_dir, toy_tokenizer):
    """`TokenLogps` (the module Ray Train's DDP/FSDP wraps, so that the lean forward runs
    inside the wrapper's hooks) returns the same as the function, lean or full."""
    model = _model(toy_model_dir)
    t = _batch(toy_tokenizer, ROWS)
    args = (t["input_ids"], t["attention_mask"], t["labels"])
    with torch.no_grad():
        want, _ = model_token_logps(model, *args, lean=False)
        for lean in (True, False):
            got, mask = TokenLogps(model, lean=lean)(*args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert mask.sum() == sum(len(c) + 1 for _, c in ROWS)  # completion tokens + EOS
    assert IGNORE_INDEX in t["labels"]
