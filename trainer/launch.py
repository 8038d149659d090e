"""Driver side of training: build the `TorchTrainer`, run it, copy out the final HF checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import storage
from pipeline.io import UserError, user_errors
from trainer.loop import STATE_FILE, train_loop_per_worker


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


def fit(
    loop_cfg: dict,
    train_ds,
    *,
    run_dir: str,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    max_failures: int = 0,
) -> str:
    """Train and return `run_dir/model`, a Hugging Face checkpoint directory (`run_dir` may be a
    URI: Ray Train keeps its checkpoints there, the model is published config.json last).

    Ray Train keeps its checkpoints under `run_dir/ray/<objective>`; a re-run with the same
    `run_dir` resumes from the latest of them.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = storage.absolute(run_dir)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_cfg, "run_dir": run_dir},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=loop_cfg["objective"],
            storage_path=storage.join(run_dir, "ray"),  # a URI works as is
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": train_ds},
    )
    with user_errors():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {run_dir} finished without a checkpoint")
    out = storage.join(run_dir, "model")
    with result.checkpoint.as_directory() as ckpt, storage.output_dir(out, overwrite=True) as tmp:
        for f in Path(ckpt).iterdir():
            if f.name != STATE_FILE and f.is_file():
                shutil.copy2(f, Path(tmp) / f.name)
    return out
