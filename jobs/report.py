"""`odpo report RUN_DIR`: a Markdown report with PNG plots of an iterate run.

Reads only what the stages wrote: round_k/eval.json (task reward), round_k/train/metrics.jsonl
(training curves), the stage manifests (the pairs funnel). `--compare OTHER_RUN` overlays a
second run (e.g. the plain-DPO ablation beside DPO+NLL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError

FUNNEL_STAGES = ("samples", "scored", "pairs")


def _rounds(run: str) -> list[int]:
    ks = [int(m.group(1)) for d in storage.children(run)
          if (m := re.fullmatch(r"round_(\d+)", d))]
    return sorted(ks)


def _json(path: str):
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def load_run(run: str | Path) -> dict:
    """Everything the report plots, as plain lists, from a run directory (a path or URI)."""
    run = storage.absolute(run)
    if not storage.is_dir(run):
        raise UserError(f"{run}: no such run directory")
    rounds = _rounds(run)
    if not rounds:
        raise UserError(f"{run}: no round_k directories; is this an `odpo iterate` run?")
    evals, curves, funnel = {}, [], {}
    offset = 0
    for k in rounds:
        rdir = storage.join(run, f"round_{k}")
        if (e := _json(storage.join(rdir, "eval.json"))) is not None:
            evals[k] = e
        metrics = storage.join(rdir, "train", "metrics.jsonl")
        if storage.is_file(metrics):
            text = storage.read_text(metrics)
            lines = [json.loads(x) for x in text.splitlines() if x.strip()]
            for m in lines:
                curves.append({**m, "round": k, "global_step": offset + m["step"]})
            if lines:
                offset += lines[-1]["step"] + 1
        stages = {}
        # A sweep variant's round 1 reads the sweep's shared samples: shared.json says where.
        shared = _json(storage.join(rdir, "shared.json")) or {}
        for stage in FUNNEL_STAGES:
            where = shared.get(stage, storage.join(rdir, stage))
            if (m := _json(storage.join(where, "manifest.json"))) is not None:
                stages[stage] = m
        if stages:
            funnel[k] = stages
    return {"name": storage.name(run), "path": run, "rounds": rounds, "evals": evals,
            "curves": curves, "funnel": funnel}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward(runs: list[dict], path: Path) -> None:
    plt = _plt()
    many = len(runs) > 2  # a sweep: the legend goes beside the plot, not over the curves
    fig, ax = plt.subplots(figsize=(9 if many else 6.5, 4))
    for i, r in enumerate(runs):
        ks = sorted(r["evals"])
        color = f"C{i}"
        ax.plot(ks, [r["evals"][k]["greedy_reward"] for k in ks], "o-", color=color,
                label=f"{r['name']} greedy")
        ax.plot(ks, [r["evals"][k]["sampled_reward"] for k in ks], "s--", color=color,
                alpha=0.7, label=f"{r['name']} sampled")
    ax.set_xlabel("round (0 = initial policy)")
    ax.set_xticks(sorted({k for r in runs for k in r["evals"]}))
    ax.set_ylabel("held-out task reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    ax.set_title("Task reward per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _round_edges(ax, curves):
    for k in sorted({c["round"] for c in curves})[1:]:
        x = min(c["global_step"] for c in curves if c["round"] == k)
        ax.axvline(x, color="grey", lw=0.8, ls=":")


def _metric(line: dict, key: str) -> float:
    """A metric of a log line, NaN where the run's loss does not log it (kto has no
    accuracies, nor chosen rewards in a window without desirable rows)."""
    return line.get(key, float("nan"))


def plot_logps(runs: list[dict], path: Path) -> None:
    """Chosen and rejected log-probs over steps: DPO alone lets the chosen one fall too."""
    plt = _plt()
    cols = min(len(runs), 4)  # a sweep's many runs wrap into rows of four
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, runs, strict=False):
        c = r["curves"]
        if not c:
            ax.set_title(f"{r['name']}: no training metrics")
            continue
        x = [m["global_step"] for m in c]
        ax.plot(x, [_metric(m, "logps/chosen") for m in c], color="C2", label="chosen")
        ax.plot(x, [_metric(m, "logps/rejected") for m in c], color="C3", label="rejected")
        _round_edges(ax, c)
        ax.set_xlabel("training step (all rounds; dotted = new round)")
        ax.set_ylabel("mean summed log-prob")
        ax.set_title(f"{r['name']}: policy log-probs")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rewards(runs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(runs):
        c = r["curves"]
        if not c:
            continue
        x = [m["global_step"] for m in c]
        a1.plot(x, [_metric(m, "rewards/margins") for m in c], color=f"C{i}", label=r["name"])
        a2.plot(x, [_metric(m, "rewards/accuracies") for m in c], color=f"C{i}",
                label=r["name"])
    a1.set_title("rewards/margins")
    a2.set_title("rewards/accuracies")
    a2.set_ylim(0, 1.05)
    for a in (a1, a2):
        a.set_xlabel("training step (all rounds)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def funnel_rows(run: dict) -> list[dict]:
    """Per round: samples, scored and pairs out, and every drop reason with its count."""
    rows = []
    for k, stages in sorted(run["funnel"].items()):
        row = {"round": k}
        for stage in FUNNEL_STAGES:
            if stage in stages:
                m = stages[stage]
                row[stage] = m["rows_out"]
                for reason, n in m.get("dropped", {}).items():
                    row[f"{stage} dropped: {reason}"] = n
        rows.append(row)
    return rows


def plot_funnel(run: dict, path: Path) -> None:
    plt = _plt()
    rows = funnel_rows(run)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(FUNNEL_STAGES))
    for j, stage in enumerate(FUNNEL_STAGES):
        xs = [r["round"] + (j - 1) * width for r in rows]
        ax.bar(xs, [r.get(stage, 0) for r in rows], width=width, label=stage, color=f"C{j}")
    ax.set_xlabel("round")
    ax.set_ylabel("rows")
    ax.set_title(f"{run['name']}: pairs funnel")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_landscape(path: Path, beta: float = 0.1, low: float = 0.05, high: float = 2.0,
                   n: int = 20) -> None:
    """DPO loss over the probability ratios (π/π_ref of chosen, of rejected) with its negative
    gradient field, by autograd through the project's own `dpo_loss` ("Towards Analyzing and
    Understanding the Limitations of DPO", Fig. 1). ∂L/∂ratio = ∓β σ(−βh) / ratio: where the
    rejected ratio is small its gradient dwarfs the chosen one's, so DPO mostly pushes the
    rejected response down and barely pulls the chosen one up."""
    import torch

    from trainer.loss import dpo_loss

    plt = _plt()
    axis = torch.linspace(low, high, n, dtype=torch.float64)
    xc, xr = torch.meshgrid(axis, axis, indexing="xy")
    chosen = xc.reshape(-1).clone().requires_grad_()
    rejected = xr.reshape(-1).clone().requires_grad_()
    zeros = torch.zeros_like(chosen)
    losses, _, _ = dpo_loss(chosen.log(), rejected.log(), zeros, zeros, beta=beta)
    losses.sum().backward()
    loss = losses.detach().reshape(n, n).numpy()
    gc, gr = (-chosen.grad).reshape(n, n).numpy(), (-rejected.grad).reshape(n, n).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.contourf(xc.numpy(), xr.numpy(), loss, levels=20, cmap="viridis")
    fig.colorbar(im, ax=ax, label="DPO loss")
    ax.quiver(xc.numpy(), xr.numpy(), gc, gr, color="white", alpha=0.85)
    ax.set_xlabel("π(y_w|x) / π_ref(y_w|x)  (chosen)")
    ax.set_ylabel("π(y_l|x) / π_ref(y_l|x)  (rejected)")
    ax.set_title(f"DPO loss and −gradient field, β={beta}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_no data_\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    for r in rows:
        out += "| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |\n"
    return out


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(run_dir: str | Path, compare: list[str] | None = None, beta: float = 0.1,
                 dest: str | None = None, title: str | None = None, preamble: str = "") -> str:
    """Write RUN/report/report.md and its PNGs (replacing an older report whole), or into
    `dest` (a sweep's own report), headed `title` (the run's name) and `preamble` (Markdown);
    return the Markdown path."""
    main = load_run(run_dir)
    runs = [main] + [load_run(c) for c in compare or []]
    dest = dest or storage.join(main["path"], "report")
    with storage.output_dir(dest, overwrite=True) as tmp:
        _write_report(Path(tmp), main, runs, beta, title or main["name"], preamble)
    return storage.join(dest, "report.md")


def _write_report(out: Path, main: dict, runs: list[dict], beta: float, title: str,
                  preamble: str = "") -> None:
    plot_reward(runs, out / "reward.png")
    plot_logps(runs, out / "logps.png")
    plot_rewards(runs, out / "rewards.png")
    plot_funnel(main, out / "funnel.png")
    plot_landscape(out / "landscape.png", beta=beta)
    reward_rows = [
        {"run": r["name"], "round": k, "greedy": e["greedy_reward"],
         "sampled": e["sampled_reward"], "prompts": e["num_prompts"]}
        for r in runs for k, e in sorted(r["evals"].items())
    ]
    last = [
        {"run": r["name"], **{k: _metric(r["curves"][-1], k) for k in
                              ("logps/chosen", "logps/rejected", "rewards/margins",
                               "rewards/accuracies")},
         "logps/chosen at step 0": _metric(r["curves"][0], "logps/chosen")}
        for r in runs if r["curves"]
    ]
    md = f"# Report: {title}\n\nRun directory: `{main['path']}`\n\n" + preamble
    md += "## Task reward per round\n\n![reward](reward.png)\n\n" + _md_table(reward_rows)
    md += "\n## Chosen and rejected log-probs during training\n\n"
    md += (
        "Plain DPO only asks the chosen log-prob to rise *relative* to the rejected one; its "
        "gradient pushes the rejected side harder, so both can fall. The NLL term of DPO+NLL "
        "(Iterative RPO) holds the chosen log-prob up.\n\n![logps](logps.png)\n\n"
    )
    md += _md_table(last)
    md += "\n## Rewards: margins and accuracies\n\n![rewards](rewards.png)\n\n"
    md += "## Pairs funnel\n\n![funnel](funnel.png)\n\n"
    for r in runs:
        md += f"**{r['name']}**\n\n" + _md_table(funnel_rows(r)) + "\n"
    md += (
        "## The DPO loss landscape\n\nLoss over the chosen and rejected probability ratios "
        "with the negative gradient field, from `trainer.loss.dpo_loss` by autograd. The "
        "gradient on a ratio is ∓β·σ(−βh)/ratio: where the rejected ratio is small, its arrow "
        "component dwarfs the chosen one, so DPO lowers the rejected response far more than "
        "it raises the chosen one.\n\n![landscape](landscape.png)\n"
    )
    (out / "report.md").write_text(md)
