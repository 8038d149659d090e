"""One GPU: the trainer's DPO step without Ray on a 0.5B-shaped random model, lean vs full.

What only a GPU can show: bf16 step time, tokens/s, MFU and peak memory of the trainer's own step
functions (`trainer.loop.dpo_step_loss`, `optimizer_step`), and that a one-worker NCCL process
group initialises and all-reduces. The machine needs torch (CUDA), transformers and pyarrow; no
Ray, no vLLM, nothing downloaded (the model is Qwen2.5-0.5B's shape with random weights).

    python bench/bench_gpu.py [--pairs 8 --prompt 512 --completion 256 --steps 6]

MFU = 6 · N · T FLOPs a step (N parameters, T tokens the step trains on: chosen and rejected
sequences, prompts included) over the step time and the GPU's dense bf16 peak (`--peak-tflops`,
default: H100/H200 SXM's 989). Each variant runs in its own process (peak memory from
`torch.cuda.max_memory_allocated`). `--device cpu` with a narrow `--hidden`/`--layers` checks the
script on a machine without a GPU.

`--layouts` (default shared_prompt,packed) also runs the lean step in those layouts (issue 19's
bf16 comparison; every layout's tokens/s counts each prompt twice, so the ratios compare), with
the model's default attention (sdpa: the layouts' 4D masks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN_05B = {"vocab_size": 151_936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 4096}


def nccl_check() -> dict:
    """A one-worker NCCL process group: init, all-reduce, destroy."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    t0 = time.perf_counter()
    dist.init_process_group("nccl", rank=0, world_size=1)
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    ok = bool((x == 1).all())
    dist.destroy_process_group()
    return {"nccl_ok": ok, "nccl_s": time.perf_counter() - t0}


def run_variant(args, lean: bool, layout: str = "padded") -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.logps import TokenLogps
    from trainer.loop import dpo_step_loss, optimizer_step

    device = torch.device(args.device)
    shape = dict(QWEN_05B)
    if args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                     num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=1)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0)).to(device)  # float32 master weights
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, shape["vocab_size"], (n,), generator=g).tolist()

    batch = {"prompt_input_ids": [ids(args.prompt) for _ in range(args.pairs)],
             "chosen_input_ids": [ids(args.completion) for _ in range(args.pairs)],
             "rejected_input_ids": [ids(args.completion) for _ in range(args.pairs)],
             "ref_chosen_logps": [0.0] * args.pairs, "ref_rejected_logps": [0.0] * args.pairs}
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 0.0,
           "dtype": args.dtype, "layout": layout}
    policy = TokenLogps(model, lean=lean)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps):
        if step == 1 and device.type == "cuda":  # after the warm-up (and AdamW's state)
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss, _ = dpo_step_loss(policy, batch, 0, cfg)
        loss.backward()
        optimizer_step(model, optimizer, scheduler, 1.0)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    tokens = 2 * args.pairs * (args.prompt + args.completion)
    result = {"params_m": n_params / 1e6, "layout": layout, "attention":
              model.config._attn_implementation, "tokens_per_step": tokens, "step_s": step_s,
              "tokens_per_s": tokens / step_s,
              "mfu": 6 * n_params * tokens / step_s / (args.peak_tflops * 1e12)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=0, help="narrower than 0.5B's 896 (CPU check)")
    ap.add_argument("--layers", type=int, default=0, help="fewer than 0.5B's 24 (CPU check)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--layouts", default="shared_prompt,packed",
                    help="lean layouts beside lean padded (issue 19, in bf16); '' skips")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2: the first is a warm-up")
    if args.variant:
        name, _, layout = args.variant.partition(":")
        result = nccl_check() if name == "nccl" else run_variant(
            args, lean=name == "lean", layout=layout or "padded")
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    layouts = [x for x in args.layouts.split(",") if x]
    variants = ["full", "lean", *(f"lean:{x}" for x in layouts)] + (
        ["nccl"] if args.device == "cuda" else [])
    for variant in variants:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                              capture_output=True, text=True)
        if "RESULT " not in proc.stdout:
            results[variant] = {"error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            results[variant] = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(variant, json.dumps(results[variant]), flush=True)
    full, lean = results["full"], results["lean"]
    if "step_s" in full and "step_s" in lean:
        summary = {"lean_over_full_step_time": lean["step_s"] / full["step_s"]}
        if "peak_gib" in full:
            summary["full_over_lean_peak_memory"] = full["peak_gib"] / lean["peak_gib"]
        for x in layouts:  # tokens/s counts each prompt twice in every layout: comparable
            r = results[f"lean:{x}"]
            if "step_s" in r:
                summary[f"{x}_over_padded_tokens_per_s"] = lean["step_s"] / r["step_s"]
                if "peak_gib" in r:
                    summary[f"{x}_peak_gib"] = r["peak_gib"]
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
