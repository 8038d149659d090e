"""`odpo byod --config FILE`: bring your own preference data, one config for the whole path:

    import -> SFT on the chosen responses -> precompute (the SFT model's log-probs) -> DPO train

Per the DPO paper (Rafailov et al. 2023, section 4): when the preference data did not come from
the model being trained, π_ref is unknown; fine-tuning on the chosen responses first and using
that model as the reference shrinks the distribution shift. The SFT model is also the policy that
DPO starts from, so the step-0 loss is ln 2.

Layout of a run directory:

    RUN/toy/          the toy model (only with `toy_model:`)
    RUN/pairs/        `odpo import` output
    RUN/sft/          `odpo sft --from-pairs RUN/pairs`: model/, metrics.jsonl, sft_summary.json
    RUN/precompute/   `odpo precompute --pairs RUN/pairs --model RUN/sft/model`
    RUN/train/        `odpo train --model RUN/sft/model --data RUN/precompute`

Every step runs every time and skips itself when its manifest records the same config, input
digests and code version: re-running the same command skips what is current, resumes a half-done
training, and re-runs a changed step and everything after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jobs.config import build, build_section
from pipeline import storage
from pipeline.checkpoint import check_model_name
from pipeline.errors import UserError
from pipeline.evaluate import EvalConfig, run_eval
from pipeline.storage import resolve_path, write_json
from trainer.dpo import DPOConfig, run_dpo
from trainer.dpo import check_config as check_dpo
from trainer.loss import unpaired
from trainer.sft import SFTConfig, eval_settings, run_sft
from trainer.sft import check_config as check_sft


@dataclass(frozen=True)
class BYODConfig:
    run_dir: str  # where the stages' directories go (layout in the module docstring)
    data: str  # preference data: Parquet / JSONL / `datasets` dir, TRL standard or chat form
    # Model to SFT on chosen and then DPO-train; its tokenizer renders conversational rows.
    # No default: it is the choice. Leave it out only with `toy_model:`.
    model: str | None = None
    toy_model: dict | None = None  # ToyConfig fields: make the toy model from nothing (demo)
    import_stage: dict = field(default_factory=dict)  # ImportConfig fields (tokenizer: model's)
    sft: dict = field(default_factory=dict)  # SFTConfig fields for the SFT on chosen
    precompute: dict = field(default_factory=dict)  # PrecomputeConfig fields
    train: dict = field(default_factory=dict)  # DPOConfig fields (beta is required)


def _log(msg: str) -> None:
    print(f"[byod {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _section(cls, cfg: BYODConfig, name: str, fixed: dict, defaults: dict | None = None):
    """A stage config from its YAML section, the path's defaults and the values fixed here."""
    return build_section(cls, getattr(cfg, name), fixed, name, "byod", defaults)


def run_byod(cfg: BYODConfig) -> dict:
    """Run (or skip, when current) each stage; each starts or joins Ray itself when it has work
    (`ensure_ray`). Returns each stage's summary."""
    from pipeline.importer import ImportConfig, run_import
    from trainer.precompute import PrecomputeConfig, run_precompute

    t0 = time.perf_counter()
    # Every section's keys and types before any work: a typo in `train:` would otherwise
    # surface only after the SFT (placeholders for what byod sets itself).
    p = "<set by byod>"
    for cls, name, fixed in (
        (ImportConfig, "import_stage", {"data": p, "out": p}),
        (SFTConfig, "sft", {"model": p, "from_pairs": p, "out": p}),
        (PrecomputeConfig, "precompute", {"pairs": p, "model": p, "out": p}),
        (DPOConfig, "train", {"model": p, "data": p, "out": p}),
    ):
        section = _section(cls, cfg, name, fixed)
        if cls in (SFTConfig, DPOConfig):  # values too: a bad dtype fails before any work
            (check_sft if cls is SFTConfig else check_dpo)(section)
        if cls is DPOConfig and unpaired(section.loss_type):
            raise UserError("train: loss_type kto trains on unpaired rows; byod imports pairs "
                            "(use `odpo iterate` with scored samples, or a pairwise loss)")
    if cfg.model is not None:
        check_model_name(cfg.model)
    run = storage.absolute(cfg.run_dir)
    storage.makedirs(run)
    model = resolve_path(cfg.model)
    if cfg.toy_model is not None:
        from pipeline.toy import ToyConfig, init_toy_model

        if model is not None:
            raise UserError("set either `model:` or `toy_model:`, not both")
        model = storage.join(run, "toy")
        # Made anew every time (the same options give the same bytes; see iterate).
        init_toy_model(build(ToyConfig, {**cfg.toy_model, "out": model}, "toy_model"),
                       overwrite=True)
    if model is None:
        raise UserError("set `model:` (the model to SFT on chosen and train) or `toy_model:`")
    pairs, sft_dir = storage.join(run, "pairs"), storage.join(run, "sft")
    sft_model = storage.join(sft_dir, "model")
    ref_dir, train_dir = storage.join(run, "precompute"), storage.join(run, "train")

    imp = run_import(_section(ImportConfig, cfg, "import_stage",
                              {"data": resolve_path(cfg.data), "out": pairs},
                              {"tokenizer": model}))
    dropped = ", ".join(f"{k} {v}" for k, v in imp["dropped"].items()) or "none"
    _log(f"import: {imp['rows']} rows -> {imp['pairs']} pairs ({imp['form']}; dropped: "
         f"{dropped}){', skipped: up to date' if imp['skipped'] else ''}")

    # A preference set nearly always has a few pairs longer than the context: SFT leaves them
    # out and counts them (precompute truncates them, TRL's rule) instead of stopping the path.
    sft_cfg = _section(SFTConfig, cfg, "sft", {"model": model, "from_pairs": pairs, "out": sft_dir},
                       {"too_long": "drop"})
    sft = run_sft(sft_cfg)
    if sft_cfg.eval_prompts:  # `sft: {eval_prompts: ...}` as `odpo sft` has it: sft/eval.json
        sft["eval"] = run_eval(EvalConfig(**eval_settings(sft_cfg, sft["model"])))
    if sft["skipped"]:
        _log("sft on chosen: skipped, up to date")
    else:
        too_long = sft.get("dropped", {}).get("too_long", 0)
        _log(f"sft on chosen: {sft['steps']} steps on {sft['rows']} rows"
             f"{f' ({too_long} too long, dropped)' if too_long else ''} -> {sft['model']}")

    ref = run_precompute(_section(PrecomputeConfig, cfg, "precompute", {
        "pairs": pairs, "model": sft_model, "out": ref_dir}))
    _log(f"precompute: {ref['pairs']} pairs, cache {ref['cache']}")

    train = run_dpo(_section(DPOConfig, cfg, "train",
                             {"model": sft_model, "data": ref_dir, "out": train_dir}))
    if train["skipped"]:
        _log("train: skipped, up to date")
    else:
        _log(f"train: {train['steps']} steps on {train['pairs']} pairs -> {train['model']}")
    summary = {"run_dir": run, "import": imp, "sft": sft, "precompute": ref,
               "train": train, "wall_s": time.perf_counter() - t0}
    write_json(storage.join(run, "byod_summary.json"), summary)
    return summary
