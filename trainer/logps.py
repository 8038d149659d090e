"""Per-sequence log-probabilities: the one function that serves both policy and reference.

DPO (Rafailov et al. 2023, eq. 7) needs log π(y|x) summed over the completion tokens. The same
function (`model_token_logps`) runs on the policy inside the trainer and on the reference in
`odpo precompute`, so the two sides of the log-ratio are computed identically (docs/design.md,
Numerics).

Memory-lean by default: the full (B, T, V) logits are ~2.5 GB per 4k-token sequence in float32
for a 152k vocabulary, and the log-softmax makes a second copy that the backward keeps. The lean
path runs the model's body, keeps the hidden states of the completion positions only (a prompt's
logits are never needed), and applies the LM head and the float32 log-softmax in chunks of
positions; the backward recomputes a chunk's logits instead of storing them, so the largest
tensor is one chunk's (chunk, V) float32 logits whatever the sequence length. Models whose
logits are not the plain head's output (soft-capping, scaling) take the full path.
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


# --- memory-lean log-probs ------------------------------------------------------------------

CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB (441 positions of a 152k vocab)
# Config fields that put something between the LM head and the softmax (Gemma 2's soft-capping,
# Cohere's and Granite's scaling): such models keep the full-logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk whose float32 (chunk, V) logits fill CHUNK_BYTES (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def head_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where autocast is on for the hidden
    states' device (mixed precision: the body hands over float32 hidden states, from its
    float32 norm, and autocast runs the head in bfloat16), else the hidden states' own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _cast(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """The head's weight and bias in `dtype`, once a pass rather than once a chunk (a float32
    152k x 896 head is 0.5 GB a cast)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """float32 logits of `hidden`'s rows through the head's own op (`linear`: the bias added
    before the one rounding), in weight's dtype (`_cast`)."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into a float32 `acc`. On a GPU, bf16 / fp16 operands multiply straight into
    float32 (`out_dtype`), so a chunk's product is not rounded to bf16 before it is summed and no
    (V, H) temporaries are made; elsewhere through the product in the operands' dtype."""
    if acc.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


class _LabelLogps(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[label] for each row of h, in chunks of rows, the matmul in `dtype`
    (`head_dtype`); the backward recomputes each chunk's logits from (h, W, b) in that same
    dtype (it runs outside autocast, so it is told), with the saved log-normaliser."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        w, b = _cast(weight, bias, dtype)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s:s + chunk], w, b)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(1, labels[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk, needs = ctx.chunk, ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32,
                                  device=weight.device) if needs[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32,
                                device=bias.device) if bias is not None and needs[2] else None
        w, b = _cast(weight, bias, ctx.dtype)
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk].to(ctx.dtype), grad_out[s:s + chunk].float()
            # d log p[label] / d logits = onehot(label) - softmax, times the upstream gradient
            d = torch.exp(_chunk_logits(h, w, b) - lse[s:s + chunk, None]).mul_(-g[:, None])
            d.scatter_add_(1, labels[s:s + chunk, None], g[:, None])
            d = d.to(ctx.dtype)  # the cast autograd makes on the full path
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = d @ w
            if grad_weight is not None:
                _add_product(grad_weight, d.t(), h)
            if grad_bias is not None:
                grad_bias += d.float().sum(0)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """(N, H) hidden states, (V, H) LM head weight (+ (V,) bias), (N,) labels -> (N,) float32
    log-probs of the labels, never holding more than `chunk` rows of logits (0:
    `chunk_positions(V)`); with gradients, the backward recomputes them chunk by chunk."""
    chunk = chunk or chunk_positions(weight.shape[0])
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _LabelLogps.apply(hidden, weight, bias, labels, chunk, head_dtype(hidden))
    out = [hidden.new_zeros(0, dtype=torch.float32)]
    w, b = _cast(weight, bias, head_dtype(hidden))
    for s in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[s:s + chunk], w, b)
        out.append(logits.gather(1, labels[s:s + chunk, None])[:, 0]
                   - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


def lean_supported(model) -> bool:
    """Whether `model`'s logits are its body's last hidden state times a plain linear head."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return (isinstance(head, torch.nn.Linear) and hasattr(model, "get_decoder")
            and all(getattr(config, k, None) in (None, 1, 1.0) for k in LOGIT_TRANSFORMS))


def model_token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    lean: bool = True, chunk: int = 0, ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_logps` of a causal LM's forward over a `collate` batch: (B, T-1) float32 token
    log-probs, 0 off the mask, and the mask. Lean (module docstring) where `lean_supported`,
    else through the model's full logits."""
    if not (lean and lean_supported(model)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits
        return per_token_logps(logits, labels, ignore_index)
    # use_cache=False: no KV cache is kept for a forward that generates nothing
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != ignore_index
    head = model.get_output_embeddings()
    picked = label_logps(hidden[:, :-1][mask], head.weight, targets[mask], head.bias, chunk)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=picked.device)
    return out.masked_scatter(mask, picked), mask


def model_read_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    read_at: torch.Tensor, read_ids: torch.Tensor, lean: bool = True, chunk: int = 0,
) -> torch.Tensor:
    """Log-probs of chosen next tokens read at chosen positions of a packed forward
    (`trainer.packing`): (N,) float32, log p(read_ids[n]) from the logits at flat position
    read_at[n] of the (R·T) positions.

    input_ids, position_ids (R, T); attention_mask the 4D mask the model's attention takes as it
    is ((R, 1, T, T), `trainer.packing.attention_mask`). The shift by one is the caller's: it
    names the position that predicts each token, so one position may predict two (a shared
    prompt's last token predicts the first chosen and the first rejected token). Lean as
    `model_token_logps`: the head and the float32 log-softmax run on the N read positions only.
    """
    if not (lean and lean_supported(model)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).logits
        picked = torch.log_softmax(logits.flatten(0, 1)[read_at].float(), dim=-1)
        return picked.gather(1, read_ids[:, None])[:, 0]
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    return label_logps(hidden.flatten(0, 1)[read_at], head.weight, read_ids, head.bias, chunk)


class TokenLogps(torch.nn.Module):
    """A causal LM as the module that returns `model_token_logps`: what Ray Train's DDP wraps in
    training, so that the lean forward (body, then the chunked head) runs inside the wrapper's
    hooks. `.model` is the causal LM (saved with `save_pretrained`).

    Given `position_ids` and `read_at` (a packed batch, `trainer.packing`), it returns
    `model_read_logps` instead: (N,) log-probs of `labels` (N,) read at flat positions
    `read_at`, through a 4D `attention_mask`."""

    def __init__(self, model, lean: bool = True, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.lean, self.autocast_dtype = model, lean, autocast_dtype

    def forward(self, input_ids, attention_mask, labels, position_ids=None, read_at=None):
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if read_at is not None:
                return model_read_logps(self.model, input_ids, attention_mask, position_ids,
                                        read_at, labels, self.lean)
            return model_token_logps(self.model, input_ids, attention_mask, labels, self.lean)
