"""Lean vs full log-probs in one DPO step, and TRL's `DPOTrainer` on the same model and pairs.

One random Llama with a real model's vocabulary (151,936, Qwen2.5's) but a narrow body, so that
the LM head and its log-softmax dominate, as they do for a 0.5B chat model on long completions;
pairs of random printable text (one token a character) with `--prompt` and `--completion`
tokens. Each variant runs in its own process on the same model, pairs and cached reference
log-probs:

- `full`: this trainer's DPO step (`trainer.loop.dpo_step_loss` + AdamW) through the full
  (B, T, V) logits (`TokenLogps(model, lean=False)`, the path before issue 17);
- `lean`: the same step through `TokenLogps(model)`: the LM head and float32 log-softmax in
  chunks of completion positions, recomputed in the backward;
- `trl`: TRL's `DPOTrainer` with `precompute_ref_log_probs=True` (TRL is a dev extra; never a
  runtime dependency), its training steps only.

Reported per variant, over the steps after the first (a warm-up, which also allocates AdamW's
state): median step time, and the steps' peak resident memory over the process's memory after
the first step (Linux VmHWM, reset there, so the model, data, optimizer state and TRL's
reference precompute pass are not counted: what is left is activations, logits and gradients).

    python bench/bench_logps.py [--vocab 151936 --hidden 256 --layers 2 --pairs 2 \\
        --prompt 512 --completion 256 --steps 3]
"""

from __future__ import annotations

import argparse
import json
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


def peak_mb() -> float:
    return _rss_mb("VmHWM")


def setup(args):
    """(model, tokenizer, texts, batch): the seeded random model, the toy character tokenizer,
    the pairs' texts and the trainer's batch with cached reference log-probs."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.toy import build_tokenizer
    from trainer.collate import collate
    from trainer.logps import TokenLogps

    tok = build_tokenizer()
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(n))

    texts = [(text(args.prompt - 1), text(args.completion - 1), text(args.completion - 1))
             for _ in range(args.pairs)]  # BOS + prompt, completion + EOS
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    model.train()
    prompts = [tok(p)["input_ids"] for p, _, _ in texts]
    chosen = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
              for _, c, _ in texts]
    rejected = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for _, _, r in texts]
    with torch.no_grad():  # the cached reference: the model itself (so step 0 is at ln 2)
        n = len(prompts)
        t = collate(prompts + prompts, chosen + rejected, tok.pad_token_id)
        logps, _ = TokenLogps(model)(t["input_ids"], t["attention_mask"], t["labels"])
        ref = logps.double().sum(-1).tolist()
    batch = {"prompt_input_ids": prompts, "chosen_input_ids": chosen,
             "rejected_input_ids": rejected, "ref_chosen_logps": ref[:n],
             "ref_rejected_logps": ref[n:]}
    return model, tok, texts, batch


def run_trainer(args, lean: bool) -> dict:
    import torch

    from trainer.logps import TokenLogps
    from trainer.loop import dpo_step_loss

    model, tok, _, batch = setup(args)
    policy = TokenLogps(model, lean=lean)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 0.0}
    times, losses, base = [], [], 0.0
    for step in range(args.steps):
        if step == 1:
            base = reset_peak()
        t0 = time.perf_counter()
        loss, metrics = dpo_step_loss(policy, batch, tok.pad_token_id, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    return {"step_time_s": statistics.median(times[1:]), "step_peak_mb": peak_mb() - base,
            "baseline_mb": base, "losses": losses}


def trl_train(model, tok, rows: list[dict], batch_size: int, steps: int, lr: float,
              reset=reset_peak, peak=peak_mb, sync=lambda: None, **config) -> dict:
    """TRL's `DPOTrainer` (precompute_ref_log_probs=True) for `steps` steps of `batch_size` rows
    ({prompt, chosen, rejected} texts) on `model`; `config`: more `DPOConfig` fields.

    Rows that also carry `ref_chosen_logps` / `ref_rejected_logps` are the cached reference:
    TRL's reference pass is skipped and its steps read those values from the batch, as they
    read the ones it would have computed. Returns per step the clocked times (TRL's
    `on_step_begin` to `on_step_end`: forward, backward, clipping, optimizer; the collator runs
    before; `sync` runs at both ends, e.g. `torch.cuda.synchronize`), the losses it logged, the
    peak over the memory after the first step (`reset` and `peak`, MB: resident memory as
    `run_trainer`, by default), and the token ids TRL's tokenization gave each row."""
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks: dict = {"times": [], "ends": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            if len(marks["times"]) == 1:  # after the warm-up step (and the precompute pass)
                marks["base"] = reset()
            marks["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            marks["ends"].append(time.perf_counter())
            marks["times"].append(marks["ends"][-1] - marks["t0"])

    class CachedRefDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if "ref_chosen_logps" in dataset.column_names:  # cached by the caller
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    with tempfile.TemporaryDirectory() as out:
        args_ = DPOConfig(**{
            "output_dir": out, "report_to": "none", "use_cpu": True, "bf16": False,
            "disable_tqdm": True, "seed": 0, "per_device_train_batch_size": batch_size,
            "max_steps": steps, "learning_rate": lr, "beta": 0.1, "max_length": None,
            "precompute_ref_log_probs": True, "logging_steps": 1, "save_strategy": "no",
            "lr_scheduler_type": "constant", "weight_decay": 0.0, **config})
        trainer = CachedRefDPOTrainer(model=model, args=args_, train_dataset=Dataset.from_list(
            rows), processing_class=tok, callbacks=[Clock()])
        trainer.train()
    data, ends = trainer.train_dataset, marks["ends"]
    intervals = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return {"times": marks["times"], "intervals": intervals,
            "step_peak_mb": peak() - marks["base"], "baseline_mb": marks["base"],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "trl": trl.__version__,
            "token_ids": [data[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]}


def run_trl(args) -> dict:
    model, tok, texts, _ = setup(args)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in texts] * args.steps
    res = trl_train(model, tok, rows, batch_size=args.pairs, steps=args.steps, lr=1e-6)
    return {"step_time_s": statistics.median(res["times"][1:]),
            "step_peak_mb": res["step_peak_mb"], "baseline_mb": res["baseline_mb"],
            "losses": res["losses"], "trl": res["trl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens incl. BOS")
    ap.add_argument("--completion", type=int, default=256, help="completion tokens incl. EOS")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="full,lean,trl")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's one variant
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2: the first is a warm-up")
    if args.variant:
        import torch

        torch.set_num_threads(args.threads)
        result = run_trl(args) if args.variant == "trl" else run_trainer(
            args, lean=args.variant == "lean")
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                             check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        print(variant, json.dumps(results[variant]), flush=True)
    summary = {"shape": {k: getattr(args, k) for k in
                         ("vocab", "hidden", "layers", "pairs", "prompt", "completion")}}
    if "full" in results and "lean" in results:
        f, lean = results["full"], results["lean"]
        summary["full_over_lean_peak"] = f["step_peak_mb"] / lean["step_peak_mb"]
        summary["lean_over_full_step_time"] = lean["step_time_s"] / f["step_time_s"]
    if "trl" in results and "lean" in results:
        t, lean = results["trl"], results["lean"]
        summary["trl_over_lean_peak"] = t["step_peak_mb"] / lean["step_peak_mb"]
        summary["lean_over_trl_step_time"] = lean["step_time_s"] / t["step_time_s"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
