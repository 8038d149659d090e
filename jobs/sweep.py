"""`odpo sweep --config FILE`: one iterate recipe, several variants of it, compared side by side.

A sweep answers "which loss (or recipe) works on *my* task": every variant starts from the same
SFT model and trains its first round on the same scored samples, so the variants differ only in
what they override. Layout:

    SWEEP/toy/, SWEEP/data/, SWEEP/sft/   shared, as in an iterate run (when the base has them)
    SWEEP/round_0/eval.json                the initial policy's held-out reward, shared
    SWEEP/round_1/{samples,scored}/        round 1's samples, scored once, shared
    SWEEP/<variant>/                       an iterate run directory per variant: round_0/eval.json
                                           (a copy), round_1/{pairs,precompute,train,eval.json}
                                           and round_1/shared.json (where its samples are),
                                           round_k/... for k >= 2 from its own policy
    SWEEP/report/report.md                 every variant side by side (reward per round, log-prob
                                           and reward-margin curves); SWEEP/sweep_summary.json

Variants run one after another: each step already uses the whole machine (or cluster) it is
given. Every step skips itself when current, so an interrupted sweep resumes, and variants with
the same pairs and reference model share the reference log-probs through the precompute cache.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

from jobs.config import build, load_yaml
from jobs.iterate import (
    IterateConfig,
    _log,
    check_iterate,
    prepare,
    run_rounds,
    sample_and_score,
)
from jobs.report import write_report
from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import write_json

# What a variant may change: everything after round 1's scored samples. The SFT model, the
# prompts, sampling, scoring and evaluation are the sweep's common ground.
VARIANT_KEYS = ("train", "pair", "precompute", "ref_model", "rounds")
# Directory names of the sweep itself, which a variant's name must not take.
RESERVED = ("toy", "data", "sft", "report")


@dataclass(frozen=True)
class SweepConfig:
    iterate: str  # the base recipe: an `odpo iterate` YAML that every variant starts from
    # name -> overrides of the base's train / pair / precompute / ref_model / rounds (sections
    # are merged key by key: {train: {loss_type: ipo}} keeps the base's other train keys);
    # {} runs the base as it is
    variants: dict
    run_dir: str | None = None  # where the sweep goes; None: the base's run_dir + "_sweep"


def variant_config(base: IterateConfig, name: str, overrides: dict, run: str) -> IterateConfig:
    """The base recipe with one variant's overrides, its run directory `run`/`name`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in RESERVED or re.fullmatch(
            r"round_\d+", name):
        raise UserError(f"variant name {name!r}: use letters, digits, '_', '.', '-', and none "
                        f"of {RESERVED} or round_k")
    if not isinstance(overrides, dict):
        raise UserError(f"variant {name}: expected a mapping of overrides, got {overrides!r}")
    unknown = sorted(set(overrides) - set(VARIANT_KEYS))
    if unknown:
        raise UserError(
            f"variant {name}: {unknown} cannot vary in a sweep, whose variants share the SFT "
            f"model and round 1's samples; a variant may set {list(VARIANT_KEYS)}")
    values = dataclasses.asdict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values[key], dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    values["run_dir"] = storage.join(run, name)
    return IterateConfig(**values)


def load_sweep(cfg: SweepConfig) -> tuple[IterateConfig, dict[str, IterateConfig]]:
    """The base recipe (its run_dir the sweep's) and each variant's config, all checked."""
    base = build(IterateConfig, load_yaml(cfg.iterate), cfg.iterate)
    if not isinstance(cfg.variants, dict) or not cfg.variants:
        raise UserError("variants: give at least one, e.g. {dpo_nll: {}, ipo: {train: "
                        "{loss_type: ipo}}}")
    run = storage.absolute(cfg.run_dir or f"{base.run_dir.rstrip('/')}_sweep")
    base = dataclasses.replace(base, run_dir=run)
    check_iterate(base)
    variants = {}
    for name, overrides in cfg.variants.items():
        variants[str(name)] = variant_config(base, str(name), overrides or {}, run)
        try:
            check_iterate(variants[str(name)])
        except UserError as e:
            raise UserError(f"variant {name}: {e}") from None
    return base, variants


def run_sweep(cfg: SweepConfig) -> dict:
    """Run the shared steps once, then every variant's rounds; write the side-by-side report."""
    base, variants = load_sweep(cfg)
    t0 = time.perf_counter()
    start = prepare(base)
    run = start.run
    scored = sample_and_score(start.cfg, 1, start.initial, start.prompts,
                              storage.join(run, "round_1"))
    shared = {"samples": storage.join(run, "round_1", "samples"), "scored": scored}
    round_0 = storage.read_text(storage.join(run, "round_0", "eval.json"))
    results = {}
    for name, vcfg in variants.items():
        _log(f"variant {name}: {_describe(vcfg)}")
        vcfg = dataclasses.replace(vcfg, scorer=start.cfg.scorer)  # a scorer file, resolved
        vrun = storage.absolute(vcfg.run_dir)
        storage.makedirs(vrun)
        write_json(storage.join(vrun, "iterate_config.json"), dataclasses.asdict(vcfg))
        storage.write_text(storage.join(vrun, "round_0", "eval.json"), round_0)
        write_json(storage.join(vrun, "round_1", "shared.json"), shared)
        t = time.perf_counter()
        history = run_rounds(start, vcfg, vrun, first_scored=scored)
        results[name] = {"run_dir": vrun, "recipe": _describe(vcfg), "rounds": history,
                         "wall_s": time.perf_counter() - t}
        write_report(vrun, beta=float(vcfg.train.get("beta", 0.1)))
    names = list(variants)
    report = write_report(results[names[0]]["run_dir"],
                          compare=[results[n]["run_dir"] for n in names[1:]],
                          beta=float(base.train.get("beta", 0.1)),
                          dest=storage.join(run, "report"), title=f"sweep {storage.name(run)}",
                          preamble=sweep_table(results))
    summary = {"run_dir": run, "variants": results, "report": report,
               "table": sweep_table(results), "wall_s": time.perf_counter() - t0}
    write_json(storage.join(run, "sweep_summary.json"), summary)
    return summary


def _describe(cfg: IterateConfig) -> str:
    """The recipe in one line: loss, its weights and the train keys that shape it."""
    t = cfg.train
    keys = ("loss_type", "loss_weights", "alpha", "beta", "label_smoothing", "lr", "epochs")
    parts = [f"{k}={t[k]}" for k in keys if k in t]
    if cfg.pair:
        parts.append("pair=" + ",".join(f"{k}:{v}" for k, v in sorted(cfg.pair.items())))
    if cfg.ref_model != "policy":
        parts.append(f"ref_model={cfg.ref_model}")
    return " ".join(parts)


def sweep_table(results: dict) -> str:
    """Markdown: one row per variant, greedy / sampled held-out reward per round, best last
    round first, and the variant's own wall time (its rounds; the shared steps apart)."""
    rounds = max(len(r["rounds"]) for r in results.values())
    head = ["variant", "recipe"] + [f"round {k}" for k in range(rounds)] + ["wall"]
    order = sorted(results, key=lambda n: -results[n]["rounds"][-1]["greedy_reward"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in order:
        r = results[n]
        cells = [f"{h['greedy_reward']:.1%} / {h['sampled_reward']:.1%}" for h in r["rounds"]]
        cells += [""] * (rounds - len(cells))
        lines.append(f"| {n} | {r['recipe']} | " + " | ".join(cells)
                     + f" | {r['wall_s'] / 60:.1f} min |")
    return ("\n".join(lines) + "\n\nHeld-out reward, greedy / sampled; round 0 is the shared "
            "SFT model. Wall: the variant's own rounds.\n\n")
