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
from jobs.console import quiet, show
from pipeline.errors import UserError
from pipeline.evaluate import EvalConfig, run_eval
from trainer.dpo import DPOConfig, run_dpo
from trainer.sft import SFTConfig, eval_settings, run_sft


def _cmd_toy_init(args) -> None:
    from pipeline.toy import ToyConfig, init_toy_model

    cfg = from_args(ToyConfig, args)
    show("toy init", {"out": init_toy_model(cfg)})


def _cmd_toy_data(args) -> None:
    from pipeline.toy import write_task_data

    out = write_task_data(args.out, args.sft_rows, args.prompts, args.heldout, args.seed,
                          overwrite=args.overwrite, chat=args.chat)
    show("toy data", {**vars(args), "out": out})


def _use_address(args) -> None:
    """`--address`: the Ray cluster that every stage this command runs joins (`ensure_ray`)."""
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


def _cmd_sft(args) -> None:
    cfg = from_args(SFTConfig, args)
    _use_address(args)
    summary = run_sft(cfg)
    if cfg.eval_prompts:  # the trained model on the held-out prompts: out/eval.json
        summary["eval"] = run_eval(EvalConfig(**eval_settings(cfg, summary["model"])))
    show("sft", summary, log=cfg.out)


def _cmd_train(args) -> None:
    cfg = from_args(DPOConfig, args)
    _use_address(args)
    s = run_dpo(cfg)
    show("train", s, log=cfg.out)


def _cmd_eval(args) -> None:
    cfg = from_args(EvalConfig, args)
    _use_address(args)
    result = run_eval(cfg)
    show("eval", {**result, "model": cfg.model, "out": cfg.out}, log=cfg.out)


def _cmd_precompute(args) -> None:
    from trainer.precompute import PrecomputeConfig, run_precompute

    cfg = from_args(PrecomputeConfig, args)
    _use_address(args)
    s = run_precompute(cfg)  # Ray only on a miss
    show("precompute", s, log=cfg.out)


def _cmd_sample(args) -> None:
    from pipeline.sample import SampleConfig, run_sample

    cfg = from_args(SampleConfig, args)
    _use_address(args)
    s = run_sample(cfg)  # no Ray for a skip
    show("sample", {**s, "k": cfg.k}, log=cfg.out)


def _cmd_score(args) -> None:
    from pipeline.score import ScoreConfig, run_score

    cfg = from_args(ScoreConfig, args)
    _use_address(args)
    s = run_score(cfg)
    show("score", s, log=cfg.out)


def _cmd_pair(args) -> None:
    from pipeline.pair import PairConfig, run_pair

    cfg = from_args(PairConfig, args)
    _use_address(args)
    s = run_pair(cfg)
    show("pair", {**s, "mode": cfg.mode}, log=cfg.out)


def _cmd_iterate(args) -> None:
    from jobs.config import build, load_yaml
    from jobs.iterate import IterateConfig, run_iterate

    values = load_yaml(args.config)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    if args.rounds is not None:
        values["rounds"] = args.rounds
    cfg = build(IterateConfig, values, args.config)
    _use_address(args)
    s = run_iterate(cfg)
    show("iterate", {**s, "rounds_run": len(s["rounds"]) - 1}, log=cfg.run_dir)


def _cmd_sweep(args) -> None:
    from jobs.config import build, load_yaml
    from jobs.sweep import SweepConfig, run_sweep

    values = load_yaml(args.config)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    cfg = build(SweepConfig, values, args.config)
    _use_address(args)
    s = run_sweep(cfg)
    show("sweep", {**s, "n_variants": len(s["variants"])}, log=s["run_dir"])


def _cmd_report(args) -> None:
    from jobs.report import write_report

    show("report", {"path": write_report(args.run_dir, compare=args.compare, beta=args.beta)})


def _cmd_import(args) -> None:
    from pipeline.importer import ImportConfig, run_import

    cfg = from_args(ImportConfig, args)
    _use_address(args)
    s = run_import(cfg)  # no Ray (a named cluster is joined, for its storage check)
    show("import", s, log=cfg.out)


def _cmd_byod(args) -> None:
    from jobs.byod import BYODConfig, run_byod
    from jobs.config import build, load_yaml

    values = load_yaml(args.config)
    if args.run_dir:
        values["run_dir"] = args.run_dir
    cfg = build(BYODConfig, values, args.config)
    _use_address(args)
    s = run_byod(cfg)
    show("byod", s, log=cfg.run_dir)


def _cmd_submit(args) -> int:
    import shlex

    from jobs.submit import SubmitConfig, run_submit

    argv = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if argv:
        if hasattr(args, "entrypoint"):
            raise UserError("give the command either after `--` or as --entrypoint, not both")
        args.entrypoint = shlex.join(argv)
    return run_submit(from_args(SubmitConfig, args))


ROUND = """\
One round of self-generated preference learning. Each step writes a directory of Parquet shards
and a manifest.json; a re-run skips every step whose manifest is current.

  prompts --> sample -----> score ------> pair -------> precompute ---> train -------> eval
              k responses   verifier,     chosen vs     log-probs of    DPO on Ray     held-out
              per prompt    reward model  rejected,     the reference,  Train; no      reward,
              from vLLM     or your       per prompt    computed once,  reference      greedy and
                 ^          function                    then cached     model loaded   sampled
                 |                                                         |
                 +---- iterate: round k+1 samples from the policy that ----+
                       round k trained (ref_model: that policy or the first)

  byod: your preference data --> import --> sft on chosen --> precompute --> train
"""
QUIET = """\
Each command prints its summary (and, on a terminal, a progress bar per Ray Data pass or training
run); Ray's, vLLM's and the Ray workers' logs go to odpo.log in its output directory (iterate,
byod: RUN_DIR/odpo.log; eval: NAME.log beside --out NAME.json). -v shows them live instead.
`odpo COMMAND --help` explains every flag; flags override a --config YAML file."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (`odpo CMD: error: ...`, exit code 2) like every other error of
    the CLI, returned by `main` rather than exiting the process."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _choices() -> dict:
    """The values a flag takes, from the constants the code checks a config against: argparse
    lists them in the help and refuses others up front."""
    from pipeline.importer import BAD_ROWS, ImportConfig
    from pipeline.pair import MODES, PairConfig
    from pipeline.score import NONFINITE_MODES, RM_DTYPES, ScoreConfig
    from trainer.dpo import DPO_LAYOUTS
    from trainer.launch import LR_SCHEDULES, STRATEGIES, TRAIN_DTYPES
    from trainer.loss import LOSS_TYPES, UNPAIRED_LOSS_TYPES
    from trainer.precompute import CACHE_MODES, DTYPES, TRUNCATION_MODES, PrecomputeConfig
    from trainer.precompute import LAYOUTS as PRECOMPUTE_LAYOUTS

    training = {"lr_schedule": LR_SCHEDULES, "dtype": TRAIN_DTYPES, "strategy": STRATEGIES}
    return {
        SFTConfig: training,
        DPOConfig: {**training, "loss_type": LOSS_TYPES + UNPAIRED_LOSS_TYPES,
                    "layout": DPO_LAYOUTS},
        PrecomputeConfig: {"truncation": TRUNCATION_MODES, "dtype": DTYPES,
                           "cache": CACHE_MODES, "layout": PRECOMPUTE_LAYOUTS},
        ImportConfig: {"bad_rows": BAD_ROWS},
        PairConfig: {"mode": MODES},
        ScoreConfig: {"nonfinite": NONFINITE_MODES, "rm_dtype": RM_DTYPES},
    }


def build_parser() -> argparse.ArgumentParser:
    from jobs.submit import SubmitConfig
    from pipeline.importer import ImportConfig
    from pipeline.pair import PairConfig
    from pipeline.sample import SampleConfig
    from pipeline.score import ScoreConfig
    from pipeline.toy import ToyConfig
    from trainer.precompute import PrecomputeConfig

    parser = _Parser(
        prog="odpo", description="Offline iterative DPO on Ray Data + vLLM + Ray Train.\n\n"
        + ROUND, epilog=QUIET, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    # What every command that runs on Ray takes.
    on_ray = _Parser(add_help=False)
    on_ray.add_argument("--address", help="Ray cluster to run on, e.g. 10.0.0.1:6379 (as "
                        "RAY_ADDRESS); without it the command starts a local Ray of its own")
    on_ray.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, vLLM's and the workers' logs live, as they print "
                        "them, instead of writing them to the command's odpo.log")
    stage_epilog = ("Prints a summary line; Ray's, vLLM's and the workers' logs go to the "
                    "output's odpo.log (-v: live). Flags override the --config file.")

    def command(name: str, help_: str, func, cls=None, parents=(on_ray,), config=True):
        p = sub.add_parser(name, help=help_, description=help_, parents=list(parents),
                           epilog=stage_epilog if on_ray in parents else None)
        if cls is not None:
            if config:
                p.add_argument("--config", metavar="FILE",
                               help="YAML file of config keys (flags override it)")
            add_dataclass_args(p, cls, choices=choices.get(cls))
        p.set_defaults(func=func)
        return p

    choices = _choices()
    # The round, in order.
    command("sample", "k responses per prompt from vLLM on Ray Data", _cmd_sample, SampleConfig)
    command("score", "score samples: verifier, reward model or function", _cmd_score,
            ScoreConfig)
    command("pair", "group scored samples by prompt into (chosen, rejected) pairs, or into "
            "unpaired labelled rows for kto (--mode unpaired)", _cmd_pair,
            PairConfig)
    command("precompute", "tokenize pairs once and compute (or reuse) the reference log-probs",
            _cmd_precompute, PrecomputeConfig)
    command("train", "DPO (or another preference loss) on precompute shards with Ray Train",
            _cmd_train, DPOConfig)
    command("eval", "greedy and sampled task reward on held-out prompts", _cmd_eval, EvalConfig)
    p = command("iterate", "rounds of sample -> score -> pair -> precompute -> train -> eval, "
                "from one config", _cmd_iterate)
    p.add_argument("--config", required=True, help="iterate YAML (jobs/configs/*.yaml)")
    p.add_argument("--run-dir", help="where the rounds go, instead of the config's run_dir")
    p.add_argument("--rounds", type=int, help="DPO rounds, instead of the config's rounds")
    p = command("sweep", "variants of one iterate recipe (losses, betas, ...) from the same SFT "
                "model and round-1 samples, compared side by side", _cmd_sweep)
    p.add_argument("--config", required=True,
                   help="sweep YAML: iterate (the base recipe's YAML), variants, run_dir "
                        "(jobs/configs/sweep_losses.yaml)")
    p.add_argument("--run-dir", help="where the sweep goes, instead of the config's run_dir")
    # Around it.
    command("sft", "supervised fine-tuning on (prompt, response) rows with Ray Train", _cmd_sft,
            SFTConfig)
    command("import", "preference data (TRL standard or conversational form) -> pairs shards",
            _cmd_import, ImportConfig)
    p = command("byod", "your preference data: import -> SFT on chosen -> precompute -> train, "
                "from one config", _cmd_byod)
    p.add_argument("--config", required=True, help="byod YAML (jobs/configs/byod_toy.yaml)")
    p.add_argument("--run-dir", help="where the stages go, instead of the config's run_dir")

    toy = sub.add_parser("toy", help="the toy world: a tiny Llama with a character or BPE chat "
                         "tokenizer, and the addition task's data",
                         description="the toy world: a tiny Llama and the addition task's data")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="COMMAND",
                                 title="commands")
    p = toy_sub.add_parser("init", help="write a randomly initialised tiny Llama + tokenizer",
                           description="write a randomly initialised tiny Llama + tokenizer")
    add_dataclass_args(p, ToyConfig)
    p.set_defaults(func=_cmd_toy_init)
    p = toy_sub.add_parser("data", help="write the addition task's sft/prompts/heldout parquet",
                           description="write the addition task's sft/prompts/heldout parquet")
    p.add_argument("--out", required=True, help="output directory (required)")
    p.add_argument("--sft-rows", type=int, default=150_000, help="(prompt, response) rows for "
                   "the initial SFT (default: 150000)")
    p.add_argument("--prompts", type=int, default=2048, help="training prompts for sampling "
                   "(default: 2048)")
    p.add_argument("--heldout", type=int, default=500, help="held-out evaluation prompts, "
                   "disjoint from the others (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random operands: the same "
                   "flags give the same files (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--chat", metavar="TOKENIZER_DIR", help="write a chat task: prompts "
                   "rendered with this tokenizer's chat template (generation prompt added), SFT "
                   "responses ending with its end-of-turn token, the token vLLM stops on (e.g. "
                   "a model from `odpo toy init --tokenizer bpe`; default: plain text)")
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("report", help="Markdown + PNG report of an iterate run",
                       description="Markdown + PNG report of an iterate run")
    p.add_argument("run_dir", help="an `odpo iterate` run directory")
    p.add_argument("--compare", action="append", help="another run to overlay (repeatable)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the loss-landscape plot, "
                   "as in the runs' train config (default: 0.1)")
    p.set_defaults(func=_cmd_report)
    help_ = ("run a command on a Ray cluster as a job (ray job submit), follow its log, exit 0 "
             "if it SUCCEEDED, 1 if it FAILED or was STOPPED")
    p = sub.add_parser("submit", help=help_, description=help_)
    add_dataclass_args(p, SubmitConfig)
    p.add_argument("command_line", nargs=argparse.REMAINDER,
                   help="the job's command, after `--`: -- odpo iterate --config FILE")
    p.set_defaults(func=_cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    log = None
    try:
        # Quiet unless -v: the summary here, the rest in the output's odpo.log (jobs.console).
        # Ray is stopped at the end only when this is the process's command (`odpo ...`): a
        # caller in Python (a test, a notebook) may go on using the Ray it joined.
        with quiet(args.command, enabled=not getattr(args, "verbose", True),
                   stop_ray=argv is None) as log:
            rc = args.func(args)
    except UserError as e:
        print(f"odpo {args.command}: error: {e}{log.note() if log else ''}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print(f"odpo {args.command}: interrupted{log.note() if log else ''}", file=sys.stderr)
        rc = 130
    except Exception:
        if log and log.kept:
            print(f"odpo {args.command}: failed; log: {log.kept}", file=sys.stderr)
        raise
    if rc in (2, 130):
        # A failed stage's Ray Data actors (vLLM engines, reference models, with the GPUs and
        # memory they hold) live as long as their handles, which the traceback's frames keep in
        # reference cycles: free them now, not at some later garbage collection, so the next
        # command in this process (iterate, a test, a notebook) gets those resources.
        gc.collect()
        return rc
    if log and log.kept and not log.dest:  # no output to put it in (eval without --out)
        print(f"odpo {args.command}: log: {log.kept}", file=sys.stderr)
    if os.environ.get("ODPO_TIMING"):
        print(json.dumps({"command": args.command, "seconds": time.perf_counter() - t0}))
    return rc or 0  # commands return None, or an exit code (submit: the job's outcome)


if __name__ == "__main__":
    sys.exit(main())
