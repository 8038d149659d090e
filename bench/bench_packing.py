"""Padded vs packed vs shared-prompt batches (issue 19): tokens/s and peak memory, side by side.

One random Llama (vocabulary 32k, a narrow body scaled to a 2-core CPU) and B preference pairs
shaped like real data: prompt and completion lengths drawn log-uniform from `--prompt` and
`--completion` (so a batch mixes short and long pairs, as sampled responses do). Each variant
runs in its own process on the same seeded model and pairs, twice: `train` (the policy's
forward + backward of a DPO sigmoid loss on the pairs' summed log-probs, through `TokenLogps`
as training calls it) and `reference` (forward only under `torch.inference_mode`, as the
precompute stage runs the reference model). Variants: `padded` (`trainer.collate`), `packed`
and `shared_prompt` (`trainer.packing`); `NAME:N` sets a row budget of N tokens (default: the
longest sequence / pair); `NAME@N` cuts the pairs into micro-batches of at most N positions
(`odpo train --max-tokens-per-batch N`: `packing.plan_pair_batches`, each micro-batch's loss
weighted by its pairs, gradients accumulated), and `--max-tokens-per-batch N` adds `NAME@N` beside
every layout variant, reported also against its own layout in one micro-batch.

Reported per variant and mode: median step time over the steps after the first (a warm-up),
tokens/s counted in pair tokens Σ (2P + C + R) (the same data for every layout, so tokens/s
compare), the positions each layout computes (rows × width, and the real tokens among them),
and memory: the process's peak RSS (`resource.getrusage`, the process is fresh) and the steps'
peak over the memory after the warm-up (Linux VmHWM, reset there, as bench_logps.py does).

Where a gain can come from: the layouts change the body's work only (`positions`: padding
removed by `packed`, each prompt computed once by `shared_prompt`); the lean LM head and its
float32 log-softmax run on the completion tokens (`head_positions`) in every layout, so the
narrower the body against the vocabulary, the smaller the end-to-end gain.

`attention` (its own process): the attention op alone on one packed batch's 4D mask, forward +
backward and forward only: SDPA with a boolean mask (the choice), SDPA with an additive float
mask, eager (matmul + softmax), and compiled flex attention with a BlockMask.

    python bench/bench_packing.py [--hidden 384 --layers 6 --pairs 8 --prompt 64,512 \\
        --completion 32,256 --steps 4 --variants padded,packed,shared_prompt,attention \\
        --max-tokens-per-batch 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the process's peak resident memory (VmHWM) to its current value; return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_mb("VmRSS")


def pairs_of(args) -> tuple[list, list, list]:
    """B pairs of random ids, lengths log-uniform in the --prompt / --completion ranges."""
    import numpy as np

    g = np.random.default_rng(args.seed)

    def length(lo_hi: str) -> int:
        lo, hi = (int(x) for x in lo_hi.split(","))
        return int(round(math.exp(g.uniform(math.log(lo), math.log(hi)))))

    def ids(n: int) -> list[int]:
        return g.integers(4, args.vocab, size=n).tolist()

    rows = [(ids(length(args.prompt)), ids(length(args.completion)),
             ids(length(args.completion))) for _ in range(args.pairs)]
    return tuple(list(x) for x in zip(*rows, strict=True))


def model_of(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=4096,
        tie_word_embeddings=False, attn_implementation="sdpa"))


def counts(prompts, chosen, rejected, layout: str, max_tokens: int,
           bins: list[list[int]] | None = None) -> dict:
    """Positions computed by `layout`: rows, width, rows × width (the body's work), real tokens
    among them, and head_positions: the positions the LM head and log-softmax run on (the
    completion tokens, the same in every layout). Over `bins`' micro-batches (default: one of
    all the pairs): rows, positions and tokens summed, the widest width."""
    from trainer.collate import collate
    from trainer.logps import IGNORE_INDEX
    from trainer.packing import layout_pairs

    out = {"rows": 0, "width": 0, "positions": 0, "real_tokens": 0, "head_positions": 0}
    for b in bins or [list(range(len(prompts)))]:
        p, c, r = ([xs[i] for i in b] for xs in (prompts, chosen, rejected))
        if layout == "padded":
            t = collate(p * 2, c + r, 0)
            head = int((t["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            t = layout_pairs(p, c, r, layout=layout, max_tokens=max_tokens)
            t["attention_mask"] = t["tokens"]
            head = len(t["read_at"])
        rows, width = t["input_ids"].shape
        out = {"rows": out["rows"] + rows, "width": max(out["width"], width),
               "positions": out["positions"] + rows * width,
               "real_tokens": out["real_tokens"] + int(t["attention_mask"].sum()),
               "head_positions": out["head_positions"] + head}
    return out


def micro_batches(prompts, chosen, rejected, layout: str, budget: int) -> list[list[int]]:
    """The pairs' micro-batches under a token budget of `budget` positions (`odpo train
    --max-tokens-per-batch`), as index lists; all of them in one without a budget."""
    from trainer.packing import pair_cost, plan_pair_batches

    if not budget:
        return [list(range(len(prompts)))]
    costs = pair_cost(*([len(x) for x in xs] for xs in (prompts, chosen, rejected)), layout)
    return [b.tolist() for b in plan_pair_batches(costs, layout, budget)]


def run_variant(args, variant: str, mode: str) -> dict:
    import torch

    from trainer.logps import TokenLogps
    from trainer.loss import dpo_loss
    from trainer.packing import batch_cost, pair_cost, pair_logps

    variant, _, token_budget = variant.partition("@")
    layout, _, budget = variant.partition(":")
    max_tokens = int(budget or 0)
    prompts, chosen, rejected = pairs_of(args)
    model = model_of(args)
    n = len(prompts)
    ref = torch.zeros(n, dtype=torch.float64)
    bins = micro_batches(prompts, chosen, rejected, layout, int(token_budget or 0))
    costs = pair_cost(*([len(x) for x in xs] for xs in (prompts, chosen, rejected)), layout)

    def pick(xs, b):
        return [xs[i] for i in b]
    if mode == "train":
        model.train()
        module = TokenLogps(model)
    else:
        model.eval().requires_grad_(False)
        module = model
    times, base, values = [], 0.0, None
    for step in range(args.steps):
        if step == 1:
            base = reset_peak()
        t0 = time.perf_counter()
        logps = torch.zeros(2, n, dtype=torch.float64)
        for b in bins:  # one micro-batch without a token budget
            sub = [pick(xs, b) for xs in (prompts, chosen, rejected)]
            if mode == "train":
                c, r, _ = pair_logps(module, *sub, layout=layout, max_tokens=max_tokens)
                losses, _, _ = dpo_loss(c, r, ref[b], ref[b], beta=0.1, loss_type="sigmoid",
                                        label_smoothing=0.0)
                (losses.mean() * (len(b) / n)).backward()  # as accumulate_gradients weighs
            else:
                with torch.inference_mode():
                    c, r, _ = pair_logps(module, *sub, layout=layout, max_tokens=max_tokens)
            logps[0, b], logps[1, b] = c.detach(), r.detach()
        if mode == "train":
            model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        values = logps.flatten().tolist()
    step_s = statistics.median(times[1:])
    pair_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                      zip(prompts, chosen, rejected, strict=True))
    return {"step_s": step_s, "tokens_per_s": pair_tokens / step_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_peak_mb": _rss_mb("VmHWM") - base, "micro_batches": len(bins),
            "max_micro_batch_cost": max(batch_cost(costs[b], layout) for b in bins),
            **counts(prompts, chosen, rejected, layout, max_tokens, bins), "logps": values}


def run_attention(args) -> dict:
    """The attention op alone on the shared-prompt layout's mask of this run's pairs (the
    largest budget's rows), (R, heads, T, 64) float32."""
    import torch
    import torch.nn.functional as F

    from trainer.packing import attention_mask, layout_pairs

    prompts, chosen, rejected = pairs_of(args)
    t = layout_pairs(prompts, chosen, rejected, layout="shared_prompt")
    seg, branch = t["segment_ids"], t["branch_ids"]
    boolean = attention_mask(seg, branch, "sdpa")
    additive = attention_mask(seg, branch, "eager")
    rows, width = seg.shape
    heads = args.hidden // 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, heads, width, 64, generator=g) for _ in range(3))

    def eager(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 8 + additive, -1) @ v

    impls = {"sdpa_bool": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, boolean),
             "sdpa_float": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, additive),
             "eager": eager}
    try:
        from torch.nn.attention.flex_attention import flex_attention

        t0 = time.perf_counter()
        block = attention_mask(seg, branch, "flex_attention")
        compiled = torch.compile(flex_attention)
        impls["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=block)
        out = {"flex_block_mask_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 -- reported, not hidden
        out = {"flex_block_mask": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    out["shape"] = [rows, heads, width, 64]

    def clock(fn, backward: bool) -> float:
        ts = []
        for _ in range(args.steps):
            qq, kk, vv = (x.clone().requires_grad_(backward) for x in (q, k, v))
            t0 = time.perf_counter()
            if backward:
                fn(qq, kk, vv).sum().backward()
            else:
                with torch.inference_mode():
                    fn(qq, kk, vv)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    want = impls["sdpa_bool"](q, k, v)
    for name, fn in impls.items():
        for backward in (True, False):
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}_s"
            try:
                out[key] = clock(fn, backward)
            except Exception as e:  # noqa: BLE001 -- flex has no CPU backward: reported
                out[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        with torch.no_grad():
            out[f"{name}_max_diff"] = float((fn(q, k, v) - want).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", default="64,512", help="prompt tokens: lo,hi (log-uniform)")
    ap.add_argument("--completion", default="32,256", help="completion tokens: lo,hi")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="padded,packed,shared_prompt,attention")
    ap.add_argument("--modes", default="train,reference")
    ap.add_argument("--max-tokens-per-batch", type=int, default=0,
                    help="also run every layout variant as NAME@N: micro-batches of at most N "
                         "positions (0: none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # variant/mode of a child process
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2: the first is a warm-up")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        variant, _, mode = args.child.partition("/")
        result = run_attention(args) if variant == "attention" else run_variant(
            args, variant, mode)
        print("RESULT " + json.dumps(result))
        return
    prompts, chosen, rejected = pairs_of(args)
    p, c, r = ([len(x) for x in xs] for xs in (prompts, chosen, rejected))
    print(json.dumps({"prompt_lengths": p, "chosen_lengths": c, "rejected_lengths": r,
                      "pair_tokens": sum(2 * a + b + d for a, b, d in zip(p, c, r,
                                                                          strict=True))}))
    results: dict = {}
    t_start = time.perf_counter()
    variants = args.variants.split(",")
    if args.max_tokens_per_batch:
        variants += [f"{v}@{args.max_tokens_per_batch}" for v in variants
                     if v != "attention" and "@" not in v]
    for variant in variants:
        for mode in (["-"] if variant == "attention" else args.modes.split(",")):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", f"{variant}/{mode}"],
                check=True, capture_output=True, text=True).stdout
            results[(variant, mode)] = res = json.loads(
                out.split("RESULT ", 1)[1].splitlines()[0])
            shown = {k: v for k, v in res.items() if k != "logps"}
            print(f"{variant} {mode} {json.dumps(shown)}", flush=True)
    summary: dict = {"wall_s": time.perf_counter() - t_start}
    base = {m: results.get(("padded", m)) for m in args.modes.split(",")}
    for (variant, mode), res in results.items():
        if variant in ("padded", "attention") or base.get(mode) is None:
            continue
        b = base[mode]
        diff = max(abs(x - y) for x, y in zip(res["logps"], b["logps"], strict=True))
        summary[f"{variant} {mode}"] = row = {
            "tokens_per_s_over_padded": res["tokens_per_s"] / b["tokens_per_s"],
            "step_peak_mb_over_padded": res["step_peak_mb"] / max(b["step_peak_mb"], 1e-9),
            "peak_rss_mb_over_padded": res["peak_rss_mb"] / b["peak_rss_mb"],
            "positions_over_padded": res["positions"] / b["positions"],
            "real_tokens_over_padded": res["real_tokens"] / b["real_tokens"],
            "max_abs_logps_diff_vs_padded": diff,
        }
        whole = results.get((variant.partition("@")[0], mode))
        if "@" in variant and whole is not None:  # the same layout in one micro-batch
            row.update({
                "micro_batches": res["micro_batches"],
                "tokens_per_s_over_one_micro_batch": res["tokens_per_s"] / whole["tokens_per_s"],
                "step_peak_mb_over_one_micro_batch":
                    res["step_peak_mb"] / max(whole["step_peak_mb"], 1e-9),
                "peak_rss_mb_over_one_micro_batch": res["peak_rss_mb"] / whole["peak_rss_mb"],
            })
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
