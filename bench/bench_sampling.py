"""Sampling throughput, vLLM vs `transformers.generate`, side by side in one run.

Same model, same prompts, same sampling settings (k samples per prompt, temperature, top_p, no
top-k, max_tokens, stop at EOS), float32 on both. Each engine is loaded and warmed up first; the
timed part is generation only. Tokens count what each engine generated per sample, up to and
including EOS. The share of correct answers (addition verifier) checks that both sampled the
same distribution. Optionally also times the whole `odpo sample` stage (Ray start, actor and
engine start-up, Parquet write) on the same prompts.

    python bench/bench_sampling.py --model /tmp/w/sft600/model \
        --prompts /tmp/w/data/prompts.parquet --num-prompts 512 --k 8 --max-tokens 16
    # a bigger random Llama (same tokenizer), where compute per token matters more:
    python bench/bench_sampling.py --model /tmp/w/sft600/model --random-width 512 \
        --random-layers 8 ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load_prompts(path: str, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()[:n]


def random_model(base: str, width: int, layers: int, out: Path) -> str:
    """A random Llama of the given size with `base`'s tokenizer and context."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.hidden_size = width
    config.intermediate_size = 3 * width
    config.num_hidden_layers = layers
    config.num_attention_heads = max(1, width // 64)
    config.num_key_value_heads = config.num_attention_heads
    config.head_dim = width // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def count_tokens(ids, eos: int) -> int:
    """Generated tokens up to and including the first EOS (what vLLM reports)."""
    n = 0
    for t in ids:
        n += 1
        if t == eos:
            break
    return n


def bench_hf(model_path: str, prompts: list[str], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def run(batch: list[str]):
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                top_k=0, max_new_tokens=args.max_tokens, num_return_sequences=args.k,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return texts, sum(count_tokens(ids, tok.eos_token_id) for ids in new)

    run(prompts[: min(8, len(prompts))])  # warm-up
    t0 = time.perf_counter()
    texts, tokens = [], 0
    for i in range(0, len(prompts), args.hf_batch):
        t, n = run(prompts[i : i + args.hf_batch])
        texts += t
        tokens += n
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples": len(texts), "tokens": tokens, "texts": texts,
            "threads": torch.get_num_threads()}


def bench_vllm(model_path: str, prompts: list[str], args) -> dict:
    from pipeline.engine import EngineConfig, make_llm, sampling_params_for

    t0 = time.perf_counter()
    llm = make_llm(model_path, EngineConfig(), seed=args.seed)
    start_s = time.perf_counter() - t0
    cfg = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p,
           "max_tokens": args.max_tokens, "seed": args.seed}
    warm = prompts[: min(8, len(prompts))]
    llm.generate(warm, sampling_params_for(warm, cfg), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling_params_for(prompts, cfg), use_tqdm=False)
    seconds = time.perf_counter() - t0
    texts = [c.text for o in outs for c in o.outputs]
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": seconds, "samples": len(texts), "tokens": tokens, "texts": texts,
            "engine_start_s": start_s}


def bench_stage(model_path: str, prompts_path: str, args, work: Path) -> dict:
    """The whole `odpo sample` stage, from a fresh process, on the same prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    subset = work / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(load_prompts(prompts_path, args.num_prompts)), subset)
    cmd = [sys.executable, "-m", "jobs.cli", "sample", "--model", model_path, "--prompts",
           str(subset), "--out", str(work / "samples"), "--k", str(args.k), "--max-tokens",
           str(args.max_tokens), "--temperature", str(args.temperature), "--top-p",
           str(args.top_p), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    wall = time.perf_counter() - t0
    manifest = json.loads((work / "samples" / "manifest.json").read_text())
    return {"wall_s": wall, "samples": manifest["rows_out"],
            "sample_s": manifest["stats"]["sample_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF checkpoint (its tokenizer is used)")
    ap.add_argument("--prompts", required=True, help="Parquet with `prompt` (+ `answer`)")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=64, help="prompts per generate() call")
    ap.add_argument("--random-width", type=int, default=0, help="bench a random Llama instead")
    ap.add_argument("--random-layers", type=int, default=8)
    ap.add_argument("--stage", action="store_true", help="also time the whole `odpo sample`")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from pipeline.tasks.addition import verify

    work = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    model = args.model
    if args.random_width:
        model = random_model(args.model, args.random_width, args.random_layers, work / "model")
    rows = load_prompts(args.prompts, args.num_prompts)
    prompts = [r["prompt"] for r in rows]
    flat_rows = [r for r in rows for _ in range(args.k)]

    hf = bench_hf(model, prompts, args)
    vl = bench_vllm(model, prompts, args)
    result = {"model": model, "num_prompts": len(prompts), "k": args.k,
              "max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "cpus": os.cpu_count()}
    for name, r in (("hf", hf), ("vllm", vl)):
        texts = r.pop("texts")
        result[name] = {
            **r,
            "samples_per_s": r["samples"] / r["seconds"],
            "tokens_per_s": r["tokens"] / r["seconds"],
            "mean_tokens": r["tokens"] / r["samples"],
        }
        if "answer" in rows[0] and not args.random_width:
            result[name]["share_correct"] = sum(verify(prompts, texts, flat_rows)) / len(texts)
    result["ratio_tokens_per_s"] = result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    result["ratio_samples_per_s"] = (result["vllm"]["samples_per_s"]
                                     / result["hf"]["samples_per_s"])
    if args.stage:
        result["stage"] = bench_stage(model, args.prompts, args, work)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\nvLLM / transformers.generate: {result['ratio_tokens_per_s']:.2f}x tokens/s "
        f"({result['vllm']['tokens_per_s']:.0f} vs {result['hf']['tokens_per_s']:.0f}), "
        f"{result['ratio_samples_per_s']:.2f}x samples/s"
    )


if __name__ == "__main__":
    main()
