"""This trainer's DPO step by layout against TRL 1.16's `DPOTrainer`: same model, pairs, cached
reference log-probs (issue 19).

For each pair shape: one seeded random Llama saved once (`save_pretrained` into `--work`, with the
toy character tokenizer: one token a character, so TRL tokenizes the pairs' texts into the very
ids this trainer reads), the pairs (random printable text), and their reference log-probs,
computed once by this trainer's own function (`trainer.packing.pair_logps`, as `odpo precompute`
does) and read as a cache by every variant. Each variant runs in its own process, loads the saved
model (float32, SDPA attention) and trains `steps` optimizer steps of `batch` pairs, step k on
pairs k·batch onwards (the same pairs in every variant):

- `padded`, `packed`, `shared_prompt`: this trainer's step, `trainer.loop.dpo_step_loss` with
  that layout (lean `TokenLogps`), backward, `optimizer_step` (clip 1.0, AdamW of
  `make_optimizer`: betas 0.9/0.95, no weight decay, constant lr); no Ray;
- `trl`: TRL's `DPOTrainer` with `precompute_ref_log_probs=True` reading the same cached values
  (its reference pass skipped: `bench_logps.trl_train`), sequential order, the same AdamW
  settings and clipping, gradient checkpointing off as in this trainer;
- `trl_compact`: `trl` with its fused LM head on the completion positions only, as TRL runs it
  on a GPU (on a CPU it projects every position, prompt and padding included);
- `trl_ckpt`: `trl` with TRL's default gradient checkpointing on.

`--variants` run in every round, a shape's `extra` ones (b: `trl_compact`) in the first only.
`--cli a` also runs the real commands on shape a, end to end: `odpo precompute` on its first
`--cli-steps` x batch pairs, then `odpo train` (Ray Train) with layouts auto and padded, and reads
the median step time of steps 2.. from metrics.jsonl (the issue's own measure).

Reported per variant: the median step time over the steps after the first (the warm-up, which
also allocates AdamW's state); training tokens/s, the median over those steps of Σ (2P + C + R)
over the step's pairs / the step's time (the positions two unpadded sequences a pair need: the
trainer's `num_tokens`, counted the same way for every variant whatever it computes); the step
peak (Linux VmHWM over the memory after the first step, as bench_logps.py); the losses of steps
0-2, which must agree across variants to `--tol` (step 0 to ln 2: the cache holds the model's own
log-probs). Then each variant's tokens/s over padded's and over TRL's, and the gain split into
padding removed (padded -> packed) and the prompt computed once (packed -> shared_prompt), beside
the positions each layout computes (rows x width). `--rounds 2` runs the variants interleaved
(A B C D A B C D) to show the noise of a shared machine.

    python bench/bench_trl_compare.py --work /tmp/bench_trl_compare [--shapes a,b --rounds 2 \\
        --variants padded,packed,shared_prompt,trl --set a.steps=6 b.hidden=384 --cli a]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (a) the issue's: 96 pairs, prompts ~192 tokens and completions ~96, each ±50% (uniform), the
# toy model of the measurement (`odpo toy init`: width 512, 8 layers, the character
# vocabulary); (b) shaped like real preference data: prompts 256-1,024 tokens, completions
# 64-512 (log-uniform), a 32k vocabulary and a smaller body, fewer pairs.
# `extra`: variants run in the first round only.
SHAPES = {
    "a": {"pairs": 96, "prompt": "96,288", "completion": "48,144", "draw": "uniform",
          "vocab": 0, "hidden": 512, "layers": 8, "intermediate": 1408, "steps": 4,
          "extra": ""},
    "b": {"pairs": 32, "prompt": "256,1024", "completion": "64,512", "draw": "loguniform",
          "vocab": 32_000, "hidden": 256, "layers": 4, "intermediate": 704, "steps": 4,
          "extra": "trl_compact"},
    # (g) for a GPU (`--device cuda --dtype bfloat16`): b's pairs on a 0.6B Llama of
    # Qwen2.5-0.5B's width, depth and vocabulary (untied head, 14 KV heads)
    "g": {"pairs": 48, "prompt": "256,1024", "completion": "64,512", "draw": "loguniform",
          "vocab": 151_936, "hidden": 896, "layers": 24, "intermediate": 4864, "steps": 6,
          "extra": ""},
}
# what the model, the pairs and their reference values depend on (work/spec.json)
DATA_KEYS = ("pairs", "prompt", "completion", "draw", "vocab", "hidden", "layers",
             "intermediate", "batch", "seed")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-"  # no '<': never a special token
LAYOUTS = ("padded", "packed", "shared_prompt")


def shape_spec(name: str, overrides: list[str], args) -> dict:
    """SHAPES[name] with the `--set name.key=value` overrides, the run's batch, lr and seed."""
    spec = dict(SHAPES[name])
    for item in overrides:
        key, _, value = item.partition("=")
        shape, _, field = key.partition(".")
        if shape == name:
            if field not in spec:
                raise SystemExit(f"--set {item}: shape {name} has no {field!r}")
            spec[field] = type(spec[field])(value)
    spec.update(batch=args.batch, lr=args.lr, seed=args.seed, device=args.device,
                dtype=args.dtype)
    if spec["pairs"] < spec["steps"] * spec["batch"]:
        raise SystemExit(f"shape {name}: {spec['pairs']} pairs < {spec['steps']} steps x "
                         f"{spec['batch']}")
    return spec


def draw_length(rng: random.Random, lo_hi: str, draw: str) -> int:
    lo, hi = (int(x) for x in lo_hi.split(","))
    if draw == "uniform":
        return rng.randint(lo, hi)
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def pair_texts(spec: dict) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts; lengths in tokens count BOS (prompt), EOS (completion)."""
    rng = random.Random(spec["seed"])

    def text(n: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(max(n - 1, 1)))

    return [tuple(text(draw_length(rng, spec[k], spec["draw"])) for k in
                  ("prompt", "completion", "completion")) for _ in range(spec["pairs"])]


def prepare(spec: dict, work: Path) -> None:
    """Save the model and tokenizer to work/model and the pairs with their cached reference
    log-probs to work/pairs.json (skipped when work/spec.json holds this spec)."""
    spec_file = work / "spec.json"
    key = {k: spec[k] for k in DATA_KEYS}
    if spec_file.exists() and json.loads(spec_file.read_text()) == key:
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.toy import build_tokenizer
    from trainer.packing import pair_logps

    tok = build_tokenizer()
    torch.manual_seed(0)
    with torch.device(spec["device"]):  # built where it runs: a 0.6B init is slow on a CPU
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=max(spec["vocab"], len(tok)), hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["hidden"] // 64, num_key_value_heads=spec["hidden"] // 64,
            max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False, attn_implementation="sdpa"))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    texts = pair_texts(spec)
    data: dict = {"texts": texts, "prompt_input_ids": [tok(p)["input_ids"] for p, _, _ in texts]}
    for i, name in ((1, "chosen"), (2, "rejected")):
        data[f"{name}_input_ids"] = [tok(t[i], add_special_tokens=False)["input_ids"]
                                     + [tok.eos_token_id] for t in texts]
    ref: dict = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), spec["batch"]):
            part = [data[f"{k}_input_ids"][start:start + spec["batch"]]
                    for k in ("prompt", "chosen", "rejected")]
            c, r, _ = pair_logps(model, *part, layout="shared_prompt",
                                 pad_token_id=tok.pad_token_id)
            ref["ref_chosen_logps"] += c.tolist()
            ref["ref_rejected_logps"] += r.tolist()
    (work / "pairs.json").write_text(json.dumps({**data, **ref}))
    spec_file.write_text(json.dumps(key))


def load(work: Path, device: str = "cpu"):
    """(model, tokenizer, pairs) as every variant reads them, the model float32 on `device`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "model", dtype="float32",
                                             attn_implementation="sdpa").to(device)
    tok = AutoTokenizer.from_pretrained(work / "model")
    return model, tok, json.loads((work / "pairs.json").read_text())


def memory_marks(device: str):
    """(reset, peak, sync) for a variant's step memory in MB: on a GPU the allocator's peak
    over what is allocated after the warm-up step (`torch.cuda`), on a CPU the process's
    resident memory (bench_logps); `sync` waits for the device's queued work."""
    if device == "cpu":
        from bench_logps import peak_mb, reset_peak

        return reset_peak, peak_mb, lambda: None
    import torch

    def reset() -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20

    return reset, lambda: torch.cuda.max_memory_allocated() / 2**20, torch.cuda.synchronize


def step_rows(pairs: dict, step: int, batch: int) -> dict:
    """The columns of step `step`'s pairs (pairs step·batch onwards)."""
    return {k: v[step * batch:(step + 1) * batch] for k, v in pairs.items()}


def lengths(rows: dict) -> list[list[int]]:
    """The rows' prompt, chosen and rejected lengths in tokens."""
    return [[len(x) for x in rows[f"{k}_input_ids"]] for k in ("prompt", "chosen", "rejected")]


def pair_tokens(rows: dict) -> int:
    """Σ (2P + C + R) over the rows (`packing.pair_tokens` in padded): the trainer's
    `num_tokens`, the same for every variant."""
    from trainer import packing

    return int(packing.pair_tokens(*lengths(rows), "padded").sum())


def run_layout(spec: dict, work: Path, layout: str) -> dict:
    """This trainer's DPO step (`dpo_step_loss` in `layout`, backward, `optimizer_step`) on the
    policy as `odpo train` wraps it (`wrap_policy`: bf16 autocast under `--dtype bfloat16`)."""
    import torch

    from trainer.loop import dpo_step_loss, make_optimizer, optimizer_step, wrap_policy

    reset, peak, sync = memory_marks(spec["device"])
    model, tok, pairs = load(work, spec["device"])
    model.train()
    policy = wrap_policy(model, {"dtype": spec["dtype"], "strategy": "ddp"},
                         torch.device(spec["device"]), world=1)
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 0.0,
           "layout": layout, "lr": spec["lr"], "weight_decay": 0.0, "warmup_steps": 0,
           "total_steps": spec["steps"], "lr_schedule": "constant"}
    optimizer, scheduler = make_optimizer(model, cfg)
    times, losses, tokens, base = [], [], [], 0.0
    for step in range(spec["steps"]):
        batch = step_rows(pairs, step, spec["batch"])
        if step == 1:
            base = reset()
        sync()
        t0 = time.perf_counter()
        loss, metrics = dpo_step_loss(policy, batch, tok.pad_token_id, cfg)
        loss.backward()
        optimizer_step(model, optimizer, scheduler, grad_clip=1.0)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
        tokens.append(metrics["num_tokens"])
    if tokens != [pair_tokens(step_rows(pairs, s, spec["batch"])) for s in range(spec["steps"])]:
        raise RuntimeError(f"num_tokens {tokens} is not Σ (2P + C + R)")
    return {"times": times, "losses": losses, "step_peak_mb": peak() - base,
            "baseline_mb": base}


def run_trl(spec: dict, work: Path, checkpointing: bool = False, compact: bool = False) -> dict:
    """TRL's `DPOTrainer` on the same model, pairs (as texts) and cached reference values.

    `compact`: its fused LM head on the completion positions only, as TRL runs it on a GPU (on
    a CPU it projects every position, prompt and padding too: `compact = _use_triton(device)`
    in `trl.trainer.utils`, patched here for that decision alone; the kernels stay torch's).
    On a GPU, TRL's own choice (with Triton there, compact: its Triton log-prob kernels), and
    `bf16=True` under `--dtype bfloat16` (float32 weights, bf16 autocast, as this trainer)."""
    from bench_logps import trl_train

    if compact:
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True

    reset, peak, sync = memory_marks(spec["device"])
    model, tok, pairs = load(work, spec["device"])
    n = spec["steps"] * spec["batch"]
    rows = [{"prompt": p, "chosen": c, "rejected": r, "ref_chosen_logps": rc,
             "ref_rejected_logps": rr} for (p, c, r), rc, rr in zip(
                 pairs["texts"][:n], pairs["ref_chosen_logps"][:n],
                 pairs["ref_rejected_logps"][:n], strict=True)]
    res = trl_train(model, tok, rows, batch_size=spec["batch"], steps=spec["steps"],
                    lr=spec["lr"], reset=reset, peak=peak, sync=sync,
                    use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16",
                    gradient_checkpointing=checkpointing, adam_beta2=0.95,
                    optim="adamw_torch", max_grad_norm=1.0,
                    train_sampling_strategy="sequential")
    prompts, chosen, rejected = res.pop("token_ids")
    ours = [pairs[f"{k}_input_ids"][:n] for k in ("prompt", "chosen", "rejected")]
    if [prompts, chosen, rejected] != ours:
        raise RuntimeError("TRL tokenized the pairs into other ids than this trainer reads")
    return res


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shape, _, variant = args.child.partition("/")
    work = Path(args.work) / shape
    spec = shape_spec(shape, args.set, args)
    if variant == "prepare":
        work.mkdir(parents=True, exist_ok=True)
        prepare(spec, work)
        result: dict = {}
    elif variant in LAYOUTS:
        result = run_layout(spec, work, variant)
    else:
        result = run_trl(spec, work, checkpointing=variant == "trl_ckpt",
                         compact=variant == "trl_compact")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(args, shape: str, variant: str) -> dict | None:
    """A child process's result; None (its error printed) when it failed."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{shape}/{variant}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        print(f"({shape}) {variant} failed (exit {proc.returncode})", flush=True)
        return None
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def positions(spec: dict, work: Path) -> dict:
    """Per layout, over the timed steps (1..steps-1): the positions computed (rows x width; TRL
    pads as `padded`) and the real tokens among them."""
    from trainer import packing

    pairs = json.loads((work / "pairs.json").read_text())
    out = {k: {"positions": 0, "real": 0} for k in LAYOUTS}
    for step in range(1, spec["steps"]):
        rows = step_rows(pairs, step, spec["batch"])
        p, c, r = (rows[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected"))
        out["padded"]["positions"] += packing.batch_cost(
            packing.pair_cost(*lengths(rows), "padded"), "padded")
        out["padded"]["real"] += pair_tokens(rows)
        for layout in ("packed", "shared_prompt"):
            t = packing.layout_pairs(p, c, r, layout=layout)
            out[layout]["positions"] += t["input_ids"].numel()
            out[layout]["real"] += int(t["tokens"].sum())
    return out


def summarize(spec: dict, work: Path, runs: dict, tol: float) -> dict:
    """Per variant: medians over the timed steps of all its rounds (and of each round), memory,
    losses; ratios; the loss agreement check's largest differences."""
    pairs = json.loads((work / "pairs.json").read_text())
    tokens = [pair_tokens(step_rows(pairs, s, spec["batch"])) for s in range(spec["steps"])]
    table = {}
    for variant, results in runs.items():
        rates = [[tokens[s] / t for s, t in enumerate(r["times"]) if s] for r in results]
        table[variant] = {
            "step_s": statistics.median(t for r in results for t in r["times"][1:]),
            "step_s_rounds": [statistics.median(r["times"][1:]) for r in results],
            "tokens_per_s": statistics.median(x for rs in rates for x in rs),
            "tokens_per_s_rounds": [statistics.median(rs) for rs in rates],
            "step_peak_mb": max(r["step_peak_mb"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "losses": results[0]["losses"][:3],
        }
        if "intervals" in results[0]:
            table[variant]["interval_s"] = statistics.median(
                x for r in results for x in r["intervals"])
    first = runs[next(iter(runs))][0]["losses"]
    loss_diff = max(abs(r["losses"][k] - first[k]) for rs in runs.values() for r in rs
                    for k in range(min(3, len(first))))
    ln2_diff = max(abs(r["losses"][0] - math.log(2)) for rs in runs.values() for r in rs)
    summary: dict = {"variants": table, "max_loss_diff_steps_0_2": loss_diff,
                     "max_step0_diff_from_ln2": ln2_diff, "tol": tol,
                     "positions": positions(spec, work), "ratios": {}}
    rate = {v: row["tokens_per_s"] for v, row in table.items()}
    for v in table:
        for base in ("padded", "trl"):
            if base in table and v != base:
                summary["ratios"][f"{v} / {base}"] = rate[v] / rate[base]
    if all(k in rate for k in LAYOUTS):
        pos = {k: summary["positions"][k]["positions"] for k in LAYOUTS}
        summary["gain"] = {
            "padding removed (packed / padded)": rate["packed"] / rate["padded"],
            "prompt once (shared_prompt / packed)": rate["shared_prompt"] / rate["packed"],
            "positions padded / packed": pos["padded"] / pos["packed"],
            "positions packed / shared_prompt": pos["packed"] / pos["shared_prompt"],
        }
    return summary


def run_cli(args, spec: dict, work: Path) -> dict:
    """The real commands end to end: `odpo precompute` on the shape's first `--cli-steps` x batch
    pairs (as JSONL texts), then `odpo train` (Ray Train, one worker, `--threads` torch threads)
    per layout, auto and padded; from its metrics.jsonl the median step_time_s and tokens_per_s
    of steps 2.. (the issue's measure: steps 2-7 of 8) and the losses of steps 0-2."""
    import shutil

    odpo = str(Path(sys.executable).with_name("odpo"))
    cli, n = work / "cli", args.cli_steps * spec["batch"]
    cli.mkdir(exist_ok=True)
    texts = json.loads((work / "pairs.json").read_text())["texts"][:n]
    if len(texts) < n:
        raise SystemExit(f"--cli-steps {args.cli_steps}: {len(texts)} pairs < {n}")
    (cli / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in texts))
    common = ["--model", str(work / "model"), "--torch-threads", str(args.threads)]
    steps = [[odpo, "precompute", "--pairs", str(cli / "pairs.jsonl"), "--out", str(cli / "pre"),
              "--cache-dir", str(cli / "cache"), *common]]
    for layout in ("auto", "padded"):
        steps.append([odpo, "train", "--data", str(cli / "pre"), "--out",
                      str(cli / f"run_{layout}"), "--beta", "0.1", "--layout", layout,
                      "--max-steps", str(args.cli_steps), "--batch-size", str(spec["batch"]),
                      "--lr", str(spec["lr"]), "--lr-schedule", "constant", "--no-shuffle",
                      "--log-every", "1", *common])
    out = {}
    for cmd in steps:
        if cmd[1] == "train":  # a finished run's manifest would skip it: start afresh
            shutil.rmtree(cmd[5], ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
            raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {proc.returncode})")
        wall = time.perf_counter() - t0
        if cmd[1] == "precompute":
            out["precompute_wall_s"] = wall
            continue
        rows = [json.loads(x) for x in (Path(cmd[5]) / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in rows if r["step"] >= 2]
        out[cmd[cmd.index("--layout") + 1]] = {
            "step_s": statistics.median(r["step_time_s"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "losses": [r["loss"] for r in rows[:3]], "peak_rss_mb": rows[-1]["peak_rss_mb"],
            "wall_s": wall}
    out["auto / padded tokens_per_s"] = out["auto"]["tokens_per_s"] / out["padded"][
        "tokens_per_s"]
    return out


def markdown(shape: str, spec: dict, summary: dict) -> str:
    """The summary as the rows of BENCHMARKS.md's table."""
    def ratio(v: str, base: str) -> str:
        x = 1.0 if v == base else summary["ratios"].get(f"{v} / {base}")
        return "-" if x is None else f"{x:.2f}x"

    lines = []
    for v, row in summary["variants"].items():
        rounds = " / ".join(f"{x:,.0f}" for x in row["tokens_per_s_rounds"])
        lines.append(
            f"| ({shape}) {v} | {row['step_s']:.2f} | {row['tokens_per_s']:,.0f} ({rounds}) | "
            f"{ratio(v, 'padded')} | {ratio(v, 'trl')} | {row['step_peak_mb']:,.0f} | "
            + ", ".join(f"{x:.6f}" for x in row["losses"]) + " |")
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_trl_compare")
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--variants", default="padded,packed,shared_prompt,trl",
                    help="of padded, packed, shared_prompt, trl, trl_compact, trl_ckpt")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved passes over the variants")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (shape g is sized for it)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: float32 weights, bf16 autocast (this trainer and TRL)")
    ap.add_argument("--tol", type=float, default=1e-4, help="loss agreement, steps 0-2")
    ap.add_argument("--set", nargs="*", default=[], metavar="SHAPE.KEY=VALUE",
                    help=f"override a shape's field; shapes: {json.dumps(SHAPES)}")
    ap.add_argument("--cli", metavar="SHAPE", help="also run `odpo precompute` + `odpo train` "
                    "(Ray Train) end to end on this shape, layouts auto and padded")
    ap.add_argument("--cli-steps", type=int, default=8, help="optimizer steps of --cli")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # shape/variant of a child process
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    variants = args.variants.split(",")
    report: dict = {"load_average_before": load_average(), "shapes": {}}
    print(f"load average before: {report['load_average_before']}", flush=True)
    t_start = time.perf_counter()
    failed = []
    for shape in args.shapes.split(","):
        spec = shape_spec(shape, args.set, args)
        if spec["steps"] < 4:
            raise SystemExit(f"shape {shape}: steps must be >= 4 (a warm-up, then 3 losses)")
        if spawn(args, shape, "prepare") is None:
            raise SystemExit(f"shape {shape}: prepare failed")
        extra = [v for v in spec["extra"].split(",") if v and v not in variants]
        runs: dict = {v: [] for v in variants + extra}
        for rnd in range(args.rounds):
            for variant in variants + (extra if rnd == 0 else []):
                res = spawn(args, shape, variant)
                if res is None:
                    failed.append(f"{shape}/{variant}")
                    continue
                runs[variant].append(res)
                print(f"({shape}) round {rnd} {variant}: step_s "
                      f"{statistics.median(res['times'][1:]):.2f} losses "
                      f"{[round(x, 6) for x in res['losses'][:3]]} step_peak_mb "
                      f"{res['step_peak_mb']:.0f} load {load_average()}", flush=True)
        runs = {v: r for v, r in runs.items() if r}
        summary = summarize(spec, Path(args.work) / shape, runs, args.tol)
        report["shapes"][shape] = {"spec": spec, **summary, "runs": runs}
        print(json.dumps({"spec": spec, **summary}, indent=1))
        print(markdown(shape, spec, summary), flush=True)
        if summary["max_loss_diff_steps_0_2"] > args.tol or (
                summary["max_step0_diff_from_ln2"] > args.tol):
            failed.append(shape)
        if args.cli == shape:
            report["cli"] = run_cli(args, spec, Path(args.work) / shape)
            print(f"({shape}) odpo CLI: {json.dumps(report['cli'])}", flush=True)
    report["load_average_after"] = load_average()
    report["wall_s"] = time.perf_counter() - t_start
    print(f"load average after: {report['load_average_after']}; wall {report['wall_s']:.0f} s")
    name = f"report-{time.strftime('%Y%m%d-%H%M%S')}.json"  # one per run: runs are compared
    (Path(args.work) / name).write_text(json.dumps(report, indent=1))
    print(f"-> {Path(args.work) / name}")
    if failed:
        raise SystemExit(f"failed, or losses disagree beyond --tol {args.tol}: {failed}")


if __name__ == "__main__":
    main()
