"""One GPU: the trainer's own DPO step without Ray, on random models of real models' shapes.

What only a GPU can show, each variant in its own process (peak memory from
`torch.cuda.max_memory_allocated` over the timed steps), all through the functions `odpo train`
runs (`trainer.loop.wrap_policy`, `dpo_step_loss`, `make_optimizer`, `optimizer_step`;
`trainer.lora.add_lora`) with `dtype: bfloat16` (float32 master weights, bf16 autocast):

- `full`, `lean`, `lean:shared_prompt`, `lean:packed`: Qwen2.5-0.5B's shape, every weight
  trained; the full (B, T, V) logits against the lean head, and the lean step in each layout.
- `fsdp`: the same lean step under `strategy: fsdp` on a one-worker NCCL process group (after
  an all-reduce check), as a one-GPU Ray Train worker runs it.
- `lora8b`, `lora8b:full`: Llama-3-8B's shape, the frozen base in bf16 with LoRA adapters
  (r 16, all linear layers), gradient checkpointing: lean head (layout auto) vs full logits
  (padded).
- `drift`: the pairs' summed log-probs of the 0.5B model with bf16 weights (what
  `odpo precompute --dtype bfloat16` stores) against float32 weights.
- `head`: the LM head alone (0.5B's: 151,936 x 896, float32 weight) under bf16 autocast, on
  float32 hidden states as the body's float32 norm hands them over (`--head-hidden bfloat16`:
  already bf16), forward and backward of `trainer.logps.label_logps` against the full logits:
  time, and each one's error against float64.

`--profile` adds the training variants' top CUDA kernels (torch.profiler, two more steps).

The machine needs torch (CUDA), transformers, peft and pyarrow; no Ray, no vLLM, nothing
downloaded (random weights). Pair lengths are drawn (seeded) log-uniform in [P/8, P] for prompts
and [C/8, C] for each completion, so that padding exists as it does in real data.

    python bench/bench_gpu.py [--pairs 8 --prompt 512 --completion 256 --steps 6] [--json F]

MFU = 6·N·T FLOPs a step (4·N·T under LoRA: frozen weights get no weight gradient) over the step
time and the GPU's dense bf16 peak (`--peak-tflops`, default: H100/H200 SXM's 989), N the
parameters, T the real tokens the layout computes (padded and packed: Σ 2P + C + R;
shared_prompt: Σ P + C + R; padding not counted, so it lowers MFU). tokens/s counts Σ 2P + C + R
in every layout, so it compares across them. `--device cpu --hidden 64 --layers 2` checks the
script on a machine without a GPU.
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
LLAMA3_8B = {"vocab_size": 128_256, "hidden_size": 4096, "intermediate_size": 14_336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "tie_word_embeddings": False, "max_position_embeddings": 8192,
             "rope_theta": 500_000.0}
VARIANTS = ["full", "lean", "lean:shared_prompt", "lean:packed", "fsdp", "lora8b", "lora8b:full",
            "drift", "head"]


def shape_of(args, base: dict) -> dict:
    """`base` narrowed by `--hidden` / `--layers` (the CPU check)."""
    shape = dict(base)
    if args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                     num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=1)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return shape


def random_model(shape: dict, device, dtype):
    """A Llama of `shape` with random weights, built on `device` in `dtype`, dropout off."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.checkpoint import disable_dropout

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0))
    finally:
        torch.set_default_dtype(default)
    disable_dropout(model)
    return model


def random_pairs(args, vocab_size: int, n: int) -> dict:
    """`n` pairs of random token ids, lengths log-uniform in [x/8, x] (seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def lengths(top: int):
        return np.exp(rng.uniform(np.log(max(1, top // 8)), np.log(top), n)).astype(int)

    def ids(k: int):
        return rng.integers(3, vocab_size, k).tolist()

    p, c, r = lengths(args.prompt), lengths(args.completion), lengths(args.completion)
    return {"prompt_input_ids": [ids(k) for k in p], "chosen_input_ids": [ids(k) for k in c],
            "rejected_input_ids": [ids(k) for k in r],
            "ref_chosen_logps": [0.0] * n, "ref_rejected_logps": [0.0] * n}


def nccl_check() -> dict:
    """A one-worker NCCL process group (gloo on a CPU): init and an all-reduce."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    x = torch.ones(1 << 20, device="cuda" if cuda else "cpu")
    dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    return {"backend": dist.get_backend(), "all_reduce_ok": bool((x == 1).all()),
            "init_and_all_reduce_s": time.perf_counter() - t0}


def train_step(model, batch: dict, cfg: dict, optimizer, scheduler) -> float:
    """One optimizer step of the trainer's own functions; its loss."""
    from trainer.loop import dpo_step_loss, optimizer_step

    loss, _ = dpo_step_loss(model, batch, 0, cfg)
    loss.backward()
    optimizer_step(model, optimizer, scheduler, 1.0)
    return loss.item()


def time_steps(args, model, batch: dict, cfg: dict, device) -> dict:
    """Median step time (the first step is a warm-up) and peak memory of the steps after it."""
    import torch

    from trainer.loop import make_optimizer

    optimizer, scheduler = make_optimizer(model, {"lr": 1e-6, "weight_decay": 0.0,
                                                  "warmup_steps": 0, "total_steps": args.steps,
                                                  "lr_schedule": "constant"})
    cuda = device.type == "cuda"
    times, losses = [], []
    for step in range(args.steps):
        if step == 1 and cuda:  # after the warm-up (and AdamW's state)
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(model, batch, cfg, optimizer, scheduler))  # .item() syncs
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times[1:]), "losses": losses}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile and cuda:
        out["profile"] = profile_steps(model, batch, cfg, optimizer, scheduler)
    return out


def profile_steps(model, batch: dict, cfg: dict, optimizer, scheduler, top: int = 25) -> list:
    """[op, self CUDA ms a step, calls a step] of the `top` ops by self CUDA time, two steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            train_step(model, batch, cfg, optimizer, scheduler)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    return [[e.key, e.self_device_time_total / 2e3, e.count / 2] for e in rows[:top]]


def run_train(args, variant: str) -> dict:
    """One timed training variant (module docstring)."""
    import numpy as np
    import torch

    from trainer import lora, packing
    from trainer.loop import resolve_layout, wrap_policy

    name, _, layout = variant.partition(":")
    device = torch.device(args.device)
    big = name == "lora8b"
    lean = "full" not in (name, layout)
    layout = "padded" if layout in ("", "full") else layout
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 0.0,
           "dtype": "bfloat16", "strategy": "fsdp" if name == "fsdp" else "ddp",
           "layout": "auto" if big and lean else layout}
    extra = nccl_check() if name == "fsdp" else {}
    shape = shape_of(args, LLAMA3_8B if big else QWEN_05B)
    # trained weights float32 (the master copy); a LoRA base in bf16, as `load_policy` loads them
    model = random_model(shape, device, torch.bfloat16 if big else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if big:
        model = lora.add_lora(model, {"r": 16, "alpha": 32.0, "dropout": 0.0,
                                      "target_modules": "all-linear"})
        model.gradient_checkpointing_enable()
    model.train()
    wrapped = wrap_policy(model, cfg, device, world=1)
    wrapped.lean = lean
    cfg["layout"] = resolve_layout(cfg["layout"], wrapped)
    batch = random_pairs(args, shape["vocab_size"], args.pairs)
    p, c, r = (np.array([len(x) for x in batch[k]]) for k in
               ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    timed = time_steps(args, wrapped, batch, cfg, device)
    computed = int(packing.pair_tokens(p, c, r, cfg["layout"]).sum())
    pair_tokens = int(packing.pair_tokens(p, c, r, "padded").sum())
    flops = (4 if big else 6) * n_params * computed
    result = {"params_m": n_params / 1e6, "layout": cfg["layout"], "lean": lean,
              "attention": model.config._attn_implementation, "pair_tokens": pair_tokens,
              "tokens_computed": computed, "tokens_per_s": pair_tokens / timed["step_s"],
              "mfu": flops / timed["step_s"] / (args.peak_tflops * 1e12), **timed, **extra}
    if big:
        result["trainable_m"] = sum(
            x.numel() for x in model.parameters() if x.requires_grad) / 1e6
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return result


def run_drift(args) -> dict:
    """bf16 weights against float32 weights: the pairs' summed log-probs (float32 log-softmax
    in both), as the reference stage computes them."""
    import numpy as np
    import torch

    from trainer.loop import _pair_logps

    device = torch.device(args.device)
    shape = shape_of(args, QWEN_05B)
    model = random_model(shape, device, torch.float32).eval()
    batch = random_pairs(args, shape["vocab_size"], args.drift_pairs)
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        chosen, rejected = [], []
        with torch.inference_mode():
            for s in range(0, args.drift_pairs, args.pairs):
                part = {k: v[s:s + args.pairs] for k, v in batch.items()}
                c, r, _ = _pair_logps(model, part, 0)
                chosen.append(c.cpu().numpy())
                rejected.append(r.cpu().numpy())
        values[dtype] = np.concatenate(chosen), np.concatenate(rejected)
    (c32, r32), (c16, r16) = values[torch.float32], values[torch.bfloat16]
    drift = np.abs(np.concatenate([c16 - c32, r16 - r32]))
    return {"pairs": args.drift_pairs, "mean_logp": float(np.mean(np.concatenate([c32, r32]))),
            "max_abs": float(drift.max()), "mean_abs": float(drift.mean()),
            "mean_rel": float((drift / np.abs(np.concatenate([c32, r32]))).mean()),
            "margin_max_abs": float(np.abs((c16 - r16) - (c32 - r32)).max())}


def run_head(args) -> dict:
    """The lean head (`label_logps`) against the full logits under bf16 autocast, on hidden
    states of `--head-hidden` dtype and a float32 weight: forward + backward time (median of 5
    after a warm-up) and the relative error ||x - ref|| / ||ref|| of the log-probs and both
    gradients, ref in float64."""
    import torch

    from trainer.logps import label_logps

    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    vocab, width = QWEN_05B["vocab_size"], args.hidden or QWEN_05B["hidden_size"]
    n = args.head_rows
    hidden32 = torch.randn(n, width, device=device, generator=g)
    weight = (torch.randn(vocab, width, device=device, generator=g) * 0.05).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    upstream = torch.rand(n, device=device, generator=g)

    given = hidden32.to(getattr(torch, args.head_hidden))

    def lean():
        h = given.detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = label_logps(h, weight, labels)
        return out, h

    def full():
        h = given.detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(h, weight)
        out = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]
        return out, h

    def reference():
        h = given.double().requires_grad_()  # the same inputs
        w = weight.detach().double().requires_grad_()
        out = torch.log_softmax(h @ w.t(), -1).gather(1, labels[:, None])[:, 0]
        (out * upstream.double()).sum().backward()
        return out.detach(), h.grad, w.grad

    ref_out, ref_gh, ref_gw = reference()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"rows": n, "vocab": vocab, "width": width, "hidden": args.head_hidden}
    for name, fn in (("lean", lean), ("full", full)):
        times = []
        for _ in range(6):
            weight.grad = None
            sync()
            t0 = time.perf_counter()
            out, h = fn()
            (out * upstream).sum().backward()
            sync()
            times.append(time.perf_counter() - t0)

        def rel(x, ref):
            return float((x.double() - ref).norm() / ref.norm())

        result[name] = {"fwd_bwd_s": statistics.median(times[1:]), "logp_rel": rel(out, ref_out),
                        "grad_hidden_rel": rel(h.grad, ref_gh),
                        "grad_weight_rel": rel(weight.grad, ref_gw)}
    return result


def summary(results: dict) -> dict:
    """Ratios of variants measured side by side in this run."""
    out = {}

    def ratio(key, a, b, field):
        if field in results.get(a, {}) and field in results.get(b, {}):
            out[key] = results[a][field] / results[b][field]

    ratio("lean_over_full_step_time", "lean", "full", "step_s")
    ratio("full_over_lean_peak_memory", "full", "lean", "peak_gib")
    for layout in ("shared_prompt", "packed"):
        ratio(f"{layout}_over_padded_tokens_per_s", f"lean:{layout}", "lean", "tokens_per_s")
        ratio(f"padded_over_{layout}_peak_memory", "lean", f"lean:{layout}", "peak_gib")
    ratio("fsdp_over_plain_step_time", "fsdp", "lean", "step_s")
    ratio("lora8b_lean_over_full_step_time", "lora8b", "lora8b:full", "step_s")
    ratio("lora8b_full_over_lean_peak_memory", "lora8b:full", "lora8b", "peak_gib")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=8, help="pairs a step")
    ap.add_argument("--prompt", type=int, default=512, help="longest prompt (tokens)")
    ap.add_argument("--completion", type=int, default=256, help="longest completion (tokens)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--drift-pairs", type=int, default=64)
    ap.add_argument("--head-rows", type=int, default=8192, help="positions of the `head` check")
    ap.add_argument("--head-hidden", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the hidden states the `head` check hands the head")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of each step")
    ap.add_argument("--hidden", type=int, default=0, help="narrower models (CPU check)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (CPU check)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--json", help="write every variant's result and the ratios here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2: the first is a warm-up")
    if args.variant:
        run = {"drift": run_drift, "head": run_head}.get(args.variant)
        result = run(args) if run else run_train(args, args.variant)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            ap.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                              capture_output=True, text=True)
        if "RESULT " not in proc.stdout:
            results[variant] = {"error": (proc.stderr or proc.stdout)[-3000:]}
        else:
            results[variant] = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        results[variant]["wall_s"] = time.perf_counter() - t0
        print(variant, json.dumps(results[variant]), flush=True)
    ratios = summary(results)
    print(json.dumps(ratios, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
