"""Driver side of training, the one shape of `odpo sft` and `odpo train`: skip a current run, start
Ray, read the data, plan the steps, run the `TorchTrainer`, publish the final HF checkpoint."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pipeline import storage
from pipeline.cluster import copy_threads, ensure_ray
from pipeline.errors import UserError, user_errors
from pipeline.manifest import current_run, finish_run, start_run
from pipeline.storage import write_json
from trainer.loop import STATE_FILE, train_loop_per_worker
from trainer.lora import ADAPTER_DIR, check_lora

TRAIN_DTYPES = ("float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
LR_SCHEDULES = ("constant", "linear", "cosine")


def check_training_config(cfg) -> None:
    """One-line errors on the driver, before Ray starts, for the fields that `odpo sft` and
    `odpo train` share (a bad value would otherwise fail inside a Ray Train worker)."""
    checks = (
        (cfg.dtype in TRAIN_DTYPES,
         f"dtype must be one of {TRAIN_DTYPES} (float16 training would need loss scaling), got "
         f"{cfg.dtype!r}"),
        (cfg.strategy in STRATEGIES,
         f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}"),
        (not (cfg.strategy == "fsdp" and cfg.lora.r > 0),
         "lora with strategy fsdp is not supported: LoRA's trainable state is small, use ddp"),
        (cfg.lr_schedule in LR_SCHEDULES,
         f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}"),
        (cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.max_steps >= 0, f"max_steps must be >= 0 (0: all epochs), got {cfg.max_steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.num_workers >= 1, f"num_workers must be >= 1, got {cfg.num_workers}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0: off), got {cfg.grad_clip}"),
        (cfg.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {cfg.cpus_per_worker}"),
        (cfg.torch_threads >= 0, f"torch_threads must be >= 0, got {cfg.torch_threads}"),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
        (cfg.save_every >= 0, f"save_every must be >= 0 (0: at the end), got {cfg.save_every}"),
        (cfg.max_failures >= -1, f"max_failures must be >= -1 (-1: no limit), got "
                                 f"{cfg.max_failures}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    check_lora(cfg.lora)
    if cfg.batch_size % (cfg.num_workers * cfg.grad_accum):
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by num_workers x grad_accum "
            f"= {cfg.num_workers * cfg.grad_accum}"
        )


def run_training(cfg, *, stage: str, objective: str, config: dict, inputs: dict[str, str],
                 ray_inputs: dict[str, str | None], read: Callable[[], tuple], source: str,
                 unit: str) -> dict:
    """One training run into `cfg.out` (a checked config, its paths resolved); its summary.

    Skipped when `cfg.out/manifest.json` records a finished run of `stage` with this `config`,
    these `inputs` ({name: digest}) and this code version; a half-done run of the same resumes
    from its checkpoints, one of another is removed and trained anew. Otherwise Ray is started
    (`ensure_ray`, which refuses a local `cfg.out` or `ray_inputs` on a multi-node cluster;
    a named cluster the caller joined up front, before its checks), `read()`
    gives (materialized Ray dataset, its `unit`s (rows or pairs), the stage's own summary fields),
    and `objective` ("sft" | "dpo") is trained for `plan_steps` steps.
    """
    done = current_run(cfg.out, stage, config, inputs)
    if done is not None:
        return {**done["summary"], "skipped": True}
    ensure_ray(cfg.out, ray_inputs)
    t0 = time.perf_counter()
    dataset, rows, extra = read()
    steps = plan_steps(rows, cfg.batch_size, cfg.epochs, cfg.max_steps, source, unit)
    start_run(cfg.out, stage, config, inputs)  # the data has been read and checked
    model = fit({**asdict(cfg), "objective": objective, **steps}, dataset)
    summary = {
        "model": model, unit: rows, **extra, "steps": steps["total_steps"],
        # not in any batch of an epoch; shuffled, a different subset each epoch
        f"{unit}_left_over_per_epoch": steps["left_over_per_epoch"],
        "train_s": time.perf_counter() - t0,
    }
    write_json(storage.join(cfg.out, f"{stage}_summary.json"), summary)
    finish_run(cfg.out, stage, config, inputs, "model", {"summary": summary})
    return {**summary, "skipped": False}


def plan_steps(
    rows: int, batch_size: int, epochs: int, max_steps: int, source: str, unit: str = "rows"
) -> dict:
    """Optimizer steps per epoch and in all (capped by `max_steps` when > 0) for `rows` rows, and
    the rows left over after an epoch's last full batch (`drop_last`; summaries report them)."""
    if rows < batch_size:
        raise UserError(f"{source}: {rows} {unit}, fewer than one batch of {batch_size}")
    steps_per_epoch = rows // batch_size
    total_steps = steps_per_epoch * epochs
    if max_steps > 0:
        total_steps = min(total_steps, max_steps)
    return {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "left_over_per_epoch": rows - steps_per_epoch * batch_size}


def fit(loop_cfg: dict, train_ds) -> str:
    """Train and return `out/model`, a Hugging Face checkpoint directory (`out`, loop_cfg's, may
    be a URI: Ray Train keeps its checkpoints there, the model is published config.json last).
    `train_ds` is materialized; every worker reads all of it.

    Ray Train keeps its checkpoints under `out/ray/<objective>`; a re-run with the same `out`
    resumes from the latest of them. A LoRA run's checkpoint model is the merged one; its
    adapter is published beside it as `out/adapter` (before the model, whose config.json marks
    the run's result complete).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir, use_gpu = storage.absolute(loop_cfg["out"]), loop_cfg["use_gpu"]
    # auto threads sized here, on the driver, where it is known whether a cluster is named
    loop_cfg = {**loop_cfg, "torch_threads": copy_threads(
        loop_cfg["torch_threads"], loop_cfg["num_workers"], loop_cfg["cpus_per_worker"])}
    resources = {"CPU": loop_cfg["cpus_per_worker"], **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Every worker reads all of the set, by reference to its blocks in the object store, in
        # their stored order (pipeline.cluster.init_ray makes the driver's materialize keep its
        # input's order): trainer.loop's plan indexes rows by position. (Ray Train's `datasets=`
        # would start a DatasetManager actor and stream them through an executor per worker, for
        # a set that is already materialized: ~0.3 s a toy fit, measured side by side.)
        train_loop_config={**loop_cfg, "run_dir": run_dir,
                           "train_blocks": train_ds.to_arrow_refs()},
        scaling_config=ScalingConfig(num_workers=loop_cfg["num_workers"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=loop_cfg["objective"],
            storage_path=storage.join(run_dir, "ray"),  # a URI works as is
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=loop_cfg["max_failures"]),
        ),
    )
    with user_errors():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {run_dir} finished without a checkpoint")
    out = storage.join(run_dir, "model")
    with result.checkpoint.as_directory() as ckpt:
        if (Path(ckpt) / ADAPTER_DIR).is_dir():
            with storage.output_dir(storage.join(run_dir, ADAPTER_DIR), overwrite=True) as tmp:
                shutil.copytree(Path(ckpt) / ADAPTER_DIR, tmp, dirs_exist_ok=True)
        with storage.output_dir(out, overwrite=True) as tmp:
            for f in Path(ckpt).iterdir():
                if f.name != STATE_FILE and f.is_file():
                    shutil.copy2(f, Path(tmp) / f.name)
    return out
