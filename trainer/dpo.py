"""`odpo train`: DPO / DPO+NLL on reference shards, with no reference model in memory.

The reference log-probs come from the shards written by `odpo reference`. `reference="live"`
loads the reference model into every worker and recomputes them on the fly with the same code;
it exists to measure the saving and to check that both modes agree.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline import storage
from pipeline.checkpoint import check_checkpoint
from pipeline.errors import UserError
from pipeline.storage import resolve_path, write_json
from trainer.loss import LOSS_TYPES

STAGE = "train"
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
    # sigmoid (DPO) | ipo | hinge. ipo is the IPO paper's loss on *summed* completion log-probs;
    # TRL's `ipo` averages them per token, so a β tuned in TRL does not carry over
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # cDPO label noise ε in [0, 0.5); the sigmoid loss only
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
    shuffle: bool = True  # a new pair order each epoch (seeded by seed, epoch); off: shard order
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


def check_config(cfg: DPOConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    from trainer.launch import check_training_config

    checks = (
        (cfg.loss_type in LOSS_TYPES,
         f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}"),
        (cfg.reference in ("cached", "live"),
         f"reference must be cached or live, got {cfg.reference!r}"),
        (cfg.beta > 0, f"beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5,
         f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}"),
        (cfg.label_smoothing == 0 or cfg.loss_type == "sigmoid",
         f"label_smoothing (cDPO) applies to the sigmoid loss only; loss_type "
         f"{cfg.loss_type!r} would ignore it"),
        (cfg.alpha >= 0, f"alpha (NLL weight) must be >= 0, got {cfg.alpha}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    check_training_config(cfg)


def run_dpo(cfg: DPOConfig, start_ray: Callable[[], None] | None = None) -> dict:
    """Train the policy on reference shards; write `out/model` and a summary.

    Skipped when `out/manifest.json` records a finished run with this config, these inputs
    (policy and reference shards) and this code version; a half-done run of the same config
    resumes from its checkpoints, one of another config is removed and trained anew.
    `start_ray` is called once there is training to do."""
    import ray

    from pipeline.checkpoint import checkpoint_digest
    from pipeline.manifest import current_run, finish_run, input_digest, start_run
    from trainer.launch import fit, plan_steps

    check_config(cfg)
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
    config = asdict(cfg)
    inputs = {"model": checkpoint_digest(cfg.model), "data": input_digest(cfg.data)}
    if cfg.reference == "live":
        inputs["reference_model"] = checkpoint_digest(cfg.reference_model)
    done = current_run(cfg.out, STAGE, config, inputs)
    if done is not None:
        return {**done["summary"], "skipped": True}
    if start_ray is not None:
        start_ray()
    t0 = time.perf_counter()
    files = [storage.join(cfg.data, f["name"]) for f in manifest["files"]]
    ds = ray.data.read_parquet(files).select_columns(list(REFERENCE_COLUMNS))
    # Token ids and two floats per pair: small enough to hold once in the object store, read
    # whole by every worker; trainer.loop orders the pairs (cfg.shuffle: anew each epoch).
    ds = ds.materialize()
    rows = manifest["rows_out"]
    steps = plan_steps(rows, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.data, "pairs")
    loop_cfg = {**asdict(cfg), "objective": "dpo", **steps}
    start_run(cfg.out, STAGE, config, inputs)
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
        # not in any batch of an epoch; shuffled, a different subset each epoch
        "pairs_left_over_per_epoch": steps["left_over_per_epoch"],
        "steps": steps["total_steps"],
        "reference": cfg.reference,
        "train_s": time.perf_counter() - t0,
    }
    write_json(storage.join(cfg.out, "train_summary.json"), summary)
    finish_run(cfg.out, STAGE, config, inputs, "model", {"summary": summary})
    return {**summary, "skipped": False}
