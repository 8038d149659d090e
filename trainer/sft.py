"""`odpo sft`: supervised fine-tuning (NLL on response tokens) with the shared Ray Train loop."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import (
    check_checkpoint,
    checkpoint_digest,
    context_length,
    load_tokenizer,
)
from pipeline.errors import UserError, user_errors
from pipeline.manifest import input_digest
from pipeline.stage import Upstream, check_out, join_named_cluster, read_stage
from pipeline.storage import resolve_path
from pipeline.tables import read_ray_dataset
from trainer.collate import tokenize_completions
from trainer.launch import check_training_config, run_training
from trainer.lora import LoraSettings

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
    # Defaults are TRL's SFTConfig's (lr 2e-5, no warmup, one epoch), for real models; the toy's
    # weak SFT model (600 steps at 3e-3) is jobs/configs/toy_addition.yaml's `sft:` section.
    max_steps: int = 0  # stop after this many optimizer steps; 0 means all epochs
    epochs: int = 1  # passes over the data (training stops at max_steps first if set)
    batch_size: int = 128  # global sequences per optimizer step (all workers, all micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step; memory knob, same maths
    lr: float = 2e-5  # peak AdamW lr (TRL's SFT default); the 0.66M-parameter toy takes 3e-3
    lr_schedule: str = "linear"  # constant | linear | cosine after warmup (TRL: linear)
    warmup_steps: int = 0  # linear warmup steps; none by default, as in TRL
    weight_decay: float = 0.0  # AdamW decoupled weight decay; none by default, as in TRL
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0  # torch seed of every worker
    shuffle: bool = True  # a new row order each epoch (seeded by seed, epoch); off: file order
    max_length: int = 0  # tokens per prompt+response; 0 means the model's context length
    # a row longer than max_length: `error` stops before training, naming it; `drop` leaves it
    # out and counts it (sft_summary.json `dropped`), as sample and precompute do
    too_long: str = "error"
    num_workers: int = 1  # training workers (gloo on CPU, NCCL on GPU)
    # ddp: every worker holds the whole model, gradients and AdamW state | fsdp: FSDP2
    # (fully_shard on every decoder layer) shards them across the workers, for models that do
    # not fit one device
    strategy: str = "ddp"
    cpus_per_worker: float = 1.0  # fractional CPUs keep Ray Data's readers from starving
    # intra-op threads per worker; 0 = auto: with no cluster named, this machine's CPUs shared
    # out among the workers, on a named one cpus_per_worker (pipeline.cluster.copy_threads)
    torch_threads: int = 0
    use_gpu: bool = False  # one GPU per worker, NCCL
    # float32 | bfloat16: mixed precision, the forward in bfloat16 (log-softmax in float32) and
    # the trained weights and AdamW state in float32 (a LoRA base stays bfloat16); float16
    # would need loss scaling
    dtype: str = "float32"
    gradient_checkpointing: bool = False  # trade compute for activation memory
    lora: LoraSettings = field(default_factory=LoraSettings)  # r > 0: train LoRA adapters only
    log_every: int = 50  # steps between metric lines (step 0 is always logged)
    save_every: int = 0  # steps between Ray Train checkpoints; 0 saves only at the end
    max_failures: int = 0  # worker failures Ray Train restarts from the last checkpoint
    eval_prompts: str | None = None  # held-out prompts (`prompt`, `answer`) to score the result
    scorer: str | None = None  # `module:function` or a built-in task name; eval_prompts needs it
    eval_samples: int = 4  # sampled responses per held-out prompt (temperature 1)


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
    prompt_ids, completion_ids = tokenize_completions(load_tokenizer(model), prompts, responses)
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


def chosen_table(pairs: Upstream):
    """(prompt, response) from a pairs stage (`read_stage`): each distinct (prompt, chosen) once,
    in first-seen order (a pair stage repeats a chosen response across its pairs)."""
    rows = {}
    for f in pairs.files:
        t = pq.read_table(f, columns=["prompt", "chosen"])
        for p, c in zip(t["prompt"].to_pylist(), t["chosen"].to_pylist(), strict=True):
            rows.setdefault((p, c), None)
    return pa.table({"prompt": pa.array([p for p, _ in rows], type=pa.string()),
                     "response": pa.array([c for _, c in rows], type=pa.string())})


def check_config(cfg: SFTConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    if (cfg.data is None) == (cfg.from_pairs is None):
        raise UserError("set exactly one of --data (prompt, response) and --from-pairs PAIRS_DIR")
    if cfg.too_long not in ("error", "drop"):
        raise UserError(f"too_long must be error or drop, got {cfg.too_long!r}")
    if cfg.max_length < 0:
        raise UserError(f"max_length must be >= 0 (0: the model's context), got {cfg.max_length}")
    if cfg.eval_prompts is not None and not cfg.scorer:
        raise UserError("eval_prompts needs --scorer (a built-in task name or module:function): "
                        "what counts as a correct answer is the user's choice")
    if cfg.eval_samples < 1:
        raise UserError(f"eval_samples must be >= 1, got {cfg.eval_samples}")
    check_training_config(cfg)


# What only the evaluation of the trained model reads: changing them re-evaluates, not retrains.
EVAL_FIELDS = ("eval_prompts", "scorer", "eval_samples")


def run_sft(cfg: SFTConfig) -> dict:
    """Train and write `out/model`; return the run's summary (`run_training`: skipped when current,
    a half-done run of this config resumed). Evaluating the result (`eval_prompts`) is the
    caller's step: `eval_settings`."""
    check_config(cfg)
    cfg = dataclasses.replace(cfg, model=resolve_path(cfg.model), data=resolve_path(cfg.data),
                              from_pairs=resolve_path(cfg.from_pairs),
                              out=storage.absolute(cfg.out))
    paths = {"--model": cfg.model, "--data": cfg.data, "--from-pairs": cfg.from_pairs}
    check_out(cfg.out, STAGE, paths)
    join_named_cluster(cfg.out, paths)
    check_checkpoint(cfg.model)
    pairs = None if cfg.from_pairs is None else read_stage(
        cfg.from_pairs, ("import", "pair"), ("prompt", "chosen"), flag="--from-pairs", plain=False)
    source = cfg.data or cfg.from_pairs
    return run_training(
        cfg, stage=STAGE, objective="sft", source=source, unit="rows", ray_inputs=paths,
        config={k: v for k, v in asdict(cfg).items() if k not in EVAL_FIELDS},
        inputs={"model": checkpoint_digest(cfg.model), "data": input_digest(source)},
        read=lambda: read_sft_data(cfg, source, pairs),
    )


def read_sft_data(cfg: SFTConfig, source: str, pairs: Upstream | None) -> tuple:
    """(the tokenized rows as a materialized Ray dataset, their number, {rows_in, dropped}), from
    `cfg.data` or the checked `pairs` stage."""
    import ray

    if pairs is not None:
        table = chosen_table(pairs)  # blocks of 10k rows tokenize in parallel
        ds = ray.data.from_arrow([table.slice(i, 10_000)
                                  for i in range(0, max(table.num_rows, 1), 10_000)])
    else:
        ds = read_ray_dataset(cfg.data, required=("prompt", "response"))
    max_length = cfg.max_length or context_length(cfg.model)
    with user_errors():
        rows_in = ds.count()
        ds = ds.select_columns(["prompt", "response"]).map_batches(
            tokenize_sft_batch,
            fn_kwargs={"model": cfg.model, "max_length": max_length, "source": source,
                       "too_long": cfg.too_long},
            batch_format="numpy",
        ).map_batches(_kept_rows, batch_format="pyarrow").materialize()
    rows = ds.count()
    return ds, rows, {"rows_in": rows_in,
                      "dropped": {"too_long": rows_in - rows} if rows_in > rows else {}}


def eval_settings(cfg: SFTConfig, model: str) -> dict:
    """The `EvalConfig` fields of the held-out evaluation of the trained `model` that
    `eval_prompts` asks for (result: out/eval.json). The entry points in jobs/ run it after
    `run_sft`, so that no stage imports another."""
    return {"model": model, "prompts": resolve_path(cfg.eval_prompts), "scorer": cfg.scorer,
            "samples": cfg.eval_samples, "seed": cfg.seed,
            "out": storage.join(storage.absolute(cfg.out), "eval.json")}
