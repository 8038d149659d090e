"""Padding-free layouts of preference pairs: `padded`, `packed` and `shared_prompt`.

A DPO micro-batch of B pairs needs the policy's summed log-probs of 2B sequences, prompt+chosen
and prompt+rejected. Three ways to lay them out for one forward:

- `padded` (`trainer.collate`): 2B rows, right-padded to the longest. Computes 2B · T_max
  positions: every prompt twice, and padding.
- `packed`: whole sequences back to back in rows of up to `max_tokens` tokens, position ids
  restarting at 0 per sequence, attention causal within each sequence only (a 4D mask). Computes
  Σ (2P + C + R) positions plus the rows' tail padding: no padding inside rows.
- `shared_prompt`: one segment per pair, [prompt, chosen, rejected]: chosen attends to the
  prompt and itself, rejected to the prompt and itself (never to chosen), its position ids
  continuing from the prompt's end, so that its positions equal those of prompt+rejected. Pairs
  are packed into rows as in `packed` and never see each other. Computes Σ (P + C + R): each
  prompt once (the gain of Hydra-style prefix sharing, e.g. OpenRLHF's packing and TRL's
  `padding_free`, without the second copy of the prompt).

The shift by one: the log-prob of completion token j is read from the logits at the position
before it, which for j = 0 is the prompt's last position, in `shared_prompt` for the first chosen
AND the first rejected token (the same hidden state read twice; the backward sums both). A pair
whose prompt is empty has no position before its first completion tokens: those are left out, as
`padded` leaves them out (`trainer.loop.target_tokens`).

Every layout gives the same numbers (docs/design.md, Numerics): each sequence's log-prob equals
its own unpadded forward's, to 1e-5 in float32 (tests/test_packing.py).

The mask is a dense 4D tensor in the format of the model's attention implementation (`sdpa`: a
boolean mask, True = attend; `eager`: additive float; `flex_attention`: a BlockMask), which
transformers passes to the attention as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.collate import collate
from trainer.logps import TokenLogps

LAYOUTS = ("padded", "packed", "shared_prompt")
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids: a shared prompt's tokens, then each completion


def pair_tokens(prompt_lengths, chosen_lengths, rejected_lengths, layout: str) -> np.ndarray:
    """Positions a pair fills in `layout` (without row padding), (B,) int64: 2P + C + R, or
    P + C + R in `shared_prompt` (`padded` pads each sequence further to the batch's longest)."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in (prompt_lengths, chosen_lengths,
                                                         rejected_lengths))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return p + c + r if layout == "shared_prompt" else 2 * p + c + r


def plan_token_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[np.ndarray]:
    """Group items of `lengths` tokens into bins of at most `max_tokens_per_batch` tokens, whole
    items only (first-fit decreasing: within 11/9 of the fewest bins plus one).

    An item longer than the budget gets a bin of its own, never split. Returns the bins as
    arrays of item indices, each in ascending (input) order; bins in the order they were opened
    (the longest item's first). The same rule packs a micro-batch's pairs into rows
    (`layout_pairs`) and a step's pairs into micro-batches under a token budget.
    """
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    lengths = np.asarray(lengths, dtype=np.int64)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        for b, free in enumerate(room):  # bins are few (a micro-batch's rows): a linear scan
            if n <= free:
                bins[b].append(int(i))
                room[b] -= n
                break
        else:
            bins.append([int(i)])
            room.append(max_tokens_per_batch - n)
    return [np.array(sorted(b), dtype=np.int64) for b in bins]


# --- micro-batches under a token budget (DPOConfig.max_tokens_per_batch) ----------------------


def pair_cost(prompt_lengths, chosen_lengths, rejected_lengths, layout: str) -> np.ndarray:
    """What each pair alone costs a micro-batch in `layout`, (B,) int64: `pair_tokens` in
    `packed` and `shared_prompt`; in `padded` its two rows at its own width, 2 · max(P + C,
    P + R) (`batch_cost`: a padded micro-batch costs its rows × its widest pair's width)."""
    if layout != "padded":
        return pair_tokens(prompt_lengths, chosen_lengths, rejected_lengths, layout)
    p, c, r = (np.asarray(x, dtype=np.int64) for x in (prompt_lengths, chosen_lengths,
                                                         rejected_lengths))
    return 2 * (p + np.maximum(c, r))


def batch_cost(costs: np.ndarray, layout: str) -> int:
    """Positions one micro-batch of pairs of `pair_cost` `costs` makes the forward compute, the
    measure `max_tokens_per_batch` holds: `padded`, rows × width (2B rows right-padded to the
    widest: B · max cost, padding included); `packed` / `shared_prompt`, the pairs' tokens
    Σ cost (the tail padding of `layout_pairs`' rows, each at most as wide as the longest
    pair, is not counted)."""
    costs = np.asarray(costs, dtype=np.int64)
    if not len(costs):
        return 0
    return int(len(costs) * costs.max()) if layout == "padded" else int(costs.sum())


def plan_pair_batches(costs: np.ndarray, layout: str, max_tokens_per_batch: int
                      ) -> list[np.ndarray]:
    """Pairs of `pair_cost` `costs` cut into micro-batches of whole pairs whose `batch_cost`
    stays within `max_tokens_per_batch`; a pair over the budget alone is a micro-batch of its
    own (never split, never refused). `packed` / `shared_prompt`: first-fit decreasing
    (`plan_token_batches`); `padded`: the pairs by decreasing width, each micro-batch opened
    by the widest left and filled with the next ones while its rows × width fits (similar
    widths together: the least padding). Bins as arrays of indices into `costs`, each
    ascending."""
    costs = np.asarray(costs, dtype=np.int64)
    if layout != "padded":
        return plan_token_batches(costs, max_tokens_per_batch)
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    bins: list[list[int]] = []
    width = 0
    for i in np.argsort(-costs, kind="stable"):
        if bins and (len(bins[-1]) + 1) * width <= max_tokens_per_batch:
            bins[-1].append(int(i))  # costs fall: the bin's width stays its first pair's
        else:
            bins.append([int(i)])
            width = int(costs[i])
    return [np.array(sorted(b), dtype=np.int64) for b in bins]


def split_batches(bins: list[np.ndarray], costs: np.ndarray, layout: str, count: int
                  ) -> list[np.ndarray]:
    """`bins` (index arrays into `costs`) split until there are `count` of them: each time the
    costliest bin of two pairs or more (`batch_cost`; the first of equals) is cut in two, its
    pairs dealt by decreasing cost to the lighter half. A half is a subset of a bin, so it keeps
    within the budget its bin kept. Needs `count` <= the pairs in all."""
    bins = [np.asarray(b, dtype=np.int64) for b in bins]
    costs = np.asarray(costs, dtype=np.int64)
    if count > sum(len(b) for b in bins):
        raise ValueError(f"{sum(len(b) for b in bins)} pairs cannot fill {count} micro-batches")
    while len(bins) < count:
        k = max((i for i, b in enumerate(bins) if len(b) > 1),
                key=lambda i: (batch_cost(costs[bins[i]], layout), -i))
        halves: tuple[list[int], list[int]] = ([], [])
        sums = [0, 0]
        for j in sorted(bins[k].tolist(), key=lambda j: (-costs[j], j)):
            h = int((sums[1], len(halves[1])) < (sums[0], len(halves[0])))
            halves[h].append(j)
            sums[h] += int(costs[j])
        bins[k:k + 1] = [np.array(sorted(h), dtype=np.int64) for h in halves]
    return bins


def _sequence(prompt, completion, start: int, seq: int, out: dict) -> None:
    """Append one prompt+completion sequence (offset `start` in its row) to `out`."""
    p, c = len(prompt), len(completion)
    out["ids"] += [prompt, completion]
    out["pos"].append(np.arange(p + c))
    out["seg"].append(np.full(p + c, seq))
    out["branch"].append(np.full(p + c, PROMPT))
    _reads(completion, start + p, start + p - 1 if p else -1, seq, out)


def _reads(completion, at: int, prompt_last: int, seq: int, out: dict) -> None:
    """Reads of one completion whose tokens sit at columns at..at+C-1: token j from column
    at+j-1, token 0 from the prompt's last column (none when the prompt is empty)."""
    src = np.arange(at - 1, at + len(completion) - 1)
    ids = np.asarray(completion, dtype=np.int64)
    if len(src):
        src[0] = prompt_last
        keep = src >= 0
        out["col"].append(src[keep])
        out["target"].append(ids[keep])
        out["seq"].append(np.full(int(keep.sum()), seq))


def layout_pairs(
    prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]], *, layout: str, max_tokens: int = 0,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """B pairs of token lists -> one packed batch of R rows of T positions (module docstring).

    `packed` packs sequences (prompt+chosen, prompt+rejected), `shared_prompt` pairs, into rows
    of at most `max_tokens` tokens (0: the longest sequence's / pair's; one longer than the
    budget gets a row of its own) by `plan_token_batches`; rows are right-padded to the longest.

    Returns, as long tensors:
      input_ids, position_ids (R, T); segment_ids (R, T): which sequence (packed) or pair
      (shared_prompt) a token belongs to, -1 on padding; branch_ids (R, T): PROMPT, CHOSEN or
      REJECTED (packed: all PROMPT); tokens (R, T): 1 on real tokens (the positions computed
      for data, what the trainer counts as input tokens);
      read_at (N,): flat index row·T + column of the position whose logits predict read_ids (N,);
      read_seq (N,): the sequence each read belongs to, i in 0..B-1 for pair i's chosen and
      B + i for its rejected; completion_lengths (2B,): len(chosen), then len(rejected).
    N = Σ completion tokens − (tokens with an empty prompt before them).
    """
    if layout not in ("packed", "shared_prompt"):
        raise ValueError(f"layout_pairs lays out 'packed' or 'shared_prompt', got {layout!r}")
    n = len(prompts)
    if not n == len(chosen) == len(rejected):
        raise ValueError(f"{n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    if layout == "packed":  # units: the 2B sequences, chosen ones first
        units = [(p, c) for p, c in zip(list(prompts) * 2, list(chosen) + list(rejected),
                                         strict=True)]
        lengths = [len(p) + len(c) for p, c in units]
    else:
        lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected,
                                                                strict=True)]
    rows = plan_token_batches(lengths, max_tokens or max(max(lengths, default=1), 1))
    keys = ("ids", "pos", "seg", "branch", "col", "target", "seq")
    built = []
    for row in rows:
        out: dict[str, list] = {k: [] for k in keys}
        start = 0
        for u in row:
            if layout == "packed":
                _sequence(*units[u], start, u, out)
            else:
                p, c, r = prompts[u], chosen[u], rejected[u]
                _sequence(p, c, start, u, out)  # prompt + chosen, as in `packed`
                out["branch"][-1][len(p):] = CHOSEN
                out["ids"].append(r)
                out["pos"].append(np.arange(len(p), len(p) + len(r)))  # as in prompt+rejected
                out["seg"].append(np.full(len(r), u))
                out["branch"].append(np.full(len(r), REJECTED))
                _reads(r, start + len(p) + len(c), start + len(p) - 1 if len(p) else -1,
                       n + u, out)
            start += lengths[u]
        built.append((start, out))
    width = max(1, max((w for w, _ in built), default=0))
    batch = {k: np.zeros((len(rows), width), dtype=np.int64) for k in
             ("input_ids", "position_ids", "segment_ids", "branch_ids", "tokens")}
    batch["input_ids"][:] = pad_token_id
    batch["segment_ids"][:] = -1
    batch["position_ids"][:] = np.arange(width)  # padding: a causal run of its own (below)
    reads: dict[str, list] = {"read_at": [], "read_ids": [], "read_seq": []}
    for i, (w, out) in enumerate(built):
        cat = {k: np.concatenate(out[k]).astype(np.int64) if out[k] else
               np.zeros(0, dtype=np.int64) for k in keys}
        batch["input_ids"][i, :w] = cat["ids"]
        batch["position_ids"][i, :w] = cat["pos"]
        batch["position_ids"][i, w:] = np.arange(width - w)
        batch["segment_ids"][i, :w] = cat["seg"]
        batch["branch_ids"][i, :w] = cat["branch"]
        batch["tokens"][i, :w] = 1
        reads["read_at"].append(i * width + cat["col"])
        reads["read_ids"].append(cat["target"])
        reads["read_seq"].append(cat["seq"])
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    t.update({k: torch.from_numpy(np.concatenate(v).astype(np.int64)) for k, v in reads.items()})
    t["completion_lengths"] = torch.tensor([len(c) for c in list(chosen) + list(rejected)],
                                           dtype=torch.long)
    return t


def allowed(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """(R, T), (R, T) -> (R, 1, T, T) bool, True where query q may attend to key k: the same
    segment, k <= q, and k is a shared-prompt token or on q's own branch. Padding (segment -1)
    attends causally to padding, so that no query row is fully masked (SDPA would give NaN
    there, and NaN · 0 in the backward poisons the gradients).

    Built block by block: the mask is block-diagonal, one causal block per segment (with
    rejected's queries cut off from chosen's keys), so only Σ L² of its R·T² entries are
    written, not computed from (R, T, T) comparisons (64 pairs of the bench's shape: 0.01-0.03 s
    instead of 0.3-0.5 s on this 2-core CPU)."""
    r, t = segment_ids.shape
    device = segment_ids.device
    mask = torch.zeros(r, 1, t, t, dtype=torch.bool, device=device)
    seg = segment_ids.cpu()
    first = torch.ones(r, t, dtype=torch.bool)
    first[:, 1:] = seg[:, 1:] != seg[:, :-1]
    for row, col in first.nonzero().tolist():
        nxt = first[row, col + 1:].nonzero()
        end = col + 1 + int(nxt[0]) if len(nxt) else t
        block = torch.ones(end - col, end - col, dtype=torch.bool, device=device).tril_()
        b = branch_ids[row, col:end]
        block &= ~((b[:, None] == REJECTED) & (b[None, :] == CHOSEN))
        mask[row, 0, col:end, col:end] = block
    return mask


def attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, implementation: str,
                   dtype: torch.dtype = torch.float32):
    """The `allowed` mask in the format `implementation` (a transformers attention
    implementation, `config._attn_implementation`) takes as a prepared 4D mask: `sdpa` boolean
    (R, 1, T, T); `eager` additive float (0 or dtype's min, as transformers' eager_mask);
    `flex_attention` a BlockMask. Flash attention takes no 4D mask: it is refused."""
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        seg, br = segment_ids, branch_ids

        def mask_mod(b, h, q, k):
            return ((seg[b, q] == seg[b, k]) & (k <= q)
                    & ((br[b, k] == PROMPT) | (br[b, k] == br[b, q])))

        r, t = seg.shape
        return create_block_mask(mask_mod, B=r, H=None, Q_LEN=t, KV_LEN=t,
                                 device=seg.device)
    mask = allowed(segment_ids, branch_ids)
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    raise ValueError(f"packed layouts need an attention that takes a 4D mask (sdpa, eager, "
                     f"flex_attention), not {implementation!r}")


def _modules(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to call, the causal LM): a `TokenLogps` (or DDP's wrapper of one, as in
    training) as it is, a bare causal LM inside a lean `TokenLogps`."""
    inner = getattr(model, "module", model)
    if isinstance(inner, TokenLogps):
        return model, inner.model
    return TokenLogps(model), model


def pair_logps(
    model, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]], *, layout: str, max_tokens: int = 0,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Chosen and rejected summed completion log-probs, (B,) float64 each in the input order,
    from one forward of B pairs in `layout`, through `model` (a causal LM, a `TokenLogps`, or
    DDP/FSDP's wrapper of one: the forward runs inside its hooks).

    The contract of `trainer.loop._pair_logps`: also returns the batch `t`, whose
    completion_lengths (2B,) are len(chosen) then len(rejected) and whose attention_mask sums
    to the input tokens computed (`padded`: with the prompt twice; `shared_prompt`: once).
    Token log-probs are float32 (`trainer.logps`), summed in float64 (`sequence_logps`).
    """
    forward, lm = _modules(model)
    device = next(model.parameters()).device
    n = len(prompts)
    if layout == "padded":
        t = collate(list(prompts) * 2, list(chosen) + list(rejected), pad_token_id)
        token_logps, _ = forward(t["input_ids"].to(device), t["attention_mask"].to(device),
                                 t["labels"].to(device))
        logps = token_logps.double().sum(dim=-1)
        return logps[:n], logps[n:], t
    t = layout_pairs(prompts, chosen, rejected, layout=layout, max_tokens=max_tokens,
                     pad_token_id=pad_token_id)
    mask = attention_mask(t["segment_ids"].to(device), t["branch_ids"].to(device),
                          lm.config._attn_implementation, next(lm.parameters()).dtype)
    picked = forward(t["input_ids"].to(device), mask, t["read_ids"].to(device),
                     position_ids=t["position_ids"].to(device),
                     read_at=t["read_at"].to(device))
    logps = torch.zeros(2 * n, dtype=torch.float64, device=device).index_add(
        0, t["read_seq"].to(device), picked.double())
    t["attention_mask"] = t["tokens"]
    return logps[:n], logps[n:], t
