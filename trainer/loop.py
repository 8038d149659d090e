"""The one training loop behind `odpo sft` and `odpo train`: Ray Train `train_loop_per_worker`.

The objective is a keyword: "sft" (NLL on response tokens) or "dpo" (preference loss from
`trainer.loss` on the policy's log-probs and the batch's cached reference log-probs, plus `alpha`
times the chosen NLL). Everything else (data order, optimiser, schedule, accumulation, clipping,
DDP, logging, checkpoints, resume) is shared.

Data order is planned, not streamed: every worker holds the whole training set in the same row
order, and `plan_batches` names the rows of each micro-batch. An epoch is a permutation of the rows
seeded by (seed, epoch); optimizer step k of the epoch takes its rows k·batch_size onwards
(`batch_size` rows in all, the rows after the epoch's last full batch are left out); worker w
trains on the w-th contiguous slice of them, cut into `grad_accum` equal micro-batches. So every
step has exactly `grad_accum` micro-batches on every worker, the loss of a step does not depend on
`num_workers` or `grad_accum`, each epoch has its own order, and a run resumed at step s trains on
the rows the uninterrupted run would have.

With a token budget (DPO's `max_tokens_per_batch` > 0, `grad_accum` 1) the same slice is cut
instead into micro-batches of whole pairs whose positions stay within the budget
(`token_budget_batches`): their number changes from step to step, never from worker to worker
(FSDP's all-gathers and DDP's reduce are collectives), and each micro-batch's loss is weighted by
its share of the step's pairs, so the step's loss is still the mean over its `batch_size` pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.checkpoint import disable_dropout
from trainer import lora, packing
from trainer.collate import collate
from trainer.logps import TokenLogps
from trainer.loss import (
    LABEL_SMOOTHING_LOSS_TYPES,
    dpo_loss,
    kto_kl_baseline,
    kto_loss,
    nll_loss,
    reference_free,
    unpaired,
    weighted_loss,
)

STATE_FILE = "trainer_state.pt"


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The row order of one epoch, (num_rows,) int: a permutation drawn from (seed, epoch), so
    every worker and every resumed run draws the same one and each epoch a new one; the stored
    order when `shuffle` is off."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def plan_batches(
    num_rows: int, *, batch_size: int, grad_accum: int, world: int, rank: int, seed: int,
    shuffle: bool, start_step: int, total_steps: int, max_tokens_per_batch: int = 0,
    costs: np.ndarray | None = None, layout: str = "padded",
) -> Iterator[tuple[int, int, np.ndarray, list[np.ndarray]]]:
    """Rows of the optimizer steps `start_step`..`total_steps`-1, for worker `rank` of `world`.

    Yields (step, epoch, step_rows, micro_rows): step_rows (batch_size,) are the step's rows on all
    workers, micro_rows this worker's `grad_accum` micro-batches of batch_size / (world ·
    grad_accum) rows each. An epoch has num_rows // batch_size steps (drop_last on the global
    batch: which rows are left over changes with the epoch's order).

    With `max_tokens_per_batch` > 0 (and `grad_accum` 1), micro_rows are instead the worker's
    share cut under that token budget (`token_budget_batches`, from each row's
    `packing.pair_cost` `costs` in `layout`): as many micro-batches on every worker, of
    unequal sizes.
    """
    if batch_size % (world * grad_accum):
        raise ValueError(f"batch_size {batch_size} is not divisible by world {world} x "
                         f"grad_accum {grad_accum}")
    if max_tokens_per_batch and (grad_accum != 1 or costs is None):
        raise ValueError("max_tokens_per_batch needs grad_accum 1 and the rows' costs")
    steps_per_epoch = num_rows // batch_size
    if steps_per_epoch == 0 and start_step < total_steps:
        raise ValueError(f"{num_rows} rows are fewer than one batch of {batch_size}")
    per_worker = batch_size // world
    order, order_epoch = None, None
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(num_rows, seed, epoch, shuffle), epoch
        step_rows = order[k * batch_size:(k + 1) * batch_size]
        if max_tokens_per_batch:
            micro = token_budget_batches(step_rows, costs, world=world, layout=layout,
                                         max_tokens_per_batch=max_tokens_per_batch)[rank]
        else:
            micro = np.split(step_rows[rank * per_worker:(rank + 1) * per_worker], grad_accum)
        yield step, epoch, step_rows, micro


def token_budget_batches(step_rows: np.ndarray, costs: np.ndarray, *, world: int, layout: str,
                         max_tokens_per_batch: int) -> list[list[np.ndarray]]:
    """Every worker's micro-batches of one step under a token budget, in rank order: worker w's
    contiguous slice of `step_rows` (as without a budget) cut into whole pairs whose
    `packing.batch_cost` (from `costs`, each table row's `packing.pair_cost` in `layout`) stays
    within `max_tokens_per_batch` (`packing.plan_pair_batches`; a pair over the budget is a
    micro-batch of its own). Then every worker's micro-batches are split further
    (`packing.split_batches`) to the most any worker has, so that all run the same number: the
    collectives of a step (FSDP's all-gathers, each forward; the gradient reduce) pair up.
    Always possible: no worker has more micro-batches than pairs, and every worker has as many
    pairs. Every worker computes every worker's plan from the same rows: no communication.
    """
    per_worker = len(step_rows) // world
    shares = [step_rows[w * per_worker:(w + 1) * per_worker] for w in range(world)]
    bins = [packing.plan_pair_batches(costs[rows], layout, max_tokens_per_batch)
            for rows in shares]
    count = max(len(b) for b in bins)
    return [[rows[b] for b in packing.split_batches(worker_bins, costs[rows], layout, count)]
            for rows, worker_bins in zip(shares, bins, strict=True)]


def target_tokens(prompt_lengths: np.ndarray, completion_lengths: np.ndarray) -> np.ndarray:
    """Completion tokens the NLL of each row counts, (B,): all of them, but a first one with no
    prompt before it (no position predicts it; `per_token_logps` shifts by one)."""
    return completion_lengths - (prompt_lengths == 0)


def _token_logps(model, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) token log-probs and mask of a `collate` batch, on the model's device: through
    `model` when it is a `TokenLogps` (or DDP's wrapper of one, as in training), else through a
    lean `TokenLogps` of the bare causal LM."""
    forward = model if isinstance(getattr(model, "module", model), TokenLogps) else TokenLogps(
        model)
    device = next(model.parameters()).device
    return forward(t["input_ids"].to(device), t["attention_mask"].to(device),
                   t["labels"].to(device))


def causal_lm(model):
    """The Hugging Face model inside DDP's and `TokenLogps`'s wrappers (under LoRA, the
    PeftModel)."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, TokenLogps) else model


def sft_step_loss(
    model, batch: dict, pad_token_id: int, step_tokens: int | None = None, world: int = 1
) -> tuple[torch.Tensor, dict]:
    """NLL of one micro-batch's completion tokens, scaled for its optimizer step.

    A step's loss is the token mean of the NLL over all `step_tokens` completion tokens of the
    step (every micro-batch on every worker). Micro-batch gradients are summed (accumulation) and
    DDP averages them over `world` workers, so this micro-batch's term is −Σ log p · world /
    step_tokens, and the step's gradient does not depend on how it is cut into micro-batches and
    workers. Without `step_tokens`: this micro-batch's own token mean.

    Returns (loss to backward, metrics); metrics["loss"] is −Σ log p / step_tokens, this
    micro-batch's share of the step's loss (summed over the step's micro-batches on all workers,
    the shares are the step's token-mean NLL), and num_tokens its input tokens.
    """
    t = collate(batch["prompt_input_ids"], batch["completion_input_ids"], pad_token_id)
    token_logps, mask = _token_logps(model, t)
    n_tokens = max(int(mask.sum()) if step_tokens is None else step_tokens, 1)
    nll = -token_logps.sum()
    loss = nll * (world / n_tokens)
    return loss, {"loss": nll.item() / n_tokens, "num_tokens": float(t["attention_mask"].sum())}


def _pair_logps(model, batch: dict, pad_token_id: int, layout: str = "padded",
                max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Chosen and rejected summed log-probs (B,) each, from one forward over both (2B rows;
    `packed` / `shared_prompt`: `trainer.packing`, rows of at most `max_tokens` tokens)."""
    if layout != "padded":
        return packing.pair_logps(
            model, list(batch["prompt_input_ids"]), list(batch["chosen_input_ids"]),
            list(batch["rejected_input_ids"]), layout=layout, max_tokens=max_tokens,
            pad_token_id=pad_token_id)
    prompts = list(batch["prompt_input_ids"])
    n = len(prompts)
    t = collate(prompts + prompts,
                list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"]), pad_token_id)
    token_logps, _ = _token_logps(model, t)
    # summed in float64: see trainer.logps.sequence_logps
    logps = token_logps.double().sum(dim=-1)
    return logps[:n], logps[n:], t


def resolve_layout(layout: str, model) -> str:
    """The layout a DPO forward uses: `auto` is `shared_prompt` (the prompt computed once, no
    padding: 2.25x the tokens/s of `padded` in bench/BENCHMARKS.md) when the model's attention
    takes a 4D mask (sdpa, eager), else `padded` (flash attention takes none); `padded`,
    `packed` and `shared_prompt` force one. Every layout gives the same log-probs to float32
    rounding (tests/test_packing.py)."""
    if layout != "auto":
        return layout
    implementation = getattr(causal_lm(model).config, "_attn_implementation", None)
    return "shared_prompt" if implementation in ("sdpa", "eager") else "padded"


def dpo_step_loss(
    model, batch: dict, pad_token_id: int, cfg: dict, ref_model=None
) -> tuple[torch.Tensor, dict]:
    """DPO (+ alpha * NLL on chosen) of one micro-batch; chosen and rejected in one forward.

    `cfg["loss_type"]` is one loss (`dpo_loss`) or a list of them, summed with
    `cfg["loss_weights"]` (`weighted_loss`; each one's mean is logged as `loss/<name>`).
    The reference log-probs come from the batch (cached), or, when `ref_model` is given
    (live mode, for checks and benchmarks), from its forward on the same tokens.
    """
    layout = resolve_layout(cfg.get("layout", "padded"), model)
    chosen_logps, rejected_logps, t = _pair_logps(model, batch, pad_token_id, layout)
    n = chosen_logps.shape[0]
    device = chosen_logps.device
    lengths = t["completion_lengths"].to(device)  # chosen rows, then rejected rows
    if reference_free(cfg["loss_type"]):  # simpo, orpo, sft, nll: no reference at all
        ref_chosen = ref_rejected = None
    elif ref_model is None:
        ref_chosen, ref_rejected = (
            torch.tensor(np.array(batch[k]), dtype=torch.float64, device=device)
            for k in ("ref_chosen_logps", "ref_rejected_logps"))
    else:
        with torch.inference_mode():
            ref_chosen, ref_rejected, _ = _pair_logps(
                ref_model, batch, pad_token_id, resolve_layout(layout, ref_model))
        ref_chosen, ref_rejected = ref_chosen.clone(), ref_rejected.clone()
    inputs = (chosen_logps, rejected_logps, ref_chosen, ref_rejected)
    kwargs = {"beta": cfg["beta"], "chosen_lengths": lengths[:n],
              "rejected_lengths": lengths[n:]}
    terms = {}
    if isinstance(cfg["loss_type"], str):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            *inputs, loss_type=cfg["loss_type"], label_smoothing=cfg["label_smoothing"], **kwargs)
    else:
        losses, chosen_rewards, rejected_rewards = weighted_loss(
            *inputs, loss_types=cfg["loss_type"], loss_weights=cfg.get("loss_weights"),
            label_smoothing=cfg["label_smoothing"], **kwargs)
        with torch.no_grad():  # each listed loss alone, unweighted, for the metrics
            for name in cfg["loss_type"]:
                eps = cfg["label_smoothing"] if name in LABEL_SMOOTHING_LOSS_TYPES else 0.0
                terms[f"loss/{name}"] = dpo_loss(
                    *(x if x is None else x.detach() for x in inputs), loss_type=name,
                    label_smoothing=eps, **kwargs)[0].mean().item()
    nll = nll_loss(chosen_logps, lengths[:n])
    loss = losses.mean() + cfg["alpha"] * nll.mean()
    metrics = {
        "loss": loss.item(),
        "dpo_loss": losses.mean().item(),
        **terms,
        "nll_loss": nll.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
        # the pairs' tokens, each prompt counted with both responses whatever the layout
        # computed (shared_prompt: once), so that tokens_per_s compares across layouts
        "num_tokens": float(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
            batch["prompt_input_ids"], batch["chosen_input_ids"], batch["rejected_input_ids"],
            strict=True))),
    }
    return loss, metrics


def _unpaired_logps(model, batch: dict, pad_token_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed log-probs (B,) of each row's completion and, without autograd, of its mismatched
    KL completion (`kl_completion_input_ids`, after the same prompt), and the input tokens of
    both forwards. The KL forward comes first and keeps no graph, as in TRL's KTOTrainer."""
    prompts = list(batch["prompt_input_ids"])
    with torch.no_grad():
        kl = collate(prompts, list(batch["kl_completion_input_ids"]), pad_token_id)
        kl_logps = _token_logps(model, kl)[0].double().sum(dim=-1)
    t = collate(prompts, list(batch["completion_input_ids"]), pad_token_id)
    logps = _token_logps(model, t)[0].double().sum(dim=-1)  # float64 sum, as `_pair_logps`
    return logps, kl_logps, int(t["attention_mask"].sum() + kl["attention_mask"].sum())


def gather_across_workers(x: torch.Tensor) -> torch.Tensor:
    """(B,) from every worker, concatenated in rank order: (world·B,); `x` itself without a
    process group. Every worker's micro-batch has the same B (`plan_batches` with `grad_accum`;
    a token budget, whose micro-batches differ in size, is refused for kto: `trainer.dpo`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def kto_step_loss(
    model, batch: dict, pad_token_id: int, cfg: dict, ref_model=None
) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024) of one micro-batch of unpaired rows, as TRL 1.16's
    KTOTrainer computes it: the reference point z₀ = max(0, mean(π − ref)) over the rows'
    mismatched (prompt, KL completion) pairs of this micro-batch on *every* worker (TRL gathers
    the per-process means and averages them; the workers' micro-batches are equal in size, so
    that is this mean), then `kto_loss` with `desirable_weight` / `undesirable_weight`, averaged
    over the rows.

    The reference log-probs come from the batch (`ref_logps`, `ref_kl_logps`, cached by `odpo
    precompute`), or from `ref_model`'s forward (live mode). The rewards and log-probs are
    logged as TRL names them (`rewards/chosen` over desirable rows, `rewards/rejected` over
    undesirable ones, `kl` = z₀), as sums and counts that `pooled_means` turns into means over
    all the rows of a logging window.
    """
    logps, kl_logps, num_tokens = _unpaired_logps(model, batch, pad_token_id)
    device = logps.device
    if ref_model is None:
        ref_logps, ref_kl_logps = (
            torch.tensor(np.array(batch[k]), dtype=torch.float64, device=device)
            for k in ("ref_logps", "ref_kl_logps"))
    else:
        with torch.inference_mode():
            ref_logps, ref_kl_logps, _ = _unpaired_logps(ref_model, batch, pad_token_id)
        ref_logps, ref_kl_logps = ref_logps.clone(), ref_kl_logps.clone()
    desirable = torch.tensor(np.array(batch["label"], dtype=bool), device=device)
    z0 = kto_kl_baseline(gather_across_workers(kl_logps), gather_across_workers(ref_kl_logps))
    losses, rewards = kto_loss(logps, ref_logps, desirable, z0, beta=cfg["beta"],
                               desirable_weight=cfg.get("desirable_weight", 1.0),
                               undesirable_weight=cfg.get("undesirable_weight", 1.0))
    loss = losses.mean()
    metrics = {"loss": loss.item(), "kl": float(z0), "num_tokens": float(num_tokens)}
    for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
        metrics[f"_count/{side}"] = float(rows.sum())
        metrics[f"_sum/rewards/{side}"] = float(rewards[rows].sum())
        metrics[f"_sum/logps/{side}"] = float(logps.detach()[rows].sum())
    return loss, metrics


def pooled_means(metrics: dict[str, float]) -> dict[str, float]:
    """A log line's metrics with every `_sum/<what>/<side>` divided by its `_count/<side>` (the
    mean over all the window's rows of that side, none when it had none), and
    `rewards/margins` = chosen − rejected when both exist (TRL's KTO metrics). Other metrics
    pass unchanged."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("_sum/", "_count/"))}
    for key, total in metrics.items():
        if key.startswith("_sum/"):
            name = key[len("_sum/"):]
            count = metrics[f"_count/{name.rsplit('/', 1)[1]}"]
            if count > 0:
                out[name] = total / count
    if "_sum/rewards/chosen" in metrics and {"rewards/chosen", "rewards/rejected"} <= set(out):
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


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


def sum_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """All-reduce SUM of `values` over the workers (as they are without a process group).

    The tensor lives on `device`, the model's: under `use_gpu` Ray Train's process group is NCCL,
    which serves CUDA tensors only ("No backend type associated with device type cpu")."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def window_metrics(window: list[dict[str, float]], world: int, device: torch.device) -> dict:
    """The metrics of one log line from this worker's shares of the steps since the last one
    (`accumulate_gradients`): each step's value (its shares summed over micro-batches and
    workers) averaged over the steps; num_tokens summed; micro_batches per step per worker."""
    totals = sum_across_workers({k: sum(s[k] for s in window) for k in window[0]}, device)
    out = {k: v / len(window) for k, v in totals.items()}
    out["num_tokens"] = totals["num_tokens"]
    out["micro_batches"] = totals["micro_batches"] / (len(window) * world)
    return out


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line a crash left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _Logger:
    """Rank 0's metrics sink: one JSON line per logging step, TensorBoard scalars and the
    progress bar (a no-op on the other ranks).

    With a URI `run_dir` the metrics are written in a local directory on this worker's node and
    uploaded by `sync()` (at every checkpoint and at the end); a resumed run downloads them
    first."""

    def __init__(self, cfg: dict, enabled: bool, resume_step: int):
        self.enabled, self.total = enabled, cfg["total_steps"]
        if not enabled:
            return
        run_dir = cfg["run_dir"]
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
        from ray.experimental.tqdm_ray import tqdm
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.local / "tensorboard"), purge_step=resume_step)
        self.bar = tqdm(total=self.total, desc=f"{cfg['objective']} steps")
        if resume_step:
            self.bar.update(resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def progress(self, done: int) -> None:
        """~100 bar updates a run: each one is a log line when stdout is not a terminal."""
        if self.enabled and (done % max(1, self.total // 100) == 0 or done == self.total):
            self.bar.update(done - self.bar.n)

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
            self.bar.close()


def make_optimizer(model, cfg: dict):
    """AdamW over the trainable parameters (all of them; under LoRA the adapters only) and its
    LambdaLR schedule (`lr_lambda`) over `cfg["total_steps"]` steps."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
        weight_decay=cfg["weight_decay"], betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, cfg["warmup_steps"], cfg["total_steps"], cfg["lr_schedule"]),
    )
    return optimizer, scheduler


def take_rows(table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of an Arrow table as a numpy batch (list columns: object arrays of arrays), the
    format Ray Data's `iter_batches(batch_format="numpy")` gives."""
    sub = table.take(rows)
    return {name: sub[name].to_numpy(zero_copy_only=False) for name in sub.column_names}


def accumulate_gradients(
    model, micro_batches: list[dict], cfg: dict, pad_token_id: int, *, world: int,
    step_tokens: int = 0, ref_model=None,
) -> dict[str, float]:
    """Forward and backward of this worker's micro-batches of one optimizer step; DDP all-reduces
    the summed gradients on the last one only (`no_sync` before it).

    Afterwards the gradients are those of the step's loss over all workers: SFT, the token mean of
    the NLL over the step's `step_tokens` completion tokens (`sft_step_loss`); DPO, the mean over
    the step's pairs. Micro-batch i's mean loss, over its n_i of the worker's m pairs (m =
    batch_size / world on every worker), is weighted by n_i / m (divided by m / n_i, which is
    `grad_accum` exactly when the micro-batches are equal), and DDP averages the workers: the
    gradient of Σ n_i · mean_i / batch_size, the mean over the step's pairs, however they are
    cut (`grad_accum` or a token budget). Returns this worker's shares of the step's metrics:
    summed over all workers they are the step's values (means weighted the same way);
    num_tokens counts input tokens, micro_batches the micro-batches that went into the
    gradient.
    """
    accum = len(micro_batches)
    rows = [len(batch["prompt_input_ids"]) for batch in micro_batches]
    shares: dict[str, float] = {"micro_batches": 0.0}
    for i, batch in enumerate(micro_batches):
        no_sync = hasattr(model, "no_sync") and i < accum - 1  # DDP: all-reduce on the last
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last
            model.set_requires_gradient_sync(i == accum - 1)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            if cfg["objective"] == "sft":
                loss, metrics = sft_step_loss(model, batch, pad_token_id, step_tokens, world)
                loss.backward()
            else:
                step_loss = kto_step_loss if unpaired(cfg["loss_type"]) else dpo_step_loss
                loss, metrics = step_loss(model, batch, pad_token_id, cfg, ref_model)
                parts = sum(rows) / rows[i]  # accum for equal micro-batches, as a float
                (loss / parts).backward()
                metrics = {k: v if k == "num_tokens" else v / (parts * world)
                           for k, v in metrics.items()}
        for k, v in metrics.items():
            shares[k] = shares.get(k, 0.0) + v
        shares["micro_batches"] += 1
    return shares


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> float:
    """Clip the global gradient norm to `grad_clip` (0: no clipping), step the optimizer and the
    schedule, clear the gradients; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def train_steps(
    model, optimizer, scheduler, table, cfg: dict, *, rank: int, world: int, start_step: int,
    pad_token_id: int, log: Callable[[int, dict], None], after_step: Callable[[int, int], None],
    ref_model=None,
) -> None:
    """Optimizer steps `start_step`..`cfg["total_steps"]`-1 on this worker, without Ray (tests
    run it under plain torch.distributed).

    `table` is the whole training set (an Arrow table), in the same row order on every worker;
    `plan_batches` picks the rows. `log(step, metrics)` is called on every rank at logging steps
    (its all-reduce is collective); `after_step(steps_done, epoch)` after each update.

    With `cfg["max_tokens_per_batch"]` > 0 (DPO pairs only) the micro-batches are cut under that
    token budget in the policy's layout (`resolve_layout`), and each log line also has
    over_budget_pairs: the pairs a step whose cost alone exceeds the budget, each trained in a
    micro-batch of its own.
    """
    device = next(model.parameters()).device
    targets = None
    if cfg["objective"] == "sft":  # the step's token count, for its token-mean NLL
        targets = target_tokens(pc.list_value_length(table["prompt_input_ids"]).to_numpy(),
                                pc.list_value_length(table["completion_input_ids"]).to_numpy())
    budget = cfg.get("max_tokens_per_batch", 0)
    costs, layout = None, "padded"
    if budget:
        if cfg["objective"] != "dpo" or unpaired(cfg["loss_type"]):
            raise ValueError("max_tokens_per_batch cuts DPO pairs, not sft or kto rows")
        layout = resolve_layout(cfg.get("layout", "padded"), model)
        costs = packing.pair_cost(*(
            pc.list_value_length(table[f"{name}_input_ids"]).to_numpy()
            for name in ("prompt", "chosen", "rejected")), layout)
    total_steps = cfg["total_steps"]
    plan = plan_batches(
        table.num_rows, batch_size=cfg["batch_size"], grad_accum=cfg["grad_accum"], world=world,
        rank=rank, seed=cfg["seed"], shuffle=cfg["shuffle"], start_step=start_step,
        total_steps=total_steps, max_tokens_per_batch=budget, costs=costs, layout=layout,
    )
    window: list[dict] = []
    t_window = time.perf_counter()
    for step, epoch, step_rows, micro_rows in plan:
        window.append(accumulate_gradients(
            model, [take_rows(table, rows) for rows in micro_rows], cfg, pad_token_id,
            world=world, step_tokens=0 if targets is None else int(targets[step_rows].sum()),
            ref_model=ref_model,
        ))
        if budget:
            window[-1]["over_budget_pairs"] = float(sum(
                (costs[rows] > budget).sum() for rows in micro_rows))
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(model, optimizer, scheduler, cfg["grad_clip"])
        if step % cfg["log_every"] == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - t_window
            metrics = pooled_means(window_metrics(window, world, device))
            metrics.update(
                {"epoch": epoch, "learning_rate": lr, "grad_norm": grad_norm,
                 "tokens_per_s": metrics.pop("num_tokens") / max(elapsed, 1e-9),
                 "step_time_s": elapsed / len(window),
                 # peak resident memory of this worker so far (Linux reports KiB)
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            )
            log(step, metrics)
            window, t_window = [], time.perf_counter()
        after_step(step + 1, epoch)


# --- on a Ray Train worker --------------------------------------------------------------------


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train entry point: load, resume, train, checkpoint. `cfg` is the entry point's config
    as a dict, plus `objective`, `run_dir`, `total_steps` and `steps_per_epoch`
    (`launch.plan_steps`)."""
    import ray.train
    from transformers import AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["torch_threads"] or max(1, math.ceil(cfg["cpus_per_worker"])))
    start, state = start_point(cfg)
    # Never the checkpoint's own code, never pickle (the driver checked: check_checkpoint).
    tokenizer = AutoTokenizer.from_pretrained(start, trust_remote_code=False)
    model, ref_model = load_models(cfg, start, resumed=state is not None)
    optimizer, scheduler = make_optimizer(model, cfg)
    step = resume(model, optimizer, scheduler, state)
    table = read_training_set(cfg, rank)
    logger = _Logger(cfg, rank == 0, step)

    def after_step(done: int, epoch: int) -> None:
        logger.progress(done)
        if done == cfg["total_steps"] or (cfg["save_every"] > 0 and done % cfg["save_every"] == 0):
            logger.sync()
            report_checkpoint(model, tokenizer, optimizer, scheduler, done, epoch, rank)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_steps(model, optimizer, scheduler, table, cfg, rank=rank, world=world, start_step=step,
                pad_token_id=pad_id, log=logger.log, after_step=after_step,
                ref_model=ref_model)
    logger.close()


def start_point(cfg: dict) -> tuple[str, dict | None]:
    """Where this worker starts: the latest Ray Train checkpoint (a HF directory) and its trainer
    state, or on a fresh run this node's copy of `cfg["model"]` (a URI is downloaded) and None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return storage.local_copy(cfg["model"]), None
    path = checkpoint.to_directory()
    return path, torch.load(os.path.join(path, STATE_FILE), weights_only=True)


def _from_pretrained(path: str, cfg: dict, dtype: str | None = None):
    """A causal LM in `dtype` (default `cfg["dtype"]`) with dropout off, from safetensors only
    and never with the checkpoint's own code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype or cfg["dtype"]), trust_remote_code=False,
        use_safetensors=True)
    disable_dropout(model)
    return model


def compute_dtype(cfg: dict) -> torch.dtype | None:
    """bfloat16 when the config trains in mixed precision (`dtype: bfloat16`), else None."""
    return torch.bfloat16 if cfg["dtype"] == "bfloat16" else None


def load_policy(cfg: dict, path: str, resumed: bool = False):
    """The causal LM to train, from `path` (`start_point`'s). Under LoRA (`cfg["lora"]`), the
    base model with adapters: fresh ones, or on a resumed run the checkpoint's on the base model
    (`cfg["model"]`, not the checkpoint's merged weights), so that the optimizer state restored
    matches the adapter parameters."""
    if not lora.enabled(cfg):  # trained weights stay float32: the master copy of mixed precision
        return _from_pretrained(path, cfg, "float32")
    # LoRA: the frozen base in cfg["dtype"], the adapters float32 (PEFT's default)
    if not resumed:
        return lora.add_lora(_from_pretrained(path, cfg), cfg["lora"], base=cfg["model"])
    return lora.load_lora(_from_pretrained(storage.local_copy(cfg["model"]), cfg), path)


def wrap_policy(model, cfg: dict, device: torch.device, world: int):
    """The policy as the module training calls: `TokenLogps` (so that the lean forward runs
    inside the wrappers' hooks) on `device`, then for `strategy: ddp` DDP over `world` workers
    (none for one), for `fsdp` FSDP2's `fully_shard` on every decoder layer and the root:
    parameters, gradients and AdamW state sharded across the workers.

    Mixed precision (`dtype: bfloat16`): the weights stay float32 and the forward runs in
    bfloat16 (DDP: autocast; FSDP: its MixedPrecisionPolicy casts the gathered parameters,
    gradients are reduced in float32); log-softmax is float32 either way (`trainer.logps`)."""
    bf16 = compute_dtype(cfg)
    if cfg.get("strategy", "ddp") != "fsdp":
        wrapped = TokenLogps(model.to(device), autocast_dtype=bf16)
        if world == 1:
            return wrapped
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32 if bf16 else None)
    wrapped = TokenLogps(model.to(device))
    layers = set(getattr(model, "_no_split_modules", None) or ())  # HF: the decoder layer class
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mp_policy=policy)
    fully_shard(wrapped, mp_policy=policy)
    return wrapped


def load_models(cfg: dict, path: str, resumed: bool = False):
    """(policy, reference): the policy (`load_policy`) in train mode, wrapped (`wrap_policy`);
    with `ref_logps="live"` the frozen reference model on this worker's device, else None."""
    import ray.train
    import ray.train.torch

    model = load_policy(cfg, path, resumed)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    device = ray.train.torch.get_device()
    model = wrap_policy(model, cfg, device, ray.train.get_context().get_world_size())
    if cfg.get("ref_logps") != "live":
        return model, None
    reference = _from_pretrained(storage.local_copy(cfg["ref_model"]), cfg)
    reference.eval().requires_grad_(False)
    return model, reference.to(device)


def is_sharded(model) -> bool:
    """Whether `model` is FSDP2-sharded (its state is gathered collectively)."""
    return hasattr(model, "set_requires_gradient_sync")


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(model state dict of the causal LM, optimizer state dict), whole, on CPU. Collective
    under FSDP (every rank must call it); else the local state."""
    if not is_sharded(model):
        return causal_lm(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    prefix = "model."  # TokenLogps holds the causal LM as `.model`
    weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Restore a `full_state` optimizer state dict: each FSDP rank takes its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def resume(model, optimizer, scheduler, state: dict | None) -> int:
    """The step to go on from: 0 on a fresh run, else a checkpoint's, with the optimizer's and
    the schedule's state restored."""
    if state is None:
        return 0
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def read_training_set(cfg: dict, rank: int):
    """The whole training set as one Arrow table in its stored order, from the blocks that
    `launch.fit` passes by reference (`train_blocks`); checked against the driver's plan.

    Every worker holds it (token ids and, for DPO, two floats a pair) and indexes it by the plan:
    one Arrow copy per worker, 4 bytes a token id for the precompute shards' int32 (8 for SFT's
    int64), e.g. ~0.6 GB for 100k pairs of 1,500 tokens. Ray Data's streaming split, which needed
    none, could not give every worker the same number of micro-batches each epoch, nor each epoch
    its own order."""
    import ray

    table = pa.concat_tables(ray.get(cfg["train_blocks"]), promote_options="default")
    if table.num_rows // cfg["batch_size"] != cfg["steps_per_epoch"]:
        raise RuntimeError(f"worker {rank} read {table.num_rows} rows; the driver planned "
                           f"{cfg['steps_per_epoch']} steps of {cfg['batch_size']} an epoch")
    return table


def report_checkpoint(model, tokenizer, optimizer, scheduler, step: int, epoch: int,
                      rank: int) -> None:
    """Report `step` to Ray Train with, from rank 0, a checkpoint: the HF directory
    (`save_pretrained`, what vLLM and the next round load; under LoRA the merged model plus the
    adapter, `lora.save_lora`) and the optimizer's and schedule's state in STATE_FILE, to resume
    from."""
    import ray.train

    weights, optimizer_state = full_state(model, optimizer)  # collective under FSDP
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            lm = causal_lm(model)
            if lora.is_lora(lm):
                lora.save_lora(lm, tmp)
            else:
                lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "step": step, "epoch": epoch}, os.path.join(tmp, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step}, checkpoint=checkpoint)
