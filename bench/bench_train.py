"""Cached vs live ref_logps in `odpo train`, side by side in one run.

Same shards, same settings, same model; the only difference is where the reference log-probs
come from. Reports peak resident memory of the training worker and step time, as ratios, plus
tokens/s. The model is a ~100M-parameter random Llama so that weights dominate memory.

    python bench/bench_train.py --work /tmp/bench_train [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ODPO = [sys.executable, "-m", "jobs.cli"]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def write_addition_pairs(prompts: Path, out: Path) -> None:
    """A pairs stage of (correct, off-by-one) answers: the shape `odpo pair` writes."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import write_stage

    rows = pq.read_table(prompts).to_pylist()
    table = pa.Table.from_pylist([
        {"prompt_id": hashlib.sha256(r["prompt"].encode()).hexdigest()[:16],
         "prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) + 1),
         "chosen_score": 1.0, "rejected_score": 0.0, "round": 0}
        for r in rows
    ])
    write_stage(out, "pair", {"bench": True}, {}, lambda d: pq.write_table(
        table, d / "part-00000.parquet"), rows_in=len(rows), dropped={})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_train")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--num-layers", type=int, default=14)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    model = work / "model"
    if not model.exists():
        run([*ODPO, "toy", "init", "--out", str(model), "--hidden-size", str(args.hidden_size),
             "--num-layers", str(args.num_layers), "--num-heads", str(args.hidden_size // 64),
             "--intermediate-size", str(args.hidden_size * 8 // 3 // 64 * 64)])
    weight_bytes = (model / "model.safetensors").stat().st_size
    data = work / "data"
    if not data.exists():
        run([*ODPO, "toy", "data", "--out", str(data), "--sft-rows", "128", "--prompts",
             str(args.batch_size * args.steps), "--heldout", "16"])
    pairs = work / "pairs"
    if not pairs.exists():
        write_addition_pairs(data / "prompts.parquet", pairs)
    ref = work / "precompute"
    ref_s = run([*ODPO, "precompute", "--pairs", str(pairs), "--model", str(model), "--out",
                 str(ref)])

    results = {}
    for mode in ("cached", "live"):
        out = work / f"train_{mode}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall = run([*ODPO, "train", "--model", str(model), "--data", str(ref), "--out", str(out),
                    "--beta", "0.1", "--batch-size", str(args.batch_size), "--max-steps",
                    str(args.steps), "--log-every", "1", "--ref-logps", mode,
                    "--cpus-per-worker", "1", "--torch-threads", "2"])
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steady = sorted(m["step_time_s"] for m in lines[1:])  # step 0 includes warm-up
        results[mode] = {
            "peak_rss_mb": max(m["peak_rss_mb"] for m in lines),
            # medians: robust to a step slowed by another process on a shared machine
            "step_time_s": steady[len(steady) // 2],
            "tokens_per_s": sorted(m["tokens_per_s"] for m in lines[1:])[len(steady) // 2],
            "wall_s": wall,
        }
    c, live = results["cached"], results["live"]
    saved_mb = live["peak_rss_mb"] - c["peak_rss_mb"]
    summary = {
        "params_m": weight_bytes / 4 / 1e6,
        "weight_mb": weight_bytes / 2**20,
        "precompute_s": ref_s,
        **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()},
        "memory_saved_mb": saved_mb,
        "memory_saved_over_weights": saved_mb / (weight_bytes / 2**20),
        "step_time_ratio_cached_over_live": c["step_time_s"] / live["step_time_s"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
