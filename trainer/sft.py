"""`odpo sft`: supervised fine-tuning (NLL on response tokens) with the shared Ray Train loop."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

from pipeline import storage
from pipeline.checkpoint import check_checkpoint, context_length
from pipeline.errors import UserError, user_errors
from pipeline.storage import local_copy, resolve_path, write_json
from pipeline.tables import read_ray_dataset
from trainer.collate import tokenize_completions

STAGE = "sft"


@dataclass(frozen=True)
class SFTConfig:
    model: str  # HF checkpoint (local path, URI or hub id) to fine-tune; chosen on purpose
    out: str  # run directory: model/, metrics.jsonl, tensorboard/, eval.json, ray/
    # Exactly one of data / from_pairs: what to train on is chosen on purpose.
    data: str | None = None  # Parquet / JSONL / `datasets` dir with `prompt` and `response`
    # pairs stage dir (`odpo import` / `odpo pair`): SFT on (prompt, chosen), each distinct pair
    # once; the DPO paper's reference for preference data that did not come from this model
    from_pairs: str | None = None
    # Defaults make the toy's *weak* SFT model: 25.6% greedy on held-out addition, measured.
    max_steps: int = 600  # optimizer steps; the toy is at 53% by 750 and 82% by 1,050: stop early
    epochs: int = 1  # passes over the data (training stops at max_steps first if set)
    batch_size: int = 128  # global sequences per optimizer step (all workers, all micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step; memory knob, same maths
    lr: float = 3e-3  # peak AdamW lr; high because the toy model is tiny (0.66M params)
    lr_schedule: str = "constant"  # constant | linear | cosine after warmup
    warmup_steps: int = 50  # linear warmup steps, keeps the first Adam steps from overshooting
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0  # torch seed of every worker
    shuffle: bool = True  # a new row order each epoch (seeded by seed, epoch); off: file order
    max_length: int = 0  # tokens per prompt+response; 0 means the model's context length
    # a row longer than max_length: `error` stops before training, naming it; `drop` leaves it
    # out and counts it (sft_summary.json `dropped`), as sample and reference do
    too_long: str = "error"
    num_workers: int = 1  # DDP workers (gloo on CPU, NCCL on GPU)
    cpus_per_worker: float = 1.0  # fractional CPUs keep Ray Data's readers from starving
    torch_threads: int = 2  # intra-op threads per worker; 0 leaves torch's default
    use_gpu: bool = False  # one GPU per worker, NCCL
    dtype: str = "float32"  # float32 | bfloat16 (bf16 on GPU)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    log_every: int = 50  # steps between metric lines (step 0 is always logged)
    save_every: int = 0  # steps between Ray Train checkpoints; 0 saves only at the end
    max_failures: int = 0  # worker failures Ray Train restarts from the last checkpoint
    eval_prompts: str | None = None  # held-out prompts (`prompt`, `answer`) to score the result
    scorer: str = "addition"  # `module:function` or a built-in task name, for eval
    eval_samples: int = 4  # sampled responses per held-out prompt (temperature 1)


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_copy(path), trust_remote_code=False)
    # Lengths are checked against max_length below, with a message naming the row; the
    # tokenizer's own "sequence length is longer than..." warning would only add noise.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


def tokenize_sft_batch(
    batch: dict, *, model: str, max_length: int, source: str, too_long: str = "error"
) -> dict:
    """(prompt, response) -> prompt_input_ids, completion_input_ids; one-line errors on bad rows.
    Rows longer than `max_length` raise (`too_long="error"`) or are marked `keep=False`."""
    prompts = [str(p) for p in batch["prompt"]]
    responses = [None if r is None else str(r) for r in batch["response"]]
    for p, r in zip(prompts, responses, strict=True):
        if not p:
            raise UserError(f"{source}: a row has an empty prompt (response {r!r}); remove it")
        if not r:
            raise UserError(f"{source}: row with prompt {p!r} has an empty response; remove it")
    prompt_ids, completion_ids = tokenize_completions(_tokenizer(model), prompts, responses)
    keep = [len(pi) + len(ci) <= max_length for pi, ci in zip(prompt_ids, completion_ids,
                                                               strict=True)]
    if too_long == "error" and not all(keep):
        i = keep.index(False)
        raise UserError(
            f"{source}: row with prompt {prompts[i][:40]!r} is "
            f"{len(prompt_ids[i]) + len(completion_ids[i])} tokens, longer than max_length "
            f"{max_length}; shorten or drop it (--too-long drop), or raise --max-length"
        )
    return {"prompt_input_ids": prompt_ids, "completion_input_ids": completion_ids, "keep": keep}


def _kept_rows(table):
    """Ray Data task: the rows `tokenize_sft_batch` kept (a typed, possibly empty, block)."""
    return table.filter(table["keep"]).drop_columns(["keep"])


def chosen_table(pairs: str):
    """(prompt, response) from a pairs stage dir: each distinct (prompt, chosen) once, in first-
    seen order (a pair stage repeats a chosen response across its pairs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import read_manifest, verify_shards

    manifest = read_manifest(pairs) if storage.is_dir(pairs) else None
    if manifest is None or manifest.get("stage") not in ("import", "pair"):
        found = f"'{manifest.get('stage')}' output" if manifest else "no manifest.json"
        raise UserError(f"--from-pairs {pairs}: holds {found}; give the output of `odpo import` "
                        f"or `odpo pair`")
    verify_shards(pairs)
    tables = [pq.read_table(storage.join(pairs, f["name"]), columns=["prompt", "chosen"])
              for f in manifest["files"]]
    rows = {}
    for t in tables:
        for p, c in zip(t["prompt"].to_pylist(), t["chosen"].to_pylist(), strict=True):
            rows.setdefault((p, c), None)
    return pa.table({"prompt": pa.array([p for p, _ in rows], type=pa.string()),
                     "response": pa.array([c for _, c in rows], type=pa.string())})


def check_config(cfg: SFTConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    from trainer.launch import check_training_config

    if (cfg.data is None) == (cfg.from_pairs is None):
        raise UserError("set exactly one of --data (prompt, response) and --from-pairs PAIRS_DIR")
    if cfg.too_long not in ("error", "drop"):
        raise UserError(f"too_long must be error or drop, got {cfg.too_long!r}")
    if cfg.max_length < 0:
        raise UserError(f"max_length must be >= 0 (0: the model's context), got {cfg.max_length}")
    if cfg.eval_samples < 1:
        raise UserError(f"eval_samples must be >= 1, got {cfg.eval_samples}")
    check_training_config(cfg)


# What only the evaluation of the trained model reads: changing them re-evaluates, not retrains.
EVAL_FIELDS = ("eval_prompts", "scorer", "eval_samples")


def run_sft(cfg: SFTConfig, start_ray: Callable[[], None] | None = None) -> dict:
    """Train, write `out/model`, evaluate it if `eval_prompts` is set; return a summary.

    Skipped when `out/manifest.json` records a finished run with this config (eval settings
    aside), these inputs and this code version; a half-done run of the same config resumes
    from its checkpoints, one of another config is removed and trained anew. `start_ray` is
    called once there is training to do."""
    from pipeline.checkpoint import checkpoint_digest
    from pipeline.manifest import current_run, finish_run, input_digest

    check_config(cfg)
    cfg = dataclasses.replace(
        cfg,
        model=resolve_path(cfg.model),
        data=resolve_path(cfg.data),
        from_pairs=resolve_path(cfg.from_pairs),
        out=storage.absolute(cfg.out),
        eval_prompts=resolve_path(cfg.eval_prompts),
    )
    t0 = time.perf_counter()
    check_checkpoint(cfg.model)
    max_length = cfg.max_length or context_length(cfg.model)
    source = cfg.data or cfg.from_pairs
    config = {k: v for k, v in asdict(cfg).items() if k not in EVAL_FIELDS}
    inputs = {"model": checkpoint_digest(cfg.model), "data": input_digest(source)}
    manifest = current_run(cfg.out, STAGE, config, inputs)
    if manifest is not None:
        summary = {**manifest["summary"], "skipped": True}
    else:
        if start_ray is not None:
            start_ray()
        summary = {**_train(cfg, max_length, source, t0, (config, inputs)), "skipped": False}
        finish_run(cfg.out, STAGE, config, inputs, "model",
                   {"summary": {k: v for k, v in summary.items() if k != "skipped"}})
    if cfg.eval_prompts:
        from pipeline.evaluate import EvalConfig, run_eval

        summary["eval"] = run_eval(EvalConfig(
            model=summary["model"], prompts=cfg.eval_prompts, scorer=cfg.scorer,
            samples=cfg.eval_samples, seed=cfg.seed, out=storage.join(cfg.out, "eval.json")),
            start_ray=start_ray)
    summary["total_s"] = time.perf_counter() - t0
    write_json(storage.join(cfg.out, "sft_summary.json"), summary)
    return json.loads(json.dumps(summary))


def _train(cfg: SFTConfig, max_length: int, source: str, t0: float, run: tuple) -> dict:
    """Tokenize, train with Ray Train, publish `out/model`; the run's summary. `run`: the
    (config, inputs) its manifest records, started once the data has been read and checked."""
    import ray

    from pipeline.manifest import start_run
    from trainer.launch import fit, plan_steps

    if cfg.from_pairs:
        table = chosen_table(cfg.from_pairs)  # blocks of 10k rows tokenize in parallel
        ds = ray.data.from_arrow([table.slice(i, 10_000)
                                  for i in range(0, max(table.num_rows, 1), 10_000)])
    else:
        ds = read_ray_dataset(cfg.data, required=("prompt", "response"))
    with user_errors():
        rows_in = ds.count()
        ds = ds.select_columns(["prompt", "response"]).map_batches(
            tokenize_sft_batch,
            fn_kwargs={"model": cfg.model, "max_length": max_length, "source": source,
                       "too_long": cfg.too_long},
            batch_format="numpy",
        ).map_batches(_kept_rows, batch_format="pyarrow").materialize()
    rows = ds.count()
    dropped = {"too_long": rows_in - rows} if rows_in > rows else {}
    steps = plan_steps(rows, cfg.batch_size, cfg.epochs, cfg.max_steps, source)
    loop_cfg = {**asdict(cfg), "objective": "sft", **steps}
    out = cfg.out
    start_run(out, STAGE, *run)
    model_dir = fit(
        loop_cfg,
        ds,
        run_dir=out,
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu,
        max_failures=cfg.max_failures,
    )
    return {
        "model": str(model_dir), "rows": rows, "rows_in": rows_in, "dropped": dropped,
        "rows_left_over_per_epoch": steps["left_over_per_epoch"],  # after the last full batch
        "steps": steps["total_steps"], "train_s": time.perf_counter() - t0,
    }
