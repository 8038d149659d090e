"""`odpo train`: DPO / DPO+NLL on reference shards, with no reference model in memory.

The reference log-probs come from the shards written by `odpo reference`. `reference="live"`
loads the reference model into every worker and recomputes them on the fly with the same code;
it exists to measure the saving and to check that both modes agree.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

from pipeline import storage
from pipeline.io import UserError, check_checkpoint, resolve_path, write_json
from trainer.loss import LOSS_TYPES

REFERENCE_COLUMNS = (
    "prompt_input_ids",
    "chosen_input_ids",
    "rejected_input_ids",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


@dataclass(frozen=True)
class DPOConfig:
    model: str  # policy to start from (HF checkpoint); usually the reference model itself
    data: str  # reference stage directory (`odpo reference` output)
    out: str  # run directory: model/, metrics.jsonl, tensorboard/, ray/
    beta: float  # KL strength of DPO; no default: it sets the trade-off, choose it on purpose
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    label_smoothing: float = 0.0  # cDPO label noise ε for the sigmoid loss
    alpha: float = 0.0  # weight of the chosen NLL term: 1.0 is DPO+NLL (Iterative RPO)
    reference: str = "cached"  # cached (from the shards) | live (load the reference: checks only)
    reference_model: str | None = None  # live mode: the reference checkpoint (default: model)
    epochs: int = 1  # passes over the pairs
    max_steps: int = 0  # stop after this many optimizer steps; 0 means all epochs
    batch_size: int = 64  # global pairs per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-7  # peak AdamW lr: TRL's DPO default, for real models; the toy uses 5e-4
    lr_schedule: str = "linear"  # constant | linear | cosine after warmup
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0  # torch seed of every worker
    shuffle: bool = True  # shuffle pairs each run (seeded); off keeps the shard order
    num_workers: int = 1  # DDP workers (gloo on CPU, NCCL on GPU)
    cpus_per_worker: float = 1.0  # fractional CPUs keep Ray Data's readers from starving
    torch_threads: int = 2  # intra-op threads per worker; 0 leaves torch's default
    use_gpu: bool = False  # one GPU per worker, NCCL
    dtype: str = "float32"  # float32 | bfloat16 policy weights (log-softmax stays float32)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    log_every: int = 10  # steps between metric lines (step 0 is always logged)
    save_every: int = 0  # steps between checkpoints (resume points); 0 saves only at the end
    max_failures: int = 0  # worker failures Ray Train restarts from the last checkpoint


def check_reference_shards(path: str) -> dict:
    """The reference stage's manifest, after checksums; a clear error for anything else."""
    from pipeline.manifest import read_manifest, verify_shards

    manifest = read_manifest(path)
    if manifest is not None and manifest.get("stage") != "reference":
        raise UserError(
            f"{path} holds '{manifest.get('stage')}' shards without reference log-probs; run "
            f"`odpo reference --pairs {path} ...` first and train on its output"
        )
    if manifest is None:
        import pyarrow.parquet as pq

        files = (storage.list_files(path, (".parquet",)) if storage.is_dir(path)
                 else [path])
        if not files or not storage.exists(files[0]):
            raise UserError(f"{path}: no reference shards found; run `odpo reference` first")
        with storage.open_input(files[0]) as f:
            names = pq.read_schema(f).names
        missing = [c for c in REFERENCE_COLUMNS if c not in names]
        if missing:
            raise UserError(
                f"{path}: shards lack {missing}; run `odpo reference` on them first"
            )
        raise UserError(f"{path}: no manifest.json; train on the output dir of `odpo reference`")
    return verify_shards(path, "reference")


def run_dpo(cfg: DPOConfig) -> dict:
    """Train the policy on reference shards; write `out/model` and a summary."""
    import ray

    from trainer.launch import fit, plan_steps

    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.reference not in ("cached", "live"):
        raise UserError(f"reference must be cached or live, got {cfg.reference!r}")
    if cfg.beta <= 0:
        raise UserError(f"beta must be > 0, got {cfg.beta}")
    if cfg.batch_size % (cfg.num_workers * cfg.grad_accum):
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by num_workers x grad_accum "
            f"= {cfg.num_workers * cfg.grad_accum}"
        )
    cfg = dataclasses.replace(
        cfg,
        model=resolve_path(cfg.model),
        data=resolve_path(cfg.data),
        out=storage.absolute(cfg.out),
        reference_model=resolve_path(cfg.reference_model or cfg.model),
    )
    check_checkpoint(cfg.model)
    if cfg.reference == "live":
        check_checkpoint(cfg.reference_model, "reference model")
    manifest = check_reference_shards(cfg.data)
    t0 = time.perf_counter()
    files = [storage.join(cfg.data, f["name"]) for f in manifest["files"]]
    ds = ray.data.read_parquet(files).select_columns(list(REFERENCE_COLUMNS))
    if cfg.shuffle:
        ds = ds.random_shuffle(seed=cfg.seed)
    # Token ids and two floats per pair: small enough to hold once in the object store, so
    # each epoch does not re-read and re-shuffle the shards.
    ds = ds.materialize()
    rows = manifest["rows_out"]
    steps = plan_steps(rows, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.data, "pairs")
    loop_cfg = {**asdict(cfg), "objective": "dpo", **steps}
    model_dir = fit(
        loop_cfg,
        ds,
        run_dir=cfg.out,
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu,
        max_failures=cfg.max_failures,
    )
    summary = {
        "model": str(model_dir),
        "pairs": rows,
        # not in any batch of an epoch; the same pairs each epoch (one shuffle per run)
        "pairs_left_over_per_epoch": steps["left_over_per_epoch"],
        "steps": steps["total_steps"],
        "reference": cfg.reference,
        "train_s": time.perf_counter() - t0,
    }
    write_json(storage.join(cfg.out, "train_summary.json"), summary)
    return summary
