"""`odpo train`: DPO / DPO+NLL on precompute shards, with no reference model in memory.

The reference log-probs come from the shards written by `odpo precompute`. `ref_logps="live"`
loads the reference model into every worker and recomputes them on the fly with the same code;
it exists to measure the saving and to check that both modes agree.

`loss_type` is one loss or a weighted list of them (`weighted_loss`, MPO), on pairs; or `kto`,
alone, on the unpaired rows of `odpo pair --mode unpaired` (each row's completion and desirable
label, with the reference log-probs of the completion and of a mismatched completion for KTO's
reference point: trainer/precompute.py).
"""

from __future__ import annotations

import dataclasses
import math
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
from trainer.loss import (
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    UNPAIRED_LOSS_TYPES,
    loss_types,
    reference_free,
    unpaired,
)
from trainer.packing import LAYOUTS

STAGE = "train"
DPO_LAYOUTS = ("auto", *LAYOUTS)
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PRECOMPUTE_COLUMNS = ID_COLUMNS + LOGP_COLUMNS
# Unpaired rows (kto): each row's completion, its label, and the mismatched completion whose
# log-probs give KTO's reference point.
UNPAIRED_COLUMNS = ("prompt_input_ids", "completion_input_ids", "kl_completion_input_ids",
                    "label", "ref_logps", "ref_kl_logps")


def needed_columns(loss_type: str | list[str]) -> tuple[str, ...]:
    """The precompute columns training with `loss_type` (a name or a list) reads: no reference
    log-probs when every listed loss is reference-free (`odpo precompute --no-logps` writes
    none); kto's unpaired rows."""
    if unpaired(loss_type):
        return UNPAIRED_COLUMNS
    return ID_COLUMNS if reference_free(loss_type) else PRECOMPUTE_COLUMNS


@dataclass(frozen=True)
class DPOConfig:
    model: str  # policy to start from (HF checkpoint); usually the reference model itself
    data: str  # precompute stage directory (`odpo precompute` output)
    out: str  # run directory: model/, metrics.jsonl, tensorboard/, ray/
    beta: float  # KL strength of DPO; no default: it sets the trade-off, choose it on purpose
    # preference loss by TRL 1.16's names (trainer/loss.py: each with its paper); sigmoid is DPO.
    # ipo is the IPO paper's loss on *summed* completion log-probs; TRL's `ipo` (per-token mean)
    # is ipo_mean here, so a β tuned in TRL carries over to ipo_mean, not to ipo. A list (YAML
    # list, or comma-separated: sigmoid,bco_pair,sft) trains the weighted sum of its losses
    # (MPO). kto (alone) trains on unpaired rows: `odpo pair --mode unpaired`, then precompute
    loss_type: str | list[str] = "sigmoid"
    # weight of each listed loss, in loss_type's order (comma-separated); None: 1 each
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0  # label noise ε in [0, 0.5): cDPO (sigmoid), robust, exo_pair, aot
    # weight of the chosen NLL term: 1.0 is DPO+NLL (Iterative RPO); the same as a list with nll
    alpha: float = 0.0
    # kto: λ_D, the weight of desirable rows' losses; the KTO paper advises
    # λ_D·n_D / (λ_U·n_U) in [1, 4/3] (`odpo pair --mode unpaired` reports n_D and n_U)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0  # kto: λ_U, the weight of undesirable rows' losses
    # how a micro-batch's pairs are laid out for the forward (trainer/packing.py): auto |
    # padded (2 rows a pair, right-padded) | packed (sequences back to back, no padding) |
    # shared_prompt ([prompt, chosen, rejected] per pair: the prompt computed once); auto is
    # shared_prompt where the attention takes a 4D mask (sdpa, eager), padded otherwise
    layout: str = "auto"
    ref_logps: str = "cached"  # cached (from the shards) | live (load the reference: checks only)
    ref_model: str | None = None  # live mode: the reference checkpoint; None: `model`
    epochs: int = 1  # passes over the pairs
    max_steps: int = 0  # stop after this many optimizer steps; 0 means all epochs
    batch_size: int = 64  # global pairs per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step: the same maths in less memory
    # token budget of a micro-batch, 0: off. > 0 cuts each worker's share of a step
    # (batch_size / num_workers pairs) into micro-batches of whole pairs of at most this many
    # positions (padded: rows x width; packed, shared_prompt: the pairs' tokens) instead of
    # grad_accum equal ones, so grad_accum stays 1; a pair over it trains alone, never split.
    # The step is still batch_size pairs and the loss their mean: learning rates carry over.
    # Not with kto (use grad_accum)
    max_tokens_per_batch: int = 0
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
    log_every: int = 10  # steps between metric lines (step 0 is always logged)
    save_every: int = 0  # steps between checkpoints (resume points); 0 saves only at the end
    max_failures: int = 0  # worker failures Ray Train restarts from the last checkpoint


def read_precompute_stage(path: str, loss_type: str | list[str] = "sigmoid") -> Upstream:
    """The `odpo precompute` output at `path`, its shards checked against their manifest and
    holding what `loss_type` reads; a one-line error naming `odpo precompute` for anything else
    (pairs, plain Parquet), for shards without the reference log-probs a loss needs, and for
    pairs given to kto or unpaired rows given to a pairwise loss."""
    manifest = read_manifest(path) if storage.is_dir(path) else None
    name = loss_type if isinstance(loss_type, str) else ",".join(loss_type)
    if manifest is not None and manifest.get("stage") == "precompute":
        rows_unpaired = bool(manifest.get("unpaired"))
        if unpaired(loss_type) and not rows_unpaired:
            raise UserError(f"--data {path}: holds pairs; loss_type kto trains on unpaired rows "
                            "(`odpo pair --mode unpaired`, then `odpo precompute`)")
        if rows_unpaired and not unpaired(loss_type):
            raise UserError(f"--data {path}: holds unpaired rows (`odpo pair --mode "
                            f"unpaired`), which only loss_type kto reads; {name} needs pairs")
    if (not reference_free(loss_type) and manifest is not None
            and not (manifest.get("config") or {}).get("logps", True)):
        raise UserError(f"--data {path}: precomputed without reference log-probs "
                        f"(--no-logps), which loss_type {name!r} needs; reference-free "
                        f"losses: {REFERENCE_FREE_LOSS_TYPES}")
    return read_stage(path, ("precompute",), needed_columns(loss_type), flag="--data",
                      plain=False)


def check_loss(cfg: DPOConfig) -> None:
    """The loss fields (`loss_type`, its weights and settings), one-line errors."""
    types = loss_types(cfg.loss_type)
    listed = not isinstance(cfg.loss_type, str)
    name = ",".join(types) if listed else repr(cfg.loss_type)
    known = LOSS_TYPES + UNPAIRED_LOSS_TYPES
    unknown = [t for t in types if t not in known]
    kto = unpaired(types)
    weights = cfg.loss_weights
    checks = (
        (bool(types), "loss_type must name at least one loss"),
        (not unknown, f"loss_type must be one of {known} (or a list of them), got "
                      f"{', '.join(map(repr, unknown))}"),
        (len(set(types)) == len(types), f"loss_type {name} lists a loss twice"),
        (not (kto and len(types) > 1),
         "loss_type kto trains on unpaired rows, alone: it cannot be in a list of pairwise "
         "losses"),
        (weights is None or not kto,
         "loss_weights weigh a list of losses; kto weighs its rows with desirable_weight and "
         "undesirable_weight"),
        (weights is None or len(weights) == len(types),
         f"loss_weights has {len(weights or ())} weight(s) for the {len(types)} loss(es) of "
         f"loss_type {name}"),
        (all(math.isfinite(w) and w >= 0 for w in weights or ()),
         f"loss_weights must be finite and >= 0, got {weights}"),
        (not ("nll" in types and cfg.alpha > 0),
         f"alpha is the weight of an nll term, and loss_type {name} lists nll too: set its "
         "weight in loss_weights and alpha 0"),
        (cfg.ref_logps == "cached" or not reference_free(types),
         f"loss_type {name} needs no reference model: ref_logps live would load one for "
         "nothing"),
        (cfg.beta > 0, f"beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5,
         f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}"),
        (cfg.label_smoothing == 0 or set(types) & set(LABEL_SMOOTHING_LOSS_TYPES),
         f"label_smoothing applies to {LABEL_SMOOTHING_LOSS_TYPES} only; loss_type "
         f"{name} would ignore it"),
        (cfg.label_smoothing > 0 or "exo_pair" not in types,
         "loss_type exo_pair needs label_smoothing > 0 (its ε; TRL's docs suggest 1e-3)"),
        (cfg.alpha >= 0, f"alpha (NLL weight) must be >= 0, got {cfg.alpha}"),
        (not (kto and cfg.alpha > 0),
         "alpha adds the NLL of a chosen response, which kto's unpaired rows do not have"),
        (kto or (cfg.desirable_weight, cfg.undesirable_weight) == (1.0, 1.0),
         f"desirable_weight and undesirable_weight weigh kto's rows; loss_type {name} would "
         "ignore them"),
        (cfg.desirable_weight > 0 and cfg.undesirable_weight > 0,
         f"desirable_weight and undesirable_weight must be > 0, got {cfg.desirable_weight} and "
         f"{cfg.undesirable_weight}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def check_config(cfg: DPOConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    if cfg.ref_logps not in ("cached", "live"):
        raise UserError(f"ref_logps must be cached or live, got {cfg.ref_logps!r}")
    if cfg.layout not in DPO_LAYOUTS:
        raise UserError(f"layout must be one of {DPO_LAYOUTS}, got {cfg.layout!r}")
    check_loss(cfg)
    check_token_budget(cfg)
    check_training_config(cfg)


def check_token_budget(cfg: DPOConfig) -> None:
    """`max_tokens_per_batch`, one-line errors: >= 0; not with `grad_accum` > 1 (both cut the
    step into micro-batches); not with kto, whose reference point z0 is a mean over each
    micro-batch on every worker (TRL's), so unequal micro-batches would change the loss with the
    budget (and its gather takes equal sizes)."""
    budget = cfg.max_tokens_per_batch
    if budget < 0:
        raise UserError(f"max_tokens_per_batch must be >= 0 (0: off), got {budget}")
    if budget and cfg.grad_accum > 1:
        raise UserError(f"max_tokens_per_batch {budget} and grad_accum {cfg.grad_accum} both "
                        "cut a step into micro-batches: set one (grad_accum 1 with a budget)")
    if budget and unpaired(cfg.loss_type):
        raise UserError("max_tokens_per_batch cuts pairs by tokens; kto's reference point is a "
                        "mean over each micro-batch, which would then change with the budget: "
                        "use grad_accum")


def kto_balance(desirable: int, undesirable: int, desirable_weight: float,
                undesirable_weight: float) -> str | None:
    """The KTO paper's advice on the class weights (Ethayarajh et al. 2024, §4.2):
    λ_D·n_D / (λ_U·n_U) in [1, 4/3]. None when the data and weights follow it (or one class is
    absent), else a sentence that says what would."""
    if not desirable or not undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    low = undesirable_weight * undesirable / desirable
    return (f"λ_D·n_D / (λ_U·n_U) = {desirable_weight:g}·{desirable} / "
            f"({undesirable_weight:g}·{undesirable}) = {ratio:.3g}, outside the KTO paper's "
            f"[1, 4/3]: desirable_weight {low:.3g} to {4 * low / 3:.3g} would bring it in")


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
    kto = unpaired(cfg.loss_type)
    if kto:
        stats = up.manifest.get("stats") or {}
        advice = kto_balance(stats.get("desirable", 0), stats.get("undesirable", 0),
                             cfg.desirable_weight, cfg.undesirable_weight)
        if advice:
            print(f"odpo train: warning: {advice}", file=sys.stderr)
    inputs = {"model": checkpoint_digest(cfg.model), "data": input_digest(cfg.data)}
    if live:
        inputs["ref_model"] = checkpoint_digest(cfg.ref_model)
    return run_training(
        cfg, stage=STAGE, objective="dpo", source=cfg.data,
        unit="rows" if kto else "pairs", config=asdict(cfg), inputs=inputs, ray_inputs=paths,
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


def read_pairs(up: Upstream, loss_type: str | list[str] = "sigmoid"):
    """The precompute shards' token ids and log-probs (`needed_columns`) as a materialized Ray
    dataset (None when there are none): two floats a pair beside the ids, small enough to hold
    once in the object store and read whole by every worker; trainer.loop orders the pairs
    (`shuffle`: anew each epoch)."""
    ds = read_rows(up)
    columns = list(needed_columns(loss_type))
    return None if ds is None else ds.select_columns(columns).materialize()
