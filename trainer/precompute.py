"""`odpo precompute`: tokenize each pair once and compute the reference log-probs once, cached.

Output: the pairs' columns plus `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`
(list<int32>, already truncated: the trainer uses them as they are and needs no rule of its own)
and `ref_chosen_logps`, `ref_rejected_logps` (float64) — the summed completion log-probs of the
reference model, computed with `trainer.logps` exactly as the trainer computes the policy's — with
`chosen_num_tokens`, `rejected_num_tokens` (int32), the completion token counts behind those sums
(what length-normalised losses divide by: ipo_mean, simpo, sigmoid_norm; trainer/loss.py).

Layout (`layout`): with `shared_prompt` (what `auto` picks on sdpa / eager attention) the forward
computes each pair as one [prompt, chosen, rejected] segment, through `trainer.packing.pair_logps`
as the trainer does: each prompt once instead of twice, pairs batched by P + C + R. `padded`
sorts the 2 · pairs sequences (prompt + chosen, prompt + rejected) by length into right-padded
batches. Both give the same values to float32 rounding (tests/test_packing.py), as any two
batchings do; the manifest's stats say which ran (`layout`) and the positions it computed
(`tokens`).

Token ids: pairs from `odpo pair` carry the sampled ids (`chosen_token_ids`, `rejected_token_ids`):
they are the completion ids exactly as stored (vLLM's EOS / stop token where it stopped on one, no
EOS after a response cut at max_tokens), never a re-tokenization of the text, which loses special
tokens and on BPE / SentencePiece tokenizers need not give the sampled ids back. The prompt ids
are the tokenizer's encoding of the prompt with special tokens, as vLLM encoded it for sampling
(`odpo sample` checks that). Pairs without those columns (`odpo import`, a user's Parquet) are
tokenized from text (`trainer.collate.tokenize_completions`: completions get an EOS unless they
already end their turn). Ids sampled with another vocabulary (the pairs manifest's
`tokenizer_vocab`) than --tokenizer's are refused. With `logps: false` the stage only tokenizes
(for reference-free losses) and writes no `ref_*_logps` columns.

Cache (docs/design.md, Reference cache key): the key is a sha256 over the reference weights' digest,
the tokenizer files' digest, the truncation settings, the compute dtype and the pairs' content
digest. Computing the key hashes files but never loads the model. With an equal key the stage
finishes from `out` itself, or from the content-addressed store `cache_dir/<key>/` that every run
fills; so a beta sweep or a re-run into a new directory never recomputes. Any difference in the key
recomputes; `cache="require"` fails instead.

Truncation rule (TRL's classic DPO rule, keeping BOS); lengths count BOS and EOS:
  1. A pair fits when len(prompt) + max(len(chosen), len(rejected)) <= max_length.
  2. Otherwise, if the prompt is longer than max_prompt_length, it keeps BOS and its *last*
     max_prompt_length - 1 tokens (the end of the prompt is what the response answers).
  3. If still too long, each completion keeps its *first* max_length - len(prompt) tokens. A cut
     completion has no EOS; its log-prob is that of the kept prefix, for reference and policy.
  With truncation="drop" a pair that does not fit is dropped instead (counted as `too_long`).
  Pairs whose chosen and rejected ids are equal (e.g. after a cut) carry no preference signal
  and are dropped as `identical_ids`. Every drop is counted in the manifest.

Unpaired rows (`odpo pair --mode unpaired`, for KTO): each row's (prompt, completion) is
tokenized and cut by the same rule (a row is a pair whose two completions are its one), and
the output holds `prompt_input_ids`, `completion_input_ids`, `kl_completion_input_ids`
(list<int32>), `ref_logps`, `ref_kl_logps` (float64) and `completion_num_tokens` (int32) beside
the rows' columns (`label`, ...). KTO's reference point z₀ is the policy's KL from the reference
estimated on *mismatched* (prompt, completion) pairs (Ethayarajh et al. 2024, §4.1); TRL pairs
each row's prompt with the previous row's completion within a batch. Here the training order is
drawn per epoch, so the mismatch is fixed in the data instead, deterministic and stored:
`kl_partners` sorts the kept rows by prompt and gives each row the completion of the row m
places further on (cyclically), m the most rows any one prompt has, so every row's KL
completion answers another prompt and every completion is used exactly once. The KL sequence
is the row's (already cut) prompt and the other row's completion ids, cut to fit max_length;
the trainer runs the policy on exactly these ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.checkpoint import (
    check_checkpoint,
    config_context_length,
    disable_dropout,
    tokenizer_digest,
    vocab_digest,
    weights_digest,
)
from pipeline.cluster import check_copies, copy_count, copy_threads, ensure_ray
from pipeline.errors import UserError
from pipeline.manifest import input_digest, read_manifest, verify_shards, write_stage
from pipeline.stage import (
    Shards,
    Upstream,
    check_out,
    join_named_cluster,
    read_rows,
    read_stage,
    write_output,
)
from trainer import packing
from trainer.collate import collate, tokenize_completions
from trainer.logps import model_token_logps
from trainer.loop import resolve_layout  # cheap: no Ray (Train) at import

STAGE = "precompute"
PAIR_STAGES = ("pair", "import")  # manifests whose shards hold pairs
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
COUNT_COLUMNS = ("chosen_num_tokens", "rejected_num_tokens")  # completion tokens of each sum
STORED_ID_COLUMNS = ("chosen_token_ids", "rejected_token_ids")  # sampled ids, from `odpo pair`
# Unpaired rows (`odpo pair --mode unpaired`): what they hold, and what this stage adds.
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
UNPAIRED_ID_COLUMNS = ("prompt_input_ids", "completion_input_ids", "kl_completion_input_ids")
UNPAIRED_LOGP_COLUMNS = ("ref_logps", "ref_kl_logps")
UNPAIRED_COUNT_COLUMN = "completion_num_tokens"
# The mismatch rule behind `kl_completion_input_ids`, in the cache key of unpaired rows.
KL_RULE = "sorted by prompt ids, rotated by the largest prompt's row count"
# Bump when the tokenization, truncation or log-prob rule changes: old cache entries go stale.
# 2: completions are the stored sampled ids when the pairs carry them; 3: lean log-probs
# (trainer.logps.model_token_logps); 4: no EOS after a completion that ends its turn
# (trainer.collate.tokenize_completions); tokenize-only shards (`logps: false`)
CACHE_VERSION = 4
DTYPES = ("float32", "bfloat16", "float16")
CACHE_MODES = ("auto", "require", "recompute")
TRUNCATION_MODES = ("truncate", "drop")
LAYOUTS = ("auto", "padded", "shared_prompt")  # of paired input's forward (trainer/packing.py)


@dataclass(frozen=True)
class PrecomputeConfig:
    # pairs stage dir (`pair`/`import` manifest), or Parquet/JSONL with the pair columns; or
    # the unpaired rows of `odpo pair --mode unpaired` (for kto)
    pairs: str
    model: str  # reference checkpoint (HF dir, local or URI); no default: the anchor is a choice
    out: str  # output stage directory: Parquet shards + manifest.json
    tokenizer: str | None = None  # tokenizer dir; default the model's (the policy must share it)
    max_length: int = 0  # tokens of prompt + completion incl. BOS/EOS; 0 = the model's context
    max_prompt_length: int = 0  # prompt tokens kept when a pair is cut; 0 = max_length // 2 (TRL)
    truncation: str = "truncate"  # truncate (module docstring rule) | drop (counted as too_long)
    dtype: str = "float32"  # reference weights: float32 | bfloat16 | float16; log-softmax is fp32
    # sequences per forward (chosen, rejected count apart), grouped by length; in the pair
    # layouts a forward holds batch_size // 2 pairs (at least 1), so it never computes more
    # positions than a padded one of batch_size sequences: a batch_size that fits memory today
    # still fits
    batch_size: int = 64
    # how paired input's forward lays out a pair (trainer/packing.py): auto | padded (prompt +
    # chosen and prompt + rejected apart, sorted by length: each prompt computed twice) |
    # shared_prompt ([prompt, chosen, rejected] per pair: the prompt computed once); auto is
    # shared_prompt where the reference's attention takes a 4D mask (sdpa, eager), padded
    # otherwise (as DPOConfig.layout). Unpaired rows (kto) always run padded.
    layout: str = "auto"
    # reference model copies (Ray Data actors) running in parallel; 0 = auto: with no cluster
    # named, one per local GPU under use_gpu, else 1 (pipeline.cluster.copy_count)
    replicas: int = 0
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per actor
    # intra-op threads per actor; 0 = auto: with no cluster named, this machine's CPUs shared
    # out among the replicas; on a named cluster, cpus_per_replica (pipeline.cluster.copy_threads)
    torch_threads: int = 0
    use_gpu: bool = False  # one GPU per replica
    cache: str = "auto"  # auto (reuse an equal key, else compute) | require | recompute
    # Content-addressed store shared by all runs (sweeps, new out dirs); "" turns it off.
    # Default: $ODPO_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, + /offline-dpo/reference.
    cache_dir: str | None = None
    # false: tokenize only, no reference forward and no ref_*_logps columns, for the losses
    # that need no reference (simpo, orpo); `model` then only lends its tokenizer and context
    logps: bool = True


# ---------------------------------------------------------------- pure functions (tested bare)


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_token_id: int | None,
) -> tuple[list[int], list[int], list[int], bool]:
    """Apply the module docstring's truncation rule to one tokenized pair.

    Returns (prompt, chosen, rejected, was_truncated); lists are returned unchanged when they fit.
    Requires 1 <= max_prompt_length < max_length, so every cut completion keeps >= 1 token.
    """
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        if bos_token_id is not None and prompt and prompt[0] == bos_token_id:
            prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]
        else:
            prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    vocab_size: int | None = None,
    chosen_token_ids: Sequence[Sequence[int]] | None = None,
    rejected_token_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[list[int], list[list[int]], list[list[int]], list[list[int]], dict[str, int], int]:
    """Tokenize every pair once (`trainer.collate.tokenize_completions`: prompt with BOS,
    completions with EOS) and apply the truncation rule. With `chosen_token_ids` /
    `rejected_token_ids` (the sampled ids, one list per pair) the completions are those ids as
    they are (no EOS added) and only the prompts are tokenized (with BOS, as vLLM did).

    Returns (kept row indices, prompt ids, chosen ids, rejected ids of the kept rows,
    dropped counts by reason, number of kept pairs that were truncated).
    """
    n = len(prompts)
    if chosen_token_ids is None or rejected_token_ids is None:
        # One call: each prompt once, then the chosen and the rejected completions (same rule).
        prompt_ids, completion_ids = tokenize_completions(
            tokenizer, list(prompts), list(chosen) + list(rejected)
        ) if n else ([], [])
        chosen_ids, rejected_ids = completion_ids[:n], completion_ids[n:]
    else:
        prompt_ids = [list(p) for p in tokenizer(list(prompts), add_special_tokens=True)[
            "input_ids"]] if n else []
        chosen_ids = [list(c) for c in chosen_token_ids]
        rejected_ids = [list(r) for r in rejected_token_ids]
    bos = tokenizer.bos_token_id
    keep, p_out, c_out, r_out = [], [], [], []
    dropped, truncated = {"too_long": 0, "identical_ids": 0}, 0
    for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids, strict=True)):
        if truncation == "drop" and len(p) + max(len(c), len(r)) > max_length:
            dropped["too_long"] += 1
            continue
        p, c, r, cut = truncate_pair(p, c, r, max_length=max_length,
                                     max_prompt_length=max_prompt_length, bos_token_id=bos)
        if c == r:
            dropped["identical_ids"] += 1
            continue
        truncated += cut
        keep.append(i)
        p_out.append(p)
        c_out.append(c)
        r_out.append(r)
    _check_ids(p_out + c_out + r_out, vocab_size, stored=chosen_token_ids is not None)
    return keep, p_out, c_out, r_out, dropped, truncated


def _check_ids(ids: list[list[int]], vocab_size: int | None, stored: bool) -> None:
    """Every id within the model's vocabulary, none negative (`stored`: sampled ids, not the
    tokenizer's)."""
    top = max((max(x) for x in ids if x), default=-1)
    if vocab_size and top >= vocab_size:
        raise UserError(
            f"the tokenizer produces id {top}, beyond the model's vocab_size {vocab_size}: "
            f"is --tokenizer the reference model's?"
            if not stored else
            f"the pairs hold token id {top}, beyond the model's vocab_size {vocab_size}: were "
            f"they sampled with another model's tokenizer?"
        )
    if min((min(x) for x in ids if x), default=0) < 0:
        raise UserError("the pairs hold a negative token id")


def tokenize_unpaired(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    vocab_size: int | None = None,
    completion_token_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[list[int], list[list[int]], list[list[int]], dict[str, int], int]:
    """`tokenize_pairs` for unpaired rows: each (prompt, completion) tokenized once (or the
    stored sampled ids as they are) and cut by the same rule. Returns (kept row indices, prompt
    ids, completion ids, dropped counts by reason, number of kept rows that were cut)."""
    if completion_token_ids is None:
        prompt_ids, completion_ids = tokenize_completions(
            tokenizer, list(prompts), list(completions)) if len(prompts) else ([], [])
    else:
        prompt_ids = [list(p) for p in tokenizer(list(prompts), add_special_tokens=True)[
            "input_ids"]] if len(prompts) else []
        completion_ids = [list(c) for c in completion_token_ids]
    bos = tokenizer.bos_token_id
    keep, p_out, c_out, dropped, truncated = [], [], [], {"too_long": 0}, 0
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if truncation == "drop" and len(p) + len(c) > max_length:
            dropped["too_long"] += 1
            continue
        p, c, _, cut = truncate_pair(p, c, c, max_length=max_length,
                                     max_prompt_length=max_prompt_length, bos_token_id=bos)
        truncated += cut
        keep.append(i)
        p_out.append(p)
        c_out.append(c)
    _check_ids(p_out + c_out, vocab_size, stored=completion_token_ids is not None)
    return keep, p_out, c_out, dropped, truncated


def kl_partners(prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """KTO's mismatched pairs: for row i, the row j whose completion is i's KL completion,
    (n,) int.

    The rows sorted by prompt (stable), row at sorted position k takes the row at position
    (k + m) mod n, m the most rows one prompt has. A prompt's rows are contiguous in that order
    and fewer than m + 1, so j answers another prompt whenever no prompt has more than half
    the rows (n >= 2m; a UserError otherwise: no rotation can mismatch them all); j runs over
    a permutation, so each completion serves once.
    """
    keys = [tuple(p) for p in prompt_ids]
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    m = max(Counter(keys).values())
    if n < 2 * m:
        raise UserError(
            f"unpaired rows: one prompt holds {m} of the {n} rows; KTO's reference point pairs "
            "each row's prompt with another prompt's completion, which needs every prompt to "
            "hold at most half of the rows (add prompts)")
    order = sorted(range(n), key=keys.__getitem__)
    partner = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order):
        partner[i] = order[(k + m) % n]
    return partner


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of `lengths` in batches of `batch_size`, longest first (the largest batch runs
    first, so an out-of-memory shows at once), so each batch pads to a near-equal length."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Share of the padded (B, T) positions that are padding, over all batches."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0


def pair_padding_fraction(prompt_lengths, chosen_lengths, rejected_lengths,
                          batches: Sequence[np.ndarray], layout: str) -> float:
    """Share of the positions computed that are padding, over batches of pair indices, each
    laid out by `trainer.packing.pair_logps` in `layout`: `padded`, 2·|b| rows as wide as the
    batch's longest prompt + completion; `shared_prompt`, the rows `plan_token_batches` packs
    the pairs into (budget: the longest P + C + R), each as wide as that budget. Real tokens:
    `packing.pair_tokens` (2P + C + R, or P + C + R)."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in (prompt_lengths, chosen_lengths,
                                                         rejected_lengths))
    real = packing.pair_tokens(p, c, r, layout)
    computed = 0
    for b in batches:
        if not len(b):
            continue
        if layout == "shared_prompt":
            width = max(1, int(real[b].max()))
            computed += len(packing.plan_token_batches(real[b], width)) * width
        else:
            computed += packing.batch_cost(packing.pair_cost(p[b], c[b], r[b], "padded"),
                                           "padded")
    return 1.0 - float(real.sum()) / computed if computed else 0.0


def reference_logps(model, prompt_ids, completion_ids, pad_token_id: int) -> np.ndarray:
    """Summed completion log-probs of B sequences from one right-padded forward: (B,) float64.

    The same `collate` + `trainer.logps` path as the trainer's policy (docs/design.md, Numerics);
    float32 log-softmax whatever the model's dtype; no autograd state. The per-token float32
    log-probs are summed in float64: a float32 sum of ~30 tokens near -140 is off by ~1.5e-5
    (its last bit) and its rounding depends on the padded width; the float64 sum is
    batch-independent and is what the float64 column can hold.
    """
    t = collate(prompt_ids, completion_ids, pad_token_id)
    device = next(model.parameters()).device
    with torch.inference_mode():  # lean: the head and log-softmax on completion positions only
        token_logps, _ = model_token_logps(  # masked: 0 off-target
            model, t["input_ids"].to(device), t["attention_mask"].to(device),
            t["labels"].to(device))
    return token_logps.double().sum(-1).cpu().numpy()


def pair_reference_logps(model, prompt_ids, chosen_ids, rejected_ids, pad_token_id: int,
                         layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Chosen and rejected summed completion log-probs of B pairs from one forward in `layout`
    (`trainer.packing.pair_logps`, the trainer's own function): (B,) float64 each, no autograd
    state. `shared_prompt` computes each prompt once; every layout equals `reference_logps` on
    the pair's two sequences to float32 rounding."""
    with torch.inference_mode():
        chosen, rejected, _ = packing.pair_logps(model, prompt_ids, chosen_ids, rejected_ids,
                                                 layout=layout, pad_token_id=pad_token_id)
    return chosen.cpu().numpy(), rejected.cpu().numpy()


class ReferenceForward:
    """Ray Data actor: loads the reference model once; each call runs, on every length group
    (`batch_id`) of the batch it is given, `reference_logps` (sequence rows: `layout` None) or
    `pair_reference_logps` (pair rows, in `layout`; `auto` resolved here from the model's
    attention implementation, as the trainer resolves it)."""

    def __init__(self, model: str, dtype: str, use_gpu: bool, torch_threads: int, pad_id: int,
                 layout: str | None = None):
        self.model_path, self.pad_id, self.error = model, pad_id, None
        self.layout = layout
        try:
            from transformers import AutoModelForCausalLM

            if torch_threads > 0:
                torch.set_num_threads(torch_threads)
            m = AutoModelForCausalLM.from_pretrained(
                storage.local_copy(model), dtype=getattr(torch, dtype), trust_remote_code=False,
                use_safetensors=True,
            )
            m.eval().requires_grad_(False)
            disable_dropout(m)
            self.model = m.to("cuda" if use_gpu else "cpu")
            if layout is not None:
                self.layout = resolve_layout(layout, self.model)
        except Exception as e:  # noqa: BLE001
            # Ray Data restarts a failing actor constructor without end (docs/design.md,
            # Platforms): keep the error and raise it from the first batch, which fails the job
            # with this message.
            self.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise UserError(f"reference model {self.model_path}: cannot load ({self.error})")
        ids = batch["batch_id"]
        layout = np.full(len(ids), self.layout or "padded")
        if self.layout is None:
            out = np.empty(len(ids), dtype=np.float64)
            for b in np.unique(ids):
                sel = np.flatnonzero(ids == b)
                out[sel] = reference_logps(
                    self.model,
                    [batch["prompt_input_ids"][i] for i in sel],
                    [batch["completion_input_ids"][i] for i in sel],
                    self.pad_id,
                )
            return {"index": batch["index"], "logps": out, "layout": layout}
        chosen, rejected = np.empty(len(ids)), np.empty(len(ids))
        for b in np.unique(ids):
            sel = np.flatnonzero(ids == b)
            chosen[sel], rejected[sel] = pair_reference_logps(
                self.model, *([batch[c][i] for i in sel] for c in ID_COLUMNS), self.pad_id,
                self.layout)
        return {"index": batch["index"], "chosen_logps": chosen, "rejected_logps": rejected,
                "layout": layout}


# ---------------------------------------------------------------- cache key


def _local_dir(path: str, what: str) -> Path:
    """A local checkpoint directory, or this node's copy of one named by URI."""
    if storage.is_uri(path):
        if not storage.is_dir(path):
            raise UserError(f"{what} {path}: no such directory")
        return Path(storage.local_copy(path, what))
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{what} {path}: no such directory; the precompute stage hashes the files for its "
            f"cache key, so it needs a checkpoint directory, local or a URI (download it first)"
        )
    return p.resolve()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    return storage.cache_root() / "reference"


def _model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the model config ({e})") from e


# ---------------------------------------------------------------- the stage


def _validate(cfg: PrecomputeConfig) -> None:
    for name, value, allowed in (
        ("truncation", cfg.truncation, TRUNCATION_MODES),
        ("dtype", cfg.dtype, DTYPES),
        ("cache", cfg.cache, CACHE_MODES),
        ("layout", cfg.layout, LAYOUTS),
    ):
        if value not in allowed:
            raise UserError(f"{name} must be one of {allowed}, got {value!r}")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    check_copies(cfg.replicas, cfg.torch_threads, cfg.cpus_per_replica)
    if cfg.max_length < 0 or cfg.max_prompt_length < 0:
        raise UserError("max_length and max_prompt_length must be >= 0 (0 = default)")


def _lengths(cfg: PrecomputeConfig, model_dir: Path, model_config: dict) -> tuple[int, int]:
    """(max_length, max_prompt_length): the config's, or the model's context and half of it."""
    context = config_context_length(model_config)
    max_length = cfg.max_length or context
    if not max_length:
        raise UserError(f"{model_dir}/config.json names no context length; set --max-length")
    if context and max_length > context:
        raise UserError(f"max_length {max_length} exceeds the model's context of {context}")
    max_prompt_length = cfg.max_prompt_length or max_length // 2
    if not 1 <= max_prompt_length < max_length:
        raise UserError(
            f"max_prompt_length {max_prompt_length} must be in [1, max_length {max_length})"
        )
    return max_length, max_prompt_length


def run_precompute(cfg: PrecomputeConfig) -> dict:
    """Fill `cfg.out` with precompute shards: from `out` or the store when the key is equal
    (without loading the model or starting Ray), else by computing them. Returns a summary
    (`cache`: "hit" or "computed")."""
    t0 = time.perf_counter()
    _validate(cfg)
    pairs, out = storage.absolute(cfg.pairs), storage.absolute(cfg.out)
    unpaired = _unpaired_input(pairs)
    if unpaired and not cfg.logps:
        raise UserError("--pairs holds unpaired rows, which only kto reads, and kto needs the "
                        "reference log-probs: drop --no-logps")
    up = read_stage(pairs, PAIR_STAGES, UNPAIRED_COLUMNS if unpaired else PAIR_COLUMNS,
                    flag="--pairs")
    check_out(out, STAGE, {"--pairs": pairs})
    model_dir = _local_dir(cfg.model, "model")
    check_checkpoint(model_dir)
    tok_dir = _local_dir(cfg.tokenizer or cfg.model, "tokenizer")
    model_config = _model_config(model_dir)
    max_length, max_prompt_length = _lengths(cfg, model_dir, model_config)
    inputs = {"pairs": input_digest(pairs), "model": weights_digest(model_dir),
              "tokenizer": tokenizer_digest(tok_dir)}
    # No `layout`: the shared-prompt and padded forwards give the same values to float32
    # rounding (tests/test_packing.py), as two batch sizes do (also left out), so either
    # layout's output serves the other's key; the manifest's stats say which one ran.
    key_parts = {
        "version": CACHE_VERSION,
        "weights": inputs["model"],
        "tokenizer": inputs["tokenizer"],
        "truncation": {"max_length": max_length, "max_prompt_length": max_prompt_length,
                       "mode": cfg.truncation},
        "dtype": cfg.dtype,
        "pairs": inputs["pairs"],
        "logps": cfg.logps,
        # Same shards, other source: an import's id columns are never used (`_stored_ids`).
        "completions": "text" if (up.manifest or {}).get("stage") == "import"
        else "stored ids when present",
        **({"unpaired": {"kl": KL_RULE}} if unpaired else {}),
    }
    key = cache_key(key_parts)
    named = {name: str(d) if not storage.is_uri(path) else path
             for name, d, path in (("model", model_dir, cfg.model),
                                   ("tokenizer", tok_dir, cfg.tokenizer or cfg.model))}
    config = {**asdict(cfg), "pairs": pairs, **named, "out": out}
    store_root = default_cache_dir() if cfg.cache_dir is None else cfg.cache_dir
    entry = storage.join(storage.absolute(store_root), key) if store_root else None
    reads = {"--model": cfg.model}
    join_named_cluster(out, reads)

    summary = {"out": str(out), "key": key}
    hit = None if cfg.cache == "recompute" else _cached(out, entry, key, config)
    if hit is not None:
        return {**summary, **_summary(hit[0], t0), "cache": "hit", "source": hit[1]}
    if cfg.cache == "require":
        raise UserError(
            f"reference cache miss (key {key[:16]}): neither {out} nor "
            f"{entry or 'the store (off)'} holds it; rerun without "
            f"--cache=require to compute it"
        )
    ensure_ray(out, reads)
    extra = {"cache_key": key, "key_parts": key_parts, "source": "computed",
             **({"unpaired": True} if unpaired else {})}
    compute = _compute_unpaired if unpaired else _compute
    manifest = write_output(out, STAGE, config, inputs, lambda: compute(
        cfg, up, named["model"], tok_dir, model_config, max_length, max_prompt_length, extra))
    if entry is not None:
        _store(out, entry)
    return {**summary, **_summary(manifest, t0), "cache": "computed", "source": "computed"}


def _summary(manifest: dict, t0: float) -> dict:
    return {"pairs": manifest["rows_out"], "dropped": manifest["dropped"],
            "stats": manifest.get("stats", {}), "seconds": time.perf_counter() - t0}


def _cached(out: str, entry: str | None, key: str, config: dict) -> tuple[dict, str] | None:
    """(manifest, source) of the output under `key`: `out` itself, or the store's `entry`
    copied into `out`; None when neither holds it."""
    manifest = _hit(out, key)
    if manifest is not None:
        return manifest, str(out)
    manifest = _hit(entry, key) if entry is not None else None
    if manifest is None:
        return None
    extra = {k: manifest[k] for k in ("cache_key", "key_parts", "stats", "unpaired")
             if k in manifest}
    return _copy_stage(entry, manifest, out, config, {**extra, "source": str(entry)}), str(entry)


def _hit(stage_dir: str, key: str) -> dict | None:
    """The manifest of a complete, intact precompute output under `key`, else None."""
    manifest = read_manifest(stage_dir) if storage.is_dir(stage_dir) else None
    if not manifest or manifest.get("stage") != STAGE or manifest.get("cache_key") != key:
        return None
    try:
        return verify_shards(stage_dir, STAGE)
    except UserError:
        return None


def _copy_stage(src: str, manifest: dict, out: str, config: dict, extra: dict) -> dict:
    def copy(tmp: str) -> None:
        for f in manifest["files"]:
            storage.copy(storage.join(src, f["name"]), storage.join(tmp, f["name"]))

    return write_stage(out, STAGE, config, manifest["inputs"], copy, manifest["rows_in"],
                       manifest["dropped"], extra)


def _store(out: str, entry: str) -> None:
    """Copy a finished output into the shared store (atomic, or manifest last on an object
    store); a failure only warns."""
    try:
        with storage.output_dir(entry, overwrite=True) as tmp:
            for f in storage.list_files(out):
                storage.copy(f, storage.join(tmp, storage.relative(f, out)))
    except (OSError, UserError) as e:
        print(f"odpo precompute: warning: cache store {entry} not written ({e})", file=sys.stderr)


def _unpaired_input(path: str) -> bool:
    """Whether `path` holds the unpaired rows of `odpo pair --mode unpaired`."""
    manifest = read_manifest(path) if storage.is_dir(path) else None
    return bool(manifest) and manifest.get("stage") == "pair" and (
        manifest.get("config") or {}).get("mode") == "unpaired"


def _stored_ids(table, manifest: dict | None) -> tuple[list, list] | None:
    """The pairs' sampled (chosen, rejected) token ids, or None for the text path: pairs without
    them, and imported preference data (its columns are the dataset's, not this sampler's)."""
    if (manifest or {}).get("stage") == "import" or not all(
            c in table.column_names for c in STORED_ID_COLUMNS):
        return None
    for c in STORED_ID_COLUMNS:
        if table[c].null_count:
            raise UserError(f"{table[c].null_count} pair(s) with a null `{c}`")
    return table["chosen_token_ids"].to_pylist(), table["rejected_token_ids"].to_pylist()


def _check_vocab(manifest: dict | None, tokenizer, tok_dir) -> None:
    sampled = (manifest or {}).get("tokenizer_vocab")
    if sampled and sampled != vocab_digest(tokenizer):
        raise UserError(
            f"the pairs' token ids were sampled with a tokenizer of another vocabulary than "
            f"{tok_dir}'s; pass the sampling model's tokenizer (--tokenizer) or re-sample"
        )


def _read_pairs(up: Upstream):
    """The pairs as one table, without ids or log-probs an input may already carry (they would
    be stale beside the new ones)."""
    table = read_rows(up, table=True)
    if table is None:
        raise UserError(f"{up.path}: the manifest lists no shards (no pairs)")
    for c in PAIR_COLUMNS:
        if table[c].null_count:
            raise UserError(f"{up.path}: {table[c].null_count} row(s) with a null `{c}`")
    return table.drop_columns([c for c in ID_COLUMNS + LOGP_COLUMNS + COUNT_COLUMNS
                               if c in table.column_names])


def _compute(cfg, up: Upstream, model_dir, tok_dir, model_config, max_length, max_prompt_length,
             extra) -> Shards:
    from transformers import AutoTokenizer

    table = _read_pairs(up)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    stored = _stored_ids(table, up.manifest)
    if stored is not None:
        _check_vocab(up.manifest, tokenizer, cfg.tokenizer or cfg.model)
    keep, p_ids, c_ids, r_ids, dropped, truncated = tokenize_pairs(
        tokenizer, table["prompt"].to_pylist(), table["chosen"].to_pylist(),
        table["rejected"].to_pylist(), max_length=max_length,
        max_prompt_length=max_prompt_length, truncation=cfg.truncation,
        vocab_size=model_config.get("vocab_size"),
        chosen_token_ids=None if stored is None else stored[0],
        rejected_token_ids=None if stored is None else stored[1],
    )
    t_forward = time.perf_counter()
    if cfg.logps and p_ids and cfg.layout != "padded":
        # Pair rows, batched by P + C + R: batch_size // 2 pairs a forward (the field's comment).
        sizes = [np.array([len(x) for x in ids]) for ids in (p_ids, c_ids, r_ids)]
        batches = length_batches(packing.pair_tokens(*sizes, "shared_prompt"),
                                 max(1, cfg.batch_size // 2))
        chosen_logps, rejected_logps, layout = _forward_pairs(
            cfg, model_dir, tokenizer, p_ids, c_ids, r_ids, batches)
        tokens = int(packing.pair_tokens(*sizes, layout).sum())
        padding = pair_padding_fraction(*sizes, batches, layout)
    else:
        # Sequence 2k is pair k's chosen, 2k + 1 its rejected; batched by length across pairs.
        seq_prompt = [p for p in p_ids for _ in range(2)]
        seq_completion = [x for pair in zip(c_ids, r_ids, strict=True) for x in pair]
        lengths = [len(p) + len(c) for p, c in zip(seq_prompt, seq_completion, strict=True)]
        batches = length_batches(lengths, cfg.batch_size)
        logps = np.zeros(len(lengths), dtype=np.float64)
        if lengths and cfg.logps:
            logps = _forward(cfg, model_dir, tokenizer, seq_prompt, seq_completion, batches)
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        layout = "padded" if cfg.logps else None  # None: no forward ran (tokenize only)
        tokens, padding = int(sum(lengths)), padding_fraction(lengths, batches)
    forward_s = time.perf_counter() - t_forward

    ids_type = pa.list_(pa.int32())
    result = table.take(pa.array(keep, type=pa.int64()))
    for name, values in (("prompt_input_ids", p_ids), ("chosen_input_ids", c_ids),
                         ("rejected_input_ids", r_ids)):
        result = result.append_column(name, pa.array(values, type=ids_type))
    if cfg.logps:
        for name, values in zip(LOGP_COLUMNS, (chosen_logps, rejected_logps), strict=True):
            result = result.append_column(name, pa.array(values, type=pa.float64()))
    for name, values in zip(COUNT_COLUMNS, (c_ids, r_ids), strict=True):
        result = result.append_column(name, pa.array([len(x) for x in values], type=pa.int32()))
    stats = {
        "sequences": 2 * len(p_ids),  # log-probs computed: chosen and rejected of each pair
        "layout": layout,  # the forward's (`auto` resolved by the reference's attention)
        # Real (non-padding) positions the forward computed: Σ (2P + C + R) padded, Σ (P + C + R)
        # shared_prompt (each prompt once); padding_fraction: the padding's share beside them.
        "tokens": tokens,
        "truncated_pairs": truncated,
        "completions": "text" if stored is None else "stored ids",
        "padding_fraction": padding,
        "forward_s": forward_s,
        "tokens_per_s": tokens / forward_s if forward_s > 0 else 0.0,
        # what compares across layouts (tokens_per_s does not: shared_prompt has fewer tokens)
        "pairs_per_s": len(p_ids) / forward_s if forward_s > 0 else 0.0,
    }
    if layout is not None:  # a forward ran: with how many copies and threads
        stats["replicas"], stats["torch_threads"] = sizing(cfg)
    return Shards(result, table.num_rows, {k: v for k, v in dropped.items() if v},
                  extra={**extra, "stats": stats})


def _compute_unpaired(cfg, up: Upstream, model_dir, tok_dir, model_config, max_length,
                      max_prompt_length, extra) -> Shards:
    """`_compute` for unpaired rows: the completion's and the mismatched KL completion's
    reference log-probs of every row (module docstring)."""
    from transformers import AutoTokenizer

    table = read_rows(up, table=True)
    if table is None:
        raise UserError(f"{up.path}: the manifest lists no shards (no rows)")
    for c in UNPAIRED_COLUMNS:
        if table[c].null_count:
            raise UserError(f"{up.path}: {table[c].null_count} row(s) with a null `{c}`")
    table = table.drop_columns([c for c in UNPAIRED_ID_COLUMNS + UNPAIRED_LOGP_COLUMNS
                                + (UNPAIRED_COUNT_COLUMN,) if c in table.column_names])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    stored = None
    if "completion_token_ids" in table.column_names:
        if table["completion_token_ids"].null_count:
            raise UserError(f"{table['completion_token_ids'].null_count} row(s) with a null "
                            "`completion_token_ids`")
        stored = table["completion_token_ids"].to_pylist()
        _check_vocab(up.manifest, tokenizer, cfg.tokenizer or cfg.model)
    keep, p_ids, c_ids, dropped, truncated = tokenize_unpaired(
        tokenizer, table["prompt"].to_pylist(), table["completion"].to_pylist(),
        max_length=max_length, max_prompt_length=max_prompt_length, truncation=cfg.truncation,
        vocab_size=model_config.get("vocab_size"), completion_token_ids=stored)
    partners = kl_partners(p_ids)
    kl_ids = [c_ids[j][:max_length - len(p)] for p, j in zip(p_ids, partners, strict=True)]
    # Sequence 2k is row k's completion, 2k + 1 its KL completion; batched by length.
    seq_prompt = [p for p in p_ids for _ in range(2)]
    seq_completion = [x for row in zip(c_ids, kl_ids, strict=True) for x in row]
    lengths = [len(p) + len(c) for p, c in zip(seq_prompt, seq_completion, strict=True)]
    batches = length_batches(lengths, cfg.batch_size)
    t_forward = time.perf_counter()
    logps = (_forward(cfg, model_dir, tokenizer, seq_prompt, seq_completion, batches)
             if lengths else np.zeros(0))
    forward_s = time.perf_counter() - t_forward

    ids_type = pa.list_(pa.int32())
    result = table.take(pa.array(keep, type=pa.int64()))
    for name, values in zip(UNPAIRED_ID_COLUMNS, (p_ids, c_ids, kl_ids), strict=True):
        result = result.append_column(name, pa.array(values, type=ids_type))
    for name, values in zip(UNPAIRED_LOGP_COLUMNS, (logps[0::2], logps[1::2]), strict=True):
        result = result.append_column(name, pa.array(values, type=pa.float64()))
    result = result.append_column(UNPAIRED_COUNT_COLUMN,
                                  pa.array([len(c) for c in c_ids], type=pa.int32()))
    labels = result["label"].to_pylist()
    tokens = int(sum(lengths))
    stats = {
        "sequences": len(lengths),
        "tokens": tokens,
        "truncated_rows": truncated,
        "desirable": sum(labels),  # n_D, n_U: KTO's class weights (odpo train warns)
        "undesirable": len(labels) - sum(labels),
        "kl_mismatch": KL_RULE,
        "completions": "text" if stored is None else "stored ids",
        "padding_fraction": padding_fraction(lengths, batches),
        "forward_s": forward_s,
        "tokens_per_s": tokens / forward_s if forward_s > 0 else 0.0,
    }
    return Shards(result, table.num_rows, {k: v for k, v in dropped.items() if v},
                  extra={**extra, "stats": stats})


def sizing(cfg: PrecomputeConfig) -> tuple[int, int]:
    """(replicas, torch threads per replica) the forward runs with: `cfg`'s where set, else sized
    to the machine (`pipeline.cluster.copy_count`, `copy_threads`). Call it once Ray is up."""
    replicas = copy_count(cfg.replicas, cfg.use_gpu)
    return replicas, copy_threads(cfg.torch_threads, replicas, cfg.cpus_per_replica)


def _forward(cfg, model_dir, tokenizer, seq_prompt, seq_completion, batches) -> np.ndarray:
    """Run the actor pool over length-sorted sequences; log-probs back in sequence order."""
    values, _ = _pool(cfg, model_dir, tokenizer, {"prompt_input_ids": seq_prompt,
                                                  "completion_input_ids": seq_completion},
                      batches, cfg.batch_size, None, ("logps",))
    return values["logps"]


def _forward_pairs(cfg, model_dir, tokenizer, p_ids, c_ids, r_ids,
                   batches) -> tuple[np.ndarray, np.ndarray, str]:
    """Run the actor pool over length-sorted pairs in `cfg.layout`: (chosen, rejected)
    log-probs back in pair order, and the layout the actors resolved."""
    columns = dict(zip(ID_COLUMNS, (p_ids, c_ids, r_ids), strict=True))
    values, layouts = _pool(cfg, model_dir, tokenizer, columns, batches,
                            max(1, cfg.batch_size // 2), cfg.layout,
                            ("chosen_logps", "rejected_logps"))
    return values["chosen_logps"], values["rejected_logps"], "+".join(sorted(layouts))


def _pool(cfg, model_dir, tokenizer, columns: dict, batches, rows_per_batch: int,
          layout: str | None, outputs: tuple[str, ...]) -> tuple[dict[str, np.ndarray], set]:
    """Run `ReferenceForward` actors over units (sequences, or pairs when `layout` is given),
    one id list per unit in each of `columns`, grouped by `batches` (arrays of unit indices,
    `rows_per_batch` at most). Returns each of `outputs` (float64) back in unit order, and the
    layouts the actors ran."""
    import ray

    order = np.concatenate(batches)
    batch_id = np.concatenate([np.full(len(b), i) for i, b in enumerate(batches)])
    ids_type = pa.list_(pa.int32())
    table = pa.table({
        "index": pa.array(order, type=pa.int64()),
        "batch_id": pa.array(batch_id, type=pa.int64()),
        **{name: pa.array([values[i] for i in order], type=ids_type)
           for name, values in columns.items()},
    })
    # Blocks hold whole batches (Ray Data then never splits a length group across calls) and are
    # small enough that every replica gets several.
    replicas, threads = sizing(cfg)
    per_block = max(1, min(16, math.ceil(len(batches) / (4 * replicas)))) * rows_per_batch
    blocks = [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ds = ray.data.from_arrow(blocks).map_batches(
        ReferenceForward,
        batch_size=rows_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=cfg.cpus_per_replica,
        num_gpus=1 if cfg.use_gpu else None,
        fn_constructor_kwargs={"model": str(model_dir), "dtype": cfg.dtype,
                               "use_gpu": cfg.use_gpu, "torch_threads": threads,
                               "pad_id": pad_id, "layout": layout},
    )
    values = {k: np.zeros(len(order), dtype=np.float64) for k in outputs}
    filled = np.zeros(len(order), dtype=bool)
    layouts: set = set()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in outputs:
            values[k][b["index"]] = b[k]
        filled[b["index"]] = True
        layouts.update(np.unique(b["layout"]).tolist())
    if not filled.all():
        raise RuntimeError(f"precompute: {int((~filled).sum())} units got no log-prob")
    return values, layouts
