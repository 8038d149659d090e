"""The one training loop behind `odpo sft` and `odpo train`: Ray Train `train_loop_per_worker`.

The objective is a keyword: "sft" (NLL on response tokens) or "dpo" (preference loss from
`trainer.loss` on the policy's log-probs and the batch's cached reference log-probs, plus `alpha`
times the chosen NLL). Everything else (data shard, optimiser, schedule, accumulation, clipping,
DDP, logging, checkpoints, resume) is shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from trainer.collate import collate
from trainer.logps import per_token_logps, sequence_logps
from trainer.loss import dpo_loss, nll_loss

STATE_FILE = "trainer_state.pt"


def sft_step_loss(model, batch: dict, pad_token_id: int) -> tuple[torch.Tensor, dict]:
    """Token-mean NLL of the completion tokens of one micro-batch."""
    t = collate(batch["prompt_input_ids"], batch["completion_input_ids"], pad_token_id)
    device = next(model.parameters()).device
    logits = model(
        input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)
    ).logits
    token_logps, mask = per_token_logps(logits, t["labels"].to(device))
    n_tokens = mask.sum()
    loss = -token_logps.sum() / n_tokens.clamp(min=1)
    return loss, {"loss": loss.item(), "num_tokens": float(t["attention_mask"].sum())}


def _pair_logps(model, batch: dict, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Chosen and rejected summed log-probs (B,) each, from one forward over both (2B rows)."""
    prompts = list(batch["prompt_input_ids"])
    n = len(prompts)
    t = collate(
        prompts + prompts,
        list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"]),
        pad_token_id,
    )
    device = next(model.parameters()).device
    logits = model(
        input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)
    ).logits
    logps = sequence_logps(logits, t["labels"].to(device))
    return logps[:n], logps[n:], t


def dpo_step_loss(
    model, batch: dict, pad_token_id: int, cfg: dict, reference_model=None
) -> tuple[torch.Tensor, dict]:
    """DPO (+ alpha * NLL on chosen) of one micro-batch; chosen and rejected in one forward.

    The reference log-probs come from the batch (cached), or, when `reference_model` is given
    (live mode, for checks and benchmarks), from its forward on the same tokens.
    """
    chosen_logps, rejected_logps, t = _pair_logps(model, batch, pad_token_id)
    n = chosen_logps.shape[0]
    device = chosen_logps.device
    if reference_model is None:
        ref_chosen = torch.tensor(np.array(batch["ref_chosen_logps"]), dtype=torch.float64,
                                  device=device)
        ref_rejected = torch.tensor(np.array(batch["ref_rejected_logps"]), dtype=torch.float64,
                                    device=device)
    else:
        with torch.inference_mode():
            ref_chosen, ref_rejected, _ = _pair_logps(reference_model, batch, pad_token_id)
        ref_chosen, ref_rejected = ref_chosen.clone(), ref_rejected.clone()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=cfg["beta"],
        loss_type=cfg["loss_type"],
        label_smoothing=cfg["label_smoothing"],
    )
    nll = nll_loss(chosen_logps, t["completion_lengths"][:n].to(device))
    loss = losses.mean() + cfg["alpha"] * nll.mean()
    metrics = {
        "loss": loss.item(),
        "dpo_loss": losses.mean().item(),
        "nll_loss": nll.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
        "num_tokens": float(t["attention_mask"].sum()),
    }
    return loss, metrics


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the policy (DESIGN.md): the log-probs DPO compares must be deterministic,
    or policy and reference differ at step 0 by noise alone."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # HF attention modules apply a float `attention_dropout` functionally in train mode.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be constant, linear or cosine, got {schedule!r}")


def _mean_across_workers(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    out = {k: v / world_size for k, v in zip(keys, t.tolist(), strict=True)}
    out["num_tokens"] = out["num_tokens"] * world_size  # a sum, not a mean
    return out


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line a crash left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _Logger:
    """Rank 0's metrics sink: one JSON line per logging step plus TensorBoard scalars.

    With a URI `run_dir` both are written in a local directory on this worker's node and
    uploaded by `sync()` (at every checkpoint and at the end); a resumed run downloads them
    first."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int):
        self.enabled = enabled
        if not enabled:
            return
        self.remote = run_dir if storage.is_uri(run_dir) else None
        if self.remote:
            run_dir = tempfile.mkdtemp(prefix="odpo-metrics-")
            for f in storage.list_files(self.remote):
                rel = storage.relative(f, self.remote)
                if rel == "metrics.jsonl" or rel.startswith("tensorboard/"):
                    storage.copy(f, str(Path(run_dir) / rel))
        self.local = Path(run_dir)
        self.local.mkdir(parents=True, exist_ok=True)
        self.path = self.local / "metrics.jsonl"
        if self.path.exists():  # a resumed run keeps the lines before its checkpoint
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _step_of(line) is not None and _step_of(line) < resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.local / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def sync(self) -> None:
        """Upload metrics.jsonl and the TensorBoard files to a URI run_dir."""
        if not (self.enabled and self.remote):
            return
        self.tb.flush()
        for f in sorted(self.local.rglob("*")):
            if f.is_file():
                storage.copy(str(f), storage.join(self.remote, str(f.relative_to(self.local))))

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.sync()
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)


def _save_checkpoint(model, tokenizer, optimizer, scheduler, step: int, epoch: int, path: str):
    unwrapped = model.module if hasattr(model, "module") else model
    unwrapped.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
        },
        os.path.join(path, STATE_FILE),
    )


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train entry point. `cfg` is the entry point's config as a dict, plus `total_steps`."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    if cfg["torch_threads"] > 0:
        torch.set_num_threads(cfg["torch_threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        ckpt_dir = checkpoint.to_directory()
        model_path = ckpt_dir
        state = torch.load(os.path.join(ckpt_dir, STATE_FILE), weights_only=True)
    else:
        model_path = storage.local_copy(cfg["model"])  # a URI: this node's copy
    # Never the checkpoint's own code, never pickle (the driver checked: io.check_checkpoint).
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True)
    disable_dropout(model)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    model = ray.train.torch.prepare_model(model)
    reference_model = None
    if cfg.get("reference") == "live":
        reference_model = AutoModelForCausalLM.from_pretrained(
            storage.local_copy(cfg["reference_model"]), dtype=dtype, trust_remote_code=False,
            use_safetensors=True,
        )
        reference_model.eval().requires_grad_(False)
        disable_dropout(reference_model)
        reference_model.to(ray.train.torch.get_device())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95)
    )
    total_steps = cfg["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, cfg["warmup_steps"], total_steps, cfg["lr_schedule"]),
    )
    step, start_epoch = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch = state["step"], state["epoch"]

    accum = cfg["grad_accum"]
    micro = cfg["batch_size"] // (world * accum)
    logger = _Logger(cfg["run_dir"], rank == 0, step)
    shard = ray.train.get_dataset_shard("train")
    bar = tqdm(total=total_steps, desc=f"{cfg['objective']} steps") if rank == 0 else None
    if bar is not None and step:
        bar.update(step)
    window: list[dict] = []
    t_window = time.perf_counter()
    done = step >= total_steps
    for epoch in range(start_epoch, cfg["epochs"]):
        if done:
            break
        # On resume, skip the micro-batches this epoch already trained on.
        skip = (step - epoch * cfg["steps_per_epoch"]) * accum if epoch == start_epoch else 0
        micro_index = 0
        for batch in shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True):
            if skip > 0:
                skip -= 1
                continue
            last_micro = (micro_index + 1) % accum == 0
            sync = model.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
            with sync:
                if cfg["objective"] == "sft":
                    loss, metrics = sft_step_loss(model, batch, pad_id)
                else:
                    loss, metrics = dpo_step_loss(model, batch, pad_id, cfg, reference_model)
                (loss / accum).backward()
            window.append(metrics)
            micro_index += 1
            if not last_micro:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf")
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % cfg["log_every"] == 0 or step + 1 == total_steps:
                elapsed = time.perf_counter() - t_window
                avg = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                avg["num_tokens"] = float(np.sum([m["num_tokens"] for m in window]))
                avg = _mean_across_workers(avg, world)
                avg.update(
                    {"epoch": epoch, "learning_rate": lr, "grad_norm": float(grad_norm),
                     "tokens_per_s": avg.pop("num_tokens") / max(elapsed, 1e-9),
                     "step_time_s": elapsed / (len(window) / accum),
                     "peak_rss_mb": _peak_rss_mb()}
                )
                logger.log(step, avg)
                window, t_window = [], time.perf_counter()
            step += 1
            done = step >= total_steps
            # ~100 bar updates a run: each one is a log line when stdout is not a terminal
            if bar is not None and (step % max(1, total_steps // 100) == 0 or done):
                bar.update(step - bar.n)
            save_now = cfg["save_every"] > 0 and step % cfg["save_every"] == 0
            if done or save_now:
                logger.sync()
                _report(model, tokenizer, optimizer, scheduler, step, epoch, rank, {"step": step})
            if done:
                break
    logger.close()
    if bar is not None:
        bar.close()


def _report(model, tokenizer, optimizer, scheduler, step, epoch, rank, metrics):
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            _save_checkpoint(model, tokenizer, optimizer, scheduler, step, epoch, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)

