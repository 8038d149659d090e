"""`odpo precompute` throughput against a bare batched forward, side by side in one run.

Same model, same pairs, same tokens, same threads. The bare forward is the floor of the work:
the model alone on the stage's own length-grouped batches (already padded tensors, no Ray, no
tokenization, no log-softmax, no I/O), timed before and after the stage to bracket machine noise.
The stage is timed end to end (`run_precompute` with Ray already up: tokenization, actor start
and model load, forward, log-probs, Parquet + manifest, cache store). Reports tokens/s (real,
non-padding tokens), the ratio stage / bare, the padding fraction of the stage's batches and of
naive batches in file order, the cache-hit time, and (optionally) the bf16-vs-fp32 drift.

The bare floor is always the padded layout's work (each prompt twice). With `--layout
shared_prompt` (or `auto` on sdpa) the stage computes each prompt once, so it computes fewer
tokens than the floor: compare `ratio_stage_over_bare`, time for time on the same pairs.

    python bench/bench_precompute.py --work /tmp/bench_precompute [--layout padded]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ODPO = [sys.executable, "-m", "jobs.cli"]


def write_pairs(out: Path, n: int, seed: int, max_chars: int, prompt_chars: tuple = (),
                completion_chars: tuple = ()) -> None:
    """A pairs stage of mixed-length texts (chains of sums), within the model's context: prompts
    of 10 to max_chars/3 characters and completions of 5 to max_chars/2 unless `prompt_chars` /
    `completion_chars` give the (low, high) range (one token a character)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import write_stage

    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int) -> str:
        s = ""
        target = int(rng.integers(lo, hi))
        while len(s) < target:
            a, b = rng.integers(0, 1000, 2)
            s += f"{a}+{b}={a + b}; "
        return s[:target]

    rows = []
    p_lo, p_hi = prompt_chars or (10, max_chars // 3)
    c_lo, c_hi = completion_chars or (5, max_chars // 2)
    for _ in range(n):
        prompt = text(p_lo, p_hi)
        rows.append({"prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                     "prompt": prompt, "chosen": text(c_lo, c_hi),
                     "rejected": text(c_lo, c_hi), "chosen_score": 1.0,
                     "rejected_score": 0.0, "round": 0})
    table = pa.Table.from_pylist(rows)
    write_stage(out, "pair", {"bench": True, "seed": seed}, {}, lambda d: pq.write_table(
        table, d / "part-00000.parquet"), rows_in=n, dropped={})


def sequences(model_dir: Path, pairs: Path, context: int) -> tuple[list, list]:
    """The stage's (prompt ids, completion ids) per sequence, by the stage's own tokenizer rule
    (`tokenize_pairs` with the stage's default truncation): chosen, rejected of each pair."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from trainer.precompute import tokenize_pairs

    t = pq.read_table(sorted(pairs.glob("*.parquet")))
    _, p, c, r, _, _ = tokenize_pairs(
        AutoTokenizer.from_pretrained(model_dir), t["prompt"].to_pylist(),
        t["chosen"].to_pylist(), t["rejected"].to_pylist(), max_length=context,
        max_prompt_length=context // 2, truncation="truncate")
    return [x for x in p for _ in range(2)], [x for pair in zip(c, r, strict=True) for x in pair]


def bare_forward(model_dir: Path, seq_p: list, seq_c: list, batch_size: int, threads: int) -> dict:
    """The model alone on the same tokens in the stage's length-grouped batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.collate import collate
    from trainer.precompute import length_batches

    torch.set_num_threads(threads)
    lengths = [len(p) + len(c) for p, c in zip(seq_p, seq_c, strict=True)]
    batches = [collate([seq_p[i] for i in b], [seq_c[i] for i in b], 0)
               for b in length_batches(lengths, batch_size)]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        model(input_ids=batches[-1]["input_ids"][:1])  # first-call warm-up, not timed
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        seconds = time.perf_counter() - t0
    return {"tokens": int(sum(lengths)), "seconds": seconds,
            "tokens_per_s": sum(lengths) / seconds}


def naive_padding(ref_dir: Path, batch_size: int) -> float:
    """Padding fraction of batches taken in file order (chosen, rejected of each pair)."""
    import pyarrow.parquet as pq

    from trainer.precompute import padding_fraction

    t = pq.read_table(sorted(ref_dir.glob("*.parquet")))
    p = [len(x) for x in t["prompt_input_ids"].to_pylist()]
    c = [len(x) for x in t["chosen_input_ids"].to_pylist()]
    r = [len(x) for x in t["rejected_input_ids"].to_pylist()]
    lengths = [n for i in range(len(p)) for n in (p[i] + c[i], p[i] + r[i])]
    batches = [np.arange(i, min(i + batch_size, len(lengths)))
               for i in range(0, len(lengths), batch_size)]
    return padding_fraction(lengths, batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_precompute")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, stage and bare alike")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layout", default="auto", choices=("auto", "padded", "shared_prompt"),
                    help="the stage's layout (PrecomputeConfig.layout)")
    ap.add_argument("--bf16-pairs", type=int, default=64, help="pairs for the bf16 drift; 0 skips")
    ap.add_argument("--prompt-chars", default="",
                    help="LOW,HIGH prompt length in characters (= tokens); default 10,context/3")
    ap.add_argument("--completion-chars", default="",
                    help="LOW,HIGH completion length; default 5,context/2")
    args = ap.parse_args()
    lengths = {k: tuple(int(x) for x in v.split(",")) if v else ()
               for k, v in (("prompt_chars", args.prompt_chars),
                            ("completion_chars", args.completion_chars))}
    if any(len(v) not in (0, 2) for v in lengths.values()):
        ap.error("--prompt-chars / --completion-chars take LOW,HIGH")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from pipeline.cluster import init_ray
    from trainer.precompute import PrecomputeConfig, run_precompute

    model = work / "model"
    if not model.exists():
        subprocess.run([*ODPO, "toy", "init", "--out", str(model), "--hidden-size",
                        str(args.hidden_size), "--num-layers", str(args.num_layers),
                        "--num-heads", str(args.hidden_size // 64), "--intermediate-size",
                        str(args.hidden_size * 11 // 4), "--max-position-embeddings",
                        str(args.context)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    shape = "".join(f"-{v[0]}-{v[1]}" for v in lengths.values() if v)
    pairs = work / f"pairs-{args.pairs}{shape}"
    if not pairs.exists():
        write_pairs(pairs, args.pairs, seed=0, max_chars=args.context, **lengths)

    t0 = time.perf_counter()
    init_ray()
    ray_start_s = time.perf_counter() - t0
    cfg = PrecomputeConfig(pairs=str(pairs), model=str(model), out=str(work / "precompute"),
                           batch_size=args.batch_size, torch_threads=args.threads,
                           cache="recompute", cache_dir=str(work / "cache"), layout=args.layout)
    seq_p, seq_c = sequences(model, pairs, args.context)
    bare_before = bare_forward(model, seq_p, seq_c, args.batch_size, args.threads)
    t0 = time.perf_counter()
    stage = run_precompute(cfg)
    stage_s = time.perf_counter() - t0
    bare_after = bare_forward(model, seq_p, seq_c, args.batch_size, args.threads)
    prompt_tokens = sum(len(x) for x in seq_p[0::2])
    once = stage["stats"]["layout"] == "shared_prompt"  # each prompt computed once
    assert stage["stats"]["tokens"] == bare_after["tokens"] - once * prompt_tokens  # same pairs
    t0 = time.perf_counter()
    hit = run_precompute(dataclasses.replace(cfg, cache="auto",
                                             out=str(work / "precompute-sweep")))
    hit_s = time.perf_counter() - t0
    assert hit["cache"] == "hit"

    tokens = stage["stats"]["tokens"]
    bare_s = (bare_before["seconds"] + bare_after["seconds"]) / 2
    summary = {
        "params_m": (model / "model.safetensors").stat().st_size / 4 / 1e6,
        "pairs": stage["pairs"],
        "prompt_tokens_mean": prompt_tokens / stage["pairs"],
        "completion_tokens_mean": sum(len(x) for x in seq_c) / len(seq_c),
        "sequences": stage["stats"]["sequences"],
        "layout": stage["stats"]["layout"],
        "tokens": tokens,
        "bare_tokens": bare_after["tokens"],
        "batch_size": args.batch_size,
        "threads": args.threads,
        "ray_start_s": ray_start_s,
        "stage_s": stage_s,
        "stage_tokens_per_s": tokens / stage_s,
        "stage_forward_only_tokens_per_s": stage["stats"]["tokens_per_s"],
        "stage_forward_only_pairs_per_s": stage["stats"]["pairs_per_s"],
        "bare_tokens_per_s_before": bare_before["tokens_per_s"],
        "bare_tokens_per_s_after": bare_after["tokens_per_s"],
        # Time for time on the same pairs (= the tokens/s ratio when both compute the same).
        "ratio_stage_over_bare": bare_s / stage_s,
        # Conservative: against the faster bare pass (the machine may be shared).
        "ratio_stage_over_best_bare": min(bare_before["seconds"], bare_after["seconds"])
        / stage_s,
        "padding_fraction_stage": stage["stats"]["padding_fraction"],
        "padding_fraction_file_order": naive_padding(work / "precompute", args.batch_size),
        "cache_hit_s": hit_s,
    }
    if args.bf16_pairs:
        import pyarrow.parquet as pq

        small = work / f"pairs-{args.bf16_pairs}"
        if not small.exists():
            write_pairs(small, args.bf16_pairs, seed=1, max_chars=args.context)
        vals = {}
        for dtype in ("float32", "bfloat16"):
            out = work / f"drift-{dtype}"
            run_precompute(PrecomputeConfig(pairs=str(small), model=str(model), out=str(out),
                                            dtype=dtype, batch_size=args.batch_size,
                                            torch_threads=args.threads, cache_dir=""))
            t = pq.read_table(sorted(out.glob("*.parquet")))
            vals[dtype] = (t["ref_chosen_logps"].to_numpy(), t["ref_rejected_logps"].to_numpy())
        (c32, r32), (c16, r16) = vals["float32"], vals["bfloat16"]
        drift = np.abs(np.concatenate([c16 - c32, r16 - r32]))
        rel = drift / np.abs(np.concatenate([c32, r32]))
        summary.update({
            "bf16_drift_max_abs": float(drift.max()),
            "bf16_drift_mean_abs": float(drift.mean()),
            "bf16_drift_mean_rel": float(rel.mean()),
            "bf16_margin_drift_max_abs": float(np.abs((c16 - r16) - (c32 - r32)).max()),
        })
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
