"""`odpo train`: DPO / DPO+NLL on precompute shards, with no reference model in memory.

The reference log-probs come from the shards written by `odpo precompute`. `ref_logps="live"`
loads the reference model into every worker and recomputes them on the fly with the same code;
it exists to measure the saving and to check that both modes agree.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.checkpoint import check_checkpoint, checkpoint_digest
from pipeline.errors import UserError
from pipeline.manifest import input_digest, read_manifest
from pipeline.stage import Upstream, check_out, join_named_cluster, read_rows, read_stage
from pipeline.storage import resolve_path
from trainer.launch import check_training_config, run_training
from trainer.lora import LoraSettings
from trainer.loss import LABEL_SMOOTHING_LOSS_TYPES, LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES

STAGE = "train"
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PRECOMPUTE_COLUMNS = ID_COLUMNS + LOGP_COLUMNS


def needed_columns(loss_type: str) -> tuple[str, ...]:
    """The precompute columns training with `loss_type` reads: no reference log-probs for the
    reference-free losses (`odpo precompute --no-logps` writes none)."""
    return ID_COLUMNS if loss_type in REFERENCE_FREE_LOSS_TYPES else PRECOMPUTE_COLUMNS


@dataclass(frozen=True)
class DPOConfig:
    model: str  # policy to start from (HF checkpoint); usually the reference model itself
    data: str  # precompute stage directory (`odpo precompute` output)
    out: str  # run directory: model/, metrics.jsonl, tensorboard/, ray/
    beta: float  # KL strength of DPO; no default: it sets the trade-off, choose it on purpose
    # preference loss by TRL 1.16's names (trainer/loss.py: each with its paper); sigmoid is DPO.
    # ipo is the IPO paper's loss on *summed* completion log-probs; TRL's `ipo` (per-token mean)
    # is ipo_mean here, so a β tuned in TRL carries over to ipo_mean, not to ipo
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # label noise ε in [0, 0.5): cDPO (sigmoid), robust, exo_pair, aot
    alpha: float = 0.0  # weight of the chosen NLL term: 1.0 is DPO+NLL (Iterative RPO)
    ref_logps: str = "cached"  # cached (from the shards) | live (load the reference: checks only)
    ref_model: str | None = None  # live mode: the reference checkpoint; None: `model`
    epochs: int = 1  # passes over the pairs
    max_steps: int = 0  # stop after this many optimizer steps; 0 means all epochs
    batch_size: int = 64  # global pairs per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step: the same maths in less memory
    lr: float = 5e-7  # peak AdamW lr: TRL's DPO default, for real models; the toy uses 5e-4
    lr_schedule: str = "linear"  # constant | linear | cosine after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup; none by default, as in TRL
    weight_decay: float = 0.0  # AdamW decoupled weight decay; none by default, as in TRL
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0  # torch seed of every worker
    shuffle: bool = True  # a new pair order each epoch (seeded by seed, epoch); off: shard order
    num_workers: int = 1  # training workers (gloo on CPU, NCCL on GPU)
    # ddp: every worker holds the whole model, gradients and AdamW state | fsdp: FSDP2
    # (fully_shard on every decoder layer) shards them across the workers, for models that do
    # not fit one device
    strategy: str = "ddp"
    cpus_per_worker: float = 1.0  # fractional CPUs keep Ray Data's readers from starving
    torch_threads: int = 0  # intra-op threads per worker; 0 = cpus_per_worker (at least 1)
    use_gpu: bool = False  # one GPU per worker, NCCL
    # float32 | bfloat16: mixed precision, the forward in bfloat16 (log-softmax in float32) and
    # the trained weights and AdamW state in float32 (a LoRA base stays bfloat16); float16
    # would need loss scaling
    dtype: str = "float32"
    gradient_checkpointing: bool = False  # trade compute for activation memory
    lora: LoraSettings = field(default_factory=LoraSettings)  # r > 0: train LoRA adapters only
    log_every: int = 10  # steps between metric lines (step 0 is always logged)
    save_every: int = 0  # steps between checkpoints (resume points); 0 saves only at the end
    max_failures: int = 0  # worker failures Ray Train restarts from the last checkpoint


def read_precompute_stage(path: str, loss_type: str = "sigmoid") -> Upstream:
    """The `odpo precompute` output at `path`, its shards checked against their manifest and
    holding what `loss_type` reads; a one-line error naming `odpo precompute` for anything else
    (pairs, plain Parquet), or for shards without the reference log-probs a loss needs."""
    manifest = read_manifest(path) if storage.is_dir(path) else None
    if (loss_type not in REFERENCE_FREE_LOSS_TYPES and manifest is not None
            and not (manifest.get("config") or {}).get("logps", True)):
        raise UserError(f"--data {path}: precomputed without reference log-probs "
                        f"(--no-logps), which loss_type {loss_type!r} needs; reference-free "
                        f"losses: {REFERENCE_FREE_LOSS_TYPES}")
    return read_stage(path, ("precompute",), needed_columns(loss_type), flag="--data",
                      plain=False)


def check_config(cfg: DPOConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    checks = (
        (cfg.loss_type in LOSS_TYPES,
         f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}"),
        (cfg.ref_logps in ("cached", "live"),
         f"ref_logps must be cached or live, got {cfg.ref_logps!r}"),
        (cfg.ref_logps == "cached" or cfg.loss_type not in REFERENCE_FREE_LOSS_TYPES,
         f"loss_type {cfg.loss_type!r} needs no reference model: ref_logps live would load one "
         "for nothing"),
        (cfg.beta > 0, f"beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5,
         f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}"),
        (cfg.label_smoothing == 0 or cfg.loss_type in LABEL_SMOOTHING_LOSS_TYPES,
         f"label_smoothing applies to {LABEL_SMOOTHING_LOSS_TYPES} only; loss_type "
         f"{cfg.loss_type!r} would ignore it"),
        (cfg.label_smoothing > 0 or cfg.loss_type != "exo_pair",
         "loss_type exo_pair needs label_smoothing > 0 (its ε; TRL's docs suggest 1e-3)"),
        (cfg.alpha >= 0, f"alpha (NLL weight) must be >= 0, got {cfg.alpha}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    check_training_config(cfg)


def run_dpo(cfg: DPOConfig) -> dict:
    """Train the policy on precompute shards; write `out/model` and return the run's summary
    (`run_training`: skipped when current, a half-done run of this config resumed)."""
    check_config(cfg)
    cfg = dataclasses.replace(cfg, model=resolve_path(cfg.model), data=resolve_path(cfg.data),
                              out=storage.absolute(cfg.out),
                              ref_model=resolve_path(cfg.ref_model or cfg.model))
    live = cfg.ref_logps == "live"
    paths = {"--model": cfg.model, "--data": cfg.data,
             "--ref-model": cfg.ref_model if live else None}
    check_out(cfg.out, STAGE, paths)
    join_named_cluster(cfg.out, paths)
    check_checkpoint(cfg.model)
    if live:
        check_checkpoint(cfg.ref_model, "reference model")
    up = read_precompute_stage(cfg.data, cfg.loss_type)
    warn_dtype(up.manifest, cfg)
    inputs = {"model": checkpoint_digest(cfg.model), "data": input_digest(cfg.data)}
    if live:
        inputs["ref_model"] = checkpoint_digest(cfg.ref_model)
    return run_training(
        cfg, stage=STAGE, objective="dpo", source=cfg.data, unit="pairs", config=asdict(cfg),
        inputs=inputs, ray_inputs=paths,
        read=lambda: (read_pairs(up, cfg.loss_type), up.manifest["rows_out"],
                      {"ref_logps": cfg.ref_logps}),
    )


def warn_dtype(manifest: dict, cfg: DPOConfig) -> None:
    """Say so when the cached reference log-probs were computed in another precision than the
    policy's forward: the policy starts as the reference, but step 0's loss is then not exactly
    ln 2 (docs/design.md, Numerics)."""
    cached = (manifest.get("config") or {}).get("dtype")
    if cfg.ref_logps == "cached" and cached and cached != cfg.dtype:
        print(f"odpo train: warning: the reference log-probs in {cfg.data} were computed in "
              f"{cached} and the policy's forward runs in {cfg.dtype}: step 0 starts off ln 2 "
              "by the two precisions' difference (grows with completion length); precompute "
              f"with --dtype {cfg.dtype} for an exact start", file=sys.stderr)


def read_pairs(up: Upstream, loss_type: str = "sigmoid"):
    """The precompute shards' token ids and log-probs (`needed_columns`) as a materialized Ray
    dataset (None when there are none): two floats a pair beside the ids, small enough to hold
    once in the object store and read whole by every worker; trainer.loop orders the pairs
    (`shuffle`: anew each epoch)."""
    ds = read_rows(up)
    columns = list(needed_columns(loss_type))
    return None if ds is None else ds.select_columns(columns).materialize()
