"""`odpo`: the command line. Each subcommand maps flags (and `--config FILE`) onto one config
dataclass and calls the stage or trainer that owns the work."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from jobs.config import add_dataclass_args, from_args
from pipeline.errors import UserError


def _cmd_toy_init(args) -> None:
    from pipeline.toy import ToyConfig, init_toy_model

    cfg = from_args(ToyConfig, args)
    out = init_toy_model(cfg)
    print(f"toy model written to {out}")


def _cmd_toy_data(args) -> None:
    from pipeline.toy import write_task_data

    out = write_task_data(args.out, args.sft_rows, args.prompts, args.heldout, args.seed,
                          overwrite=args.overwrite)
    print(
        f"addition data in {out}: sft.parquet ({args.sft_rows} rows), prompts.parquet "
        f"({args.prompts}), heldout.parquet ({args.heldout}; disjoint from the others)"
    )


def _cmd_sft(args) -> None:
    from pipeline.cluster import stage_ray
    from trainer.sft import SFTConfig, run_sft

    cfg = from_args(SFTConfig, args)
    summary = run_sft(cfg, start_ray=stage_ray(args.address, cfg.out, inputs={
        "--model": cfg.model, "--data": cfg.data, "--from-pairs": cfg.from_pairs}))
    line = f"sft: {summary['steps']} steps on {summary['rows']} rows in {summary['train_s']:.0f}s"
    if summary["dropped"]:
        line += f" (dropped rows: {_dropped(summary['dropped'])})"
    if summary["skipped"]:
        line += ", skipped: up to date"
    if "eval" in summary:
        e = summary["eval"]
        line += (
            f"; held-out reward greedy {e['greedy_reward']:.3f}, sampled {e['sampled_reward']:.3f}"
            f" ({e['num_prompts']} prompts)"
        )
    print(line + f" -> {summary['model']}")


def _cmd_train(args) -> None:
    from pipeline.cluster import stage_ray
    from trainer.dpo import DPOConfig, run_dpo

    cfg = from_args(DPOConfig, args)
    s = run_dpo(cfg, start_ray=stage_ray(args.address, cfg.out, inputs={
        "--model": cfg.model, "--data": cfg.data, "--reference-model": cfg.reference_model}))
    left = s["pairs_left_over_per_epoch"]
    print(
        f"train: {s['steps']} steps on {s['pairs']} pairs ({s['reference']} reference"
        f"{f'; {left} pairs past the last full batch of each epoch' if left else ''}) in "
        f"{s['train_s']:.0f}s{', skipped: up to date' if s['skipped'] else ''} -> {s['model']}"
    )


def _cmd_eval(args) -> None:
    from pipeline.cluster import stage_ray
    from pipeline.evaluate import EvalConfig, run_eval

    cfg = from_args(EvalConfig, args)
    result = run_eval(cfg, start_ray=stage_ray(args.address, cfg.out,
                                               inputs={"--model": cfg.model}))
    print(
        f"eval {cfg.model}: greedy {result['greedy_reward']:.3f}, sampled "
        f"{result['sampled_reward']:.3f} on {result['num_prompts']} prompts"
        f"{', skipped: up to date' if result['skipped'] else ''}"
    )


def _cmd_reference(args) -> None:
    from pipeline.cluster import stage_ray
    from trainer.reference import ReferenceConfig, run_reference

    cfg = from_args(ReferenceConfig, args)
    start = stage_ray(args.address, cfg.out, inputs={"--model": cfg.model})
    s = run_reference(cfg, start_ray=start)  # Ray only on a miss
    line = f"reference: {s['pairs']} pairs (dropped: {_dropped(s['dropped'])}), cache {s['cache']}"
    if s["cache"] == "hit":
        line += f" from {s['source']}"
    else:
        st = s["stats"]
        line += (
            f": {st['tokens']} tokens at {st['tokens_per_s']:.0f} tokens/s, padding "
            f"{100 * st['padding_fraction']:.1f}%, {st['truncated_pairs']} pairs truncated"
        )
    print(line + f", in {s['seconds']:.1f}s (key {s['key'][:16]}) -> {s['out']}")


def _dropped(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _cmd_sample(args) -> None:
    from pipeline.cluster import stage_ray
    from pipeline.sample import SampleConfig, run_sample

    cfg = from_args(SampleConfig, args)
    start = stage_ray(args.address, cfg.out,
                      inputs={"--model": cfg.model, "--prompts": cfg.prompts})
    s = run_sample(cfg, start_ray=start)  # no Ray for a skip
    line = (f"sample: {s['prompts']} prompts -> {s['samples']} samples ({s['prompts_sampled']} "
            f"prompts x k={cfg.k}; dropped prompts: {_dropped(s['dropped'])})")
    if s["skipped"]:
        line += ", skipped: up to date"
    else:
        st = s["stats"]
        line += (f", {st.get('samples_per_s', 0):.1f} samples/s, "
                 f"{st.get('response_tokens_per_s', 0):.0f} tokens/s")
    print(line + f", in {s['seconds']:.1f}s -> {s['out']}")


def _cmd_score(args) -> None:
    from pipeline.cluster import stage_ray
    from pipeline.score import ScoreConfig, run_score

    cfg = from_args(ScoreConfig, args)
    start = stage_ray(args.address, cfg.out,
                      inputs={"--samples": cfg.samples, "--reward-model": cfg.reward_model})
    s = run_score(cfg, start_ray=start)
    st = s["stats"]
    line = (f"score: {s['samples']} samples -> {s['scored']} scored (dropped: "
            f"{_dropped(s['dropped'])})")
    if "mean_score" in st and st["mean_score"] is not None:
        line += f", mean score {st['mean_score']:.4f}"
    if "share_correct" in st:
        line += f" (share correct {st['share_correct']:.4f})"
    if s["skipped"]:
        line += ", skipped: up to date"
    print(line + f", in {s['seconds']:.1f}s -> {s['out']}")


def _cmd_pair(args) -> None:
    from pipeline.cluster import stage_ray
    from pipeline.pair import PairConfig, run_pair

    cfg = from_args(PairConfig, args)
    s = run_pair(cfg, start_ray=stage_ray(args.address, cfg.out,
                                          inputs={"--scored": cfg.scored}))
    line = (f"pair ({cfg.mode}): {s['prompts']} prompts -> {s['pairs']} pairs from "
            f"{s['prompts_paired']} prompts (dropped prompts: {_dropped(s['dropped'])})")
    if s["skipped"]:
        line += ", skipped: up to date"
    print(line + f", in {s['seconds']:.1f}s -> {s['out']}")


def _cmd_iterate(args) -> None:
    from jobs.config import build, load_yaml
    from jobs.iterate import IterateConfig, run_iterate
    from pipeline.cluster import stage_ray

    values = load_yaml(args.config)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    if args.rounds is not None:
        values["rounds"] = args.rounds
    cfg = build(IterateConfig, values, args.config)
    s = run_iterate(cfg, start_ray=stage_ray(args.address, cfg.run_dir, "run_dir", inputs={
        "policy": cfg.policy, "prompts": cfg.prompts, "sft_data": cfg.sft_data}))
    for r in s["rounds"]:
        print(f"round {r['round']}: greedy {r['greedy_reward']:.3f}, "
              f"sampled {r['sampled_reward']:.3f}  ({r['policy']})")
    print(f"iterate: {len(s['rounds']) - 1} rounds in {s['wall_s']:.0f}s; report: {s['report']}")


def _cmd_report(args) -> None:
    from jobs.report import write_report

    path = write_report(args.run_dir, compare=args.compare, beta=args.beta)
    print(f"report: {path}")


def _cmd_import(args) -> None:
    from pipeline.cluster import stage_ray
    from pipeline.importer import ImportConfig, run_import

    cfg = from_args(ImportConfig, args)
    stage_ray(args.address, cfg.out)  # joins only a named cluster, for its storage check
    s = run_import(cfg)  # no Ray: one pass over the rows in this process
    line = (f"import ({s['form']}, prompt from {s['prompt_source']}): {s['rows']} rows -> "
            f"{s['pairs']} pairs (dropped: {_dropped(s['dropped'])})")
    if s["prompt_extraction"]:
        e = s["prompt_extraction"]
        line += f"; common-prefix prompt found in {e['extracted']} rows, failed in {e['failed']}"
    if s["skipped"]:
        line += ", skipped: up to date"
    print(line + f", in {s['seconds']:.1f}s -> {s['out']}")


def _cmd_byod(args) -> None:
    from jobs.byod import BYODConfig, run_byod
    from jobs.config import build, load_yaml
    from pipeline.cluster import stage_ray

    values = load_yaml(args.config)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    cfg = build(BYODConfig, values, args.config)
    s = run_byod(cfg, start_ray=stage_ray(args.address, cfg.run_dir, "run_dir",
                                          inputs={"model": cfg.model}))
    print(f"byod: {s['import']['pairs']} pairs, SFT-on-chosen {s['sft']['steps']} steps, "
          f"reference {s['reference']['cache']}, DPO {s['train']['steps']} steps in "
          f"{s['wall_s']:.0f}s -> {s['train']['model']}")


def _cmd_submit(args) -> int:
    import shlex

    from jobs.submit import SubmitConfig, run_submit

    argv = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if argv:
        if hasattr(args, "entrypoint"):
            raise UserError("give the command either after `--` or as --entrypoint, not both")
        args.entrypoint = shlex.join(argv)
    return run_submit(from_args(SubmitConfig, args))


def build_parser() -> argparse.ArgumentParser:
    from jobs.submit import SubmitConfig
    from pipeline.evaluate import EvalConfig
    from pipeline.importer import ImportConfig
    from pipeline.pair import PairConfig
    from pipeline.sample import SampleConfig
    from pipeline.score import ScoreConfig
    from pipeline.toy import ToyConfig
    from trainer.dpo import DPOConfig
    from trainer.reference import ReferenceConfig
    from trainer.sft import SFTConfig

    parser = argparse.ArgumentParser(
        prog="odpo", description="Offline iterative DPO on Ray Data + vLLM + Ray Train."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    toy = sub.add_parser("toy", help="the toy world: tiny Llama + character or BPE chat "
                         "tokenizer, task data")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    p = toy_sub.add_parser("init", help="write a randomly initialised tiny Llama + tokenizer")
    add_dataclass_args(p, ToyConfig)
    p.set_defaults(func=_cmd_toy_init)
    p = toy_sub.add_parser("data", help="write the addition task's sft/prompts/heldout parquet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sft-rows", type=int, default=150_000, help="SFT (prompt, response) rows")
    p.add_argument("--prompts", type=int, default=2048, help="training prompts for sampling")
    p.add_argument("--heldout", type=int, default=500, help="held-out evaluation prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("byod", help="your preference data: import -> SFT on chosen -> reference "
                       "-> train, from one config")
    p.add_argument("--config", required=True, help="byod YAML (jobs/configs/byod_toy.yaml)")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.set_defaults(func=_cmd_byod)

    p = sub.add_parser("iterate", help="rounds of sample/score/pair/reference/train/eval")
    p.add_argument("--config", required=True, help="iterate YAML (jobs/configs/*.yaml)")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--rounds", type=int, help="override the config's number of rounds")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.set_defaults(func=_cmd_iterate)
    p = sub.add_parser("submit", help="run a command on a Ray cluster as a job (ray job submit), "
                       "follow its log, exit 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED")
    add_dataclass_args(p, SubmitConfig)
    p.add_argument("command_line", nargs=argparse.REMAINDER,
                   help="the job's command, after `--`: -- odpo iterate --config FILE")
    p.set_defaults(func=_cmd_submit)
    p = sub.add_parser("report", help="Markdown + PNG report of an iterate run")
    p.add_argument("run_dir", help="an `odpo iterate` run directory")
    p.add_argument("--compare", action="append", help="another run to overlay (repeatable)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the loss-landscape plot")
    p.set_defaults(func=_cmd_report)

    for name, cls, func, help_ in (
        ("sft", SFTConfig, _cmd_sft, "supervised fine-tuning on (prompt, response) with Ray Train"),
        ("train", DPOConfig, _cmd_train, "DPO / DPO+NLL on reference shards with Ray Train"),
        ("eval", EvalConfig, _cmd_eval, "greedy and sampled task reward on held-out prompts"),
        ("reference", ReferenceConfig, _cmd_reference,
         "tokenize pairs once and compute (or reuse) the reference log-probs"),
        ("import", ImportConfig, _cmd_import,
         "preference data (TRL standard or conversational form) -> pairs shards"),
        ("sample", SampleConfig, _cmd_sample, "K responses per prompt from vLLM on Ray Data"),
        ("score", ScoreConfig, _cmd_score, "score samples: verifier, reward model or function"),
        ("pair", PairConfig, _cmd_pair, "group scored samples by prompt into preference pairs"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML file of config keys (flags override it)")
        p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
        add_dataclass_args(p, cls)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"odpo {args.command}: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print(f"odpo {args.command}: interrupted", file=sys.stderr)
        rc = 130
    if rc in (2, 130):
        # A failed stage's Ray Data actors (vLLM engines, reference models, with the GPUs and
        # memory they hold) live as long as their handles, which the traceback's frames keep in
        # reference cycles: free them now, not at some later garbage collection, so the next
        # command in this process (iterate, a test, a notebook) gets those resources.
        gc.collect()
        return rc
    if os.environ.get("ODPO_TIMING"):
        print(json.dumps({"command": args.command, "seconds": time.perf_counter() - t0}))
    return rc or 0  # commands return None, or an exit code (submit: the job's outcome)


if __name__ == "__main__":
    sys.exit(main())
