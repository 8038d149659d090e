"""`odpo iterate --config FILE`: rounds of sample -> score -> pair -> precompute -> train -> eval.

Layout of a run directory:

    RUN/toy/                 the toy model (only with `toy_model:`)
    RUN/data/                the toy task data (only with `toy_data:`)
    RUN/sft/                 SFT run (only with `sft_data` or `toy_data:`): model/, eval.json
    RUN/round_0/eval.json    the initial policy's held-out reward
    RUN/round_k/{samples,scored,pairs,precompute,train}/, RUN/round_k/eval.json  (k = 1..rounds)
    RUN/report/report.md     written at the end (also `odpo report RUN`)

Round k samples with policy k-1 (the SFT model for k = 1) and trains policy k. Iterate calls every
step (SFT, each stage, training, evaluation) every time; each skips itself when its manifest
records the same config, input digests and code version. So re-running the same command after an
interruption resumes (finished steps are skipped, a half-done stage is redone, a half-done
training resumes from its last Ray Train checkpoint), and a changed section re-runs that step and,
through the input digests, everything downstream of it, later rounds included.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.config import build, build_section
from pipeline import storage
from pipeline.checkpoint import check_model_name
from pipeline.cluster import cluster_named, ensure_ray
from pipeline.errors import UserError
from pipeline.evaluate import EvalConfig, run_eval
from pipeline.storage import resolve_path, write_json
from trainer.dpo import DPOConfig, run_dpo
from trainer.dpo import check_config as check_dpo
from trainer.loss import reference_free, unpaired
from trainer.sft import SFTConfig, eval_settings, run_sft
from trainer.sft import check_config as check_sft


@dataclass(frozen=True)
class IterateConfig:
    run_dir: str  # where every round's stages, models and the report go
    # `module:function` or a built-in task name, for scoring samples and evaluation; no default:
    # what counts as better is the user's choice
    scorer: str
    rounds: int = 2  # DPO rounds after the initial policy
    policy: str | None = None  # initial policy (HF dir / hub id); None: the toy model (+ SFT)
    prompts: str | None = None  # training prompts (`prompt` + scorer metadata); toy: data/
    eval_prompts: str | None = None  # held-out prompts for the task reward; toy: data/
    sft_data: str | None = None  # (prompt, response) to SFT the initial policy on first
    ref_model: str = "policy"  # policy: round k's reference is policy k-1 | initial: the SFT one
    seed: int = 0  # base seed; round k samples with seed + k
    toy_model: dict | None = None  # ToyConfig fields: make the toy model from nothing
    # `odpo toy data` options: sft_rows, prompts, heldout, seed, chat (true: rendered with the
    # policy's chat template, as --chat)
    toy_data: dict | None = None
    sft: dict = field(default_factory=dict)  # SFTConfig fields for the initial SFT
    sample: dict = field(default_factory=dict)  # SampleConfig fields
    score: dict = field(default_factory=dict)  # ScoreConfig fields
    pair: dict = field(default_factory=dict)  # PairConfig fields
    precompute: dict = field(default_factory=dict)  # PrecomputeConfig fields
    train: dict = field(default_factory=dict)  # DPOConfig fields (beta is required)
    eval: dict = field(default_factory=dict)  # EvalConfig fields (samples, temperature, ...)


def _log(msg: str) -> None:
    print(f"[iterate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _section(cls, cfg: IterateConfig, name: str, fixed: dict):
    """Build a stage config from its YAML section plus the values iterate fixes itself."""
    return build_section(cls, getattr(cfg, name), fixed, name, "iterate",
                         defaults=_defaults(cfg, name))


def _defaults(cfg: IterateConfig, name: str) -> dict:
    """What a section defaults to beyond its dataclass: with `train: {loss_type: kto}` the pair
    step writes unpaired rows (`mode: unpaired`)."""
    if name == "pair" and unpaired(cfg.train.get("loss_type", "sigmoid")):
        return {"mode": "unpaired"}
    return {}


def _check_pair_mode(mode: str, loss_type) -> None:
    """kto trains on unpaired rows and every other loss on pairs: refuse a mismatch up front."""
    if unpaired(loss_type) and mode != "unpaired":
        raise UserError(f"pair: mode {mode} makes pairs, but train: loss_type kto trains on "
                        "unpaired rows; use mode unpaired (the default with kto)")
    if mode == "unpaired" and not unpaired(loss_type):
        raise UserError(f"pair: mode unpaired makes unpaired rows, which only train: loss_type "
                        f"kto reads; {loss_type} needs pairs (mode best_worst or "
                        "correct_incorrect)")


def _toy(cfg: IterateConfig, run: str) -> tuple[str | None, dict]:
    """Make the toy model and data when asked; return (initial policy, data paths)."""
    paths = {}
    policy = cfg.policy
    if cfg.toy_model is not None:
        from pipeline.toy import ToyConfig, init_toy_model

        # Made anew every time (about a second; the same options give the same bytes), so the
        # model always matches `toy_model:` and the SFT's input digest says whether it changed.
        toy_dir = storage.join(run, "toy")
        init_toy_model(build(ToyConfig, {**cfg.toy_model, "out": toy_dir}, "toy_model"),
                       overwrite=True)
        policy = toy_dir
    if cfg.toy_data is not None:
        from pipeline.toy import write_task_data

        data_dir = storage.join(run, "data")
        opts = {"sft_rows": 150_000, "prompts": 2048, "heldout": 500, "seed": 0, **cfg.toy_data}
        unknown = sorted(set(opts) - {"sft_rows", "prompts", "heldout", "seed", "chat"})
        if unknown:
            raise UserError(f"toy_data: unknown key(s) {unknown}")
        # chat: true renders the task with the initial policy's chat template (the toy's with
        # `toy_model: {tokenizer: bpe}`), as `odpo toy data --chat` does.
        chat = opts.pop("chat", False)
        if not isinstance(chat, bool):
            raise UserError(f"toy_data: chat must be true or false, got {chat!r}")
        if chat and policy is None:
            raise UserError("toy_data: chat needs `toy_model:` or `policy:`, whose chat "
                            "template renders the prompts")
        write_task_data(data_dir, **opts, overwrite=True,  # as the toy model: deterministic
                        chat=resolve_path(policy) if chat else None)
        paths = {k: storage.join(data_dir, f"{k}.parquet") for k in ("sft", "prompts", "heldout")}
    return policy, paths


def _evaluate(model: str, cfg: IterateConfig, eval_prompts: str, out: str) -> dict:
    return run_eval(_section(EvalConfig, cfg, "eval", {
        "model": model, "prompts": eval_prompts, "scorer": cfg.scorer, "out": out}))


def _skipped(summary: dict) -> str:
    return " (skipped: up to date)" if summary.get("skipped") else ""


def check_iterate(cfg: IterateConfig) -> None:
    """Every section's keys, types and (where a stage's check needs no file) values, before any
    work: a typo in `train:` or a bad dtype would otherwise surface rounds later, inside a Ray
    worker (placeholders for what iterate sets itself)."""
    from pipeline.evaluate import check_config as check_eval
    from pipeline.pair import PairConfig
    from pipeline.sample import SampleConfig
    from pipeline.score import ScoreConfig
    from trainer.precompute import PrecomputeConfig

    if cfg.ref_model not in ("policy", "initial"):
        raise UserError(f"ref_model must be policy or initial, got {cfg.ref_model!r}")
    if cfg.rounds < 1:
        raise UserError(f"rounds must be >= 1, got {cfg.rounds}")
    p = "<set by iterate>"
    for cls, name, fixed, check in (
        (SFTConfig, "sft", {"model": p, "data": p, "out": p}, check_sft),
        (SampleConfig, "sample", {"model": p, "prompts": p, "out": p, "seed": 0}, None),
        (ScoreConfig, "score", {"samples": p, "out": p, "scorer": p}, None),
        (PairConfig, "pair", {"scored": p, "out": p, "round": 1}, None),
        (PrecomputeConfig, "precompute", {"pairs": p, "model": p, "out": p}, None),
        (DPOConfig, "train", {"model": p, "data": p, "out": p, "seed": 0}, check_dpo),
        (EvalConfig, "eval", {"model": p, "prompts": p, "scorer": p, "out": p}, check_eval),
    ):
        section = _section(cls, cfg, name, fixed)
        if check is not None:
            check(section)
        if name == "pair":
            _check_pair_mode(section.mode, cfg.train.get("loss_type", "sigmoid"))
    if cfg.policy is not None:
        check_model_name(cfg.policy, "policy")


@dataclass(frozen=True)
class Start:
    """What every round builds on: the run directory, the config as run (a scorer file made
    absolute), the initial policy (after SFT), the prompt files and round 0's history entry."""

    cfg: IterateConfig
    run: str
    initial: str
    prompts: str
    eval_prompts: str
    round_0: dict


def prepare(cfg: IterateConfig) -> Start:
    """Toy model and data when asked, SFT when there is SFT data, and the initial policy's
    held-out reward (RUN/round_0/eval.json)."""
    run = storage.absolute(cfg.run_dir)
    if cluster_named():  # joined and its storage checked before anything is written
        ensure_ray(run, {"policy": cfg.policy, "prompts": cfg.prompts,
                         "sft_data": cfg.sft_data}, "run_dir")
    storage.makedirs(run)
    write_json(storage.join(run, "iterate_config.json"), dataclasses.asdict(cfg))
    policy, toy_paths = _toy(cfg, run)
    prompts = resolve_path(cfg.prompts or toy_paths.get("prompts"))
    eval_prompts = resolve_path(cfg.eval_prompts or toy_paths.get("heldout"))
    sft_data = resolve_path(cfg.sft_data or toy_paths.get("sft"))
    if policy is None:
        raise UserError("set `policy:` (an SFT model) or `toy_model:` in the config")
    if prompts is None or eval_prompts is None:
        raise UserError("set `prompts:` and `eval_prompts:` (or `toy_data:`) in the config")
    policy = resolve_path(policy)
    head, _, fn = cfg.scorer.rpartition(":")
    if head.endswith(".py"):  # a scorer file: absolute, since Ray actors run elsewhere
        cfg = dataclasses.replace(cfg, scorer=f"{Path(head).resolve()}:{fn}")

    if sft_data:
        _log(f"SFT of {policy} on {sft_data}")
        sft_cfg = _section(SFTConfig, cfg, "sft", {
            "model": policy, "data": sft_data, "out": storage.join(run, "sft")})
        sft = run_sft(sft_cfg)
        if sft_cfg.eval_prompts:  # `sft: {eval_prompts: ...}` as `odpo sft` has it: sft/eval.json
            run_eval(EvalConfig(**eval_settings(sft_cfg, sft["model"])))
        _log(f"SFT: {sft['steps']} steps{_skipped(sft)}")
        policy = sft["model"]
    round_0 = {"round": 0, "policy": policy,
               **_rewards(_evaluate(policy, cfg, eval_prompts,
                                    storage.join(run, "round_0", "eval.json")))}
    _log(f"round 0 (initial policy): {_fmt(round_0)}")
    return Start(cfg, run, policy, prompts, eval_prompts, round_0)


def sample_and_score(cfg: IterateConfig, k: int, policy: str, prompts: str, rdir: str) -> str:
    """Round k's `samples/` and `scored/` in `rdir`, sampled from `policy`; the scored dir."""
    from pipeline.sample import SampleConfig, run_sample
    from pipeline.score import ScoreConfig, run_score

    samples, scored = storage.join(rdir, "samples"), storage.join(rdir, "scored")
    _log(f"round {k}: sampling with {policy}")
    run_sample(_section(SampleConfig, cfg, "sample", {
        "model": policy, "prompts": prompts, "out": samples, "seed": cfg.seed + k}))
    run_score(_section(ScoreConfig, cfg, "score", {
        "samples": samples, "out": scored, "scorer": cfg.scorer}))
    return scored


def train_round(cfg: IterateConfig, k: int, policy: str, initial: str, scored: str, rdir: str,
                eval_prompts: str) -> dict:
    """Round k from its scored samples: pair -> precompute -> train -> eval in `rdir`; its
    history entry (the trained policy, its pairs, its held-out rewards)."""
    from pipeline.pair import PairConfig, run_pair
    from trainer.precompute import PrecomputeConfig, run_precompute

    at = {d: storage.join(rdir, d) for d in ("pairs", "precompute")}
    seed = cfg.seed + k
    run_pair(_section(PairConfig, cfg, "pair", {"scored": scored, "out": at["pairs"], "round": k}))
    # A reference-free loss (simpo, orpo) trains on the token ids alone: the step only
    # tokenizes (with the policy's tokenizer), no reference model runs.
    loss_type = cfg.train.get("loss_type", "sigmoid")
    free = reference_free(loss_type)
    ref_model = policy if cfg.ref_model == "policy" or free else initial
    ref = run_precompute(_section(PrecomputeConfig, cfg, "precompute", {
        "pairs": at["pairs"], "model": ref_model, "out": at["precompute"],
        **({"logps": False} if free else {})}))
    what = "tokenized (reference-free loss)" if free else "reference log-probs"
    unit = "rows" if unpaired(loss_type) else "pairs"
    _log(f"round {k}: {what} {ref['cache']} ({ref['pairs']} {unit})")
    train = run_dpo(_section(DPOConfig, cfg, "train", {
        "model": policy, "data": at["precompute"], "out": storage.join(rdir, "train"),
        "seed": seed}))
    _log(f"round {k}: {train['steps']} DPO steps{_skipped(train)}")
    entry = {"round": k, "policy": train["model"], "pairs": ref["pairs"],
             **_rewards(_evaluate(train["model"], cfg, eval_prompts,
                                  storage.join(rdir, "eval.json")))}
    _log(f"round {k}: {_fmt(entry)}")
    return entry


def run_rounds(start: Start, cfg: IterateConfig, run: str, first_scored: str | None = None
               ) -> list[dict]:
    """Rounds 1..cfg.rounds into `run`/round_k from `start`'s initial policy; round 1 trains on
    `first_scored` (a sweep's shared round-1 samples) when given, else samples its own.
    Returns the history entries of rounds 0..rounds."""
    history, policy = [start.round_0], start.initial
    for k in range(1, cfg.rounds + 1):
        rdir = storage.join(run, f"round_{k}")
        scored = (first_scored if k == 1 and first_scored
                  else sample_and_score(cfg, k, policy, start.prompts, rdir))
        history.append(train_round(cfg, k, policy, start.initial, scored, rdir,
                                   start.eval_prompts))
        policy = history[-1]["policy"]
    return history


def run_iterate(cfg: IterateConfig) -> dict:
    """Run the rounds; each stage starts or joins Ray itself when it has work (`ensure_ray`)."""
    check_iterate(cfg)
    t0 = time.perf_counter()
    start = prepare(cfg)
    history = run_rounds(start, start.cfg, start.run)

    from jobs.report import write_report

    beta = float(cfg.train.get("beta", 0.1))
    report = write_report(start.run, beta=beta)
    summary = {"run_dir": start.run, "rounds": history, "report": report,
               "wall_s": time.perf_counter() - t0}
    write_json(storage.join(start.run, "iterate_summary.json"), summary)
    return summary


def _rewards(result: dict) -> dict:
    return {"greedy_reward": result["greedy_reward"], "sampled_reward": result["sampled_reward"]}


def _fmt(h: dict) -> str:
    return f"greedy {h['greedy_reward']:.3f}, sampled {h['sampled_reward']:.3f}"
