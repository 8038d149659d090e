"""The command line explains itself (every flag's help is its config field's comment, choices are
listed, `odpo --help` pictures the round), summaries come from one formatter, and a command is
quiet by default: its summary on the terminal, everything else in the output's odpo.log."""

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import build_parser, main
from jobs.config import _nested, add_dataclass_args, field_comments
from jobs.console import SUMMARIES, quiet, show, summary_lines


def _subcommands(parser: argparse.ArgumentParser, path=("odpo",)):
    """(path, parser) of every command, nested ones (`toy init`) included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


def _config_classes() -> dict[str, type]:
    """Command -> the config dataclass its flags come from."""
    from jobs.submit import SubmitConfig
    from pipeline.evaluate import EvalConfig
    from pipeline.importer import ImportConfig
    from pipeline.pair import PairConfig
    from pipeline.sample import SampleConfig
    from pipeline.score import ScoreConfig
    from pipeline.toy import ToyConfig
    from trainer.dpo import DPOConfig
    from trainer.precompute import PrecomputeConfig
    from trainer.sft import SFTConfig

    return {"sample": SampleConfig, "score": ScoreConfig, "pair": PairConfig,
            "precompute": PrecomputeConfig, "train": DPOConfig, "eval": EvalConfig,
            "sft": SFTConfig, "import": ImportConfig, "toy init": ToyConfig,
            "submit": SubmitConfig}


def _fields(cls, prefix=""):
    """(dotted name, class that declares it) of every field that becomes a flag."""
    for f in dataclasses.fields(cls):
        sub = _nested(cls, f)
        if sub is not None:
            yield from _fields(sub, f"{prefix}{f.name}.")
        elif "dict" not in str(f.type):
            yield prefix + f.name, cls


# ---------------------------------------------------------------- --help explains itself


def test_every_option_of_every_command_says_what_it_is():
    """`odpo train --help` (and every other command's) explains each flag: more than its
    default, more than that it is required."""
    seen = 0
    for path, parser in _subcommands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            said = re.sub(r"\((default|required)[^()]*\)", "", action.help or "").strip()
            assert len(said) >= 10, (" ".join(path), action.option_strings or action.dest,
                                     action.help)
            seen += 1
    assert seen > 150  # every command's flags were looked at


def test_each_flag_help_is_its_field_comment_and_default():
    parsers = dict((" ".join(path[1:]), p) for path, p in _subcommands(build_parser()))
    for command, cls in _config_classes().items():
        flags = {a.dest: a for a in parsers[command]._actions}
        for name, owner in _fields(cls):
            comment = field_comments(owner).get(name.rsplit(".", 1)[-1])
            assert comment, f"{owner.__name__}.{name} has no comment"  # unit, meaning, default
            assert flags[name].help.startswith(comment.replace("%", "%%")), (command, name)
            assert re.search(r"\((default: .*|required: flag or config file)\)$",
                             flags[name].help), (command, name, flags[name].help)


def test_field_comments_reads_inline_continued_and_preceding_comments():
    @dataclasses.dataclass
    class Config:
        a: int = 1  # the a; why 1
        # continues a's comment
        # A note about b, a sentence of its own.
        b: int = 2  # the b
        # c's comment, above it
        # on two lines
        c: int = 3
        d: int = 4

    assert field_comments(Config) == {
        "a": "the a; why 1 continues a's comment",
        "b": "the b. A note about b, a sentence of its own.",
        "c": "c's comment, above it on two lines",
    }
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Config, choices={"b": (2, 5)})
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["c"] == "c's comment, above it on two lines (default: 3)"
    assert helps["d"] == "(default: 4)"  # what the first test above refuses in the real CLI
    with pytest.raises(ValueError, match="choices for no field"):
        add_dataclass_args(argparse.ArgumentParser(), Config, choices={"e": ("x",)})


def test_choices_are_the_constants_the_code_checks(capsys):
    from pipeline.importer import BAD_ROWS
    from pipeline.pair import MODES
    from pipeline.score import NONFINITE_MODES, RM_DTYPES
    from trainer.launch import LR_SCHEDULES, TRAIN_DTYPES
    from trainer.loss import LOSS_TYPES, UNPAIRED_LOSS_TYPES
    from trainer.precompute import CACHE_MODES, DTYPES, TRUNCATION_MODES

    parsers = dict((" ".join(path[1:]), p) for path, p in _subcommands(build_parser()))
    expected = {
        "train": {"loss_type": LOSS_TYPES + UNPAIRED_LOSS_TYPES, "lr_schedule": LR_SCHEDULES,
                  "dtype": TRAIN_DTYPES},
        "sft": {"lr_schedule": LR_SCHEDULES, "dtype": TRAIN_DTYPES},
        "pair": {"mode": MODES},
        "score": {"nonfinite": NONFINITE_MODES, "rm_dtype": RM_DTYPES},
        "precompute": {"truncation": TRUNCATION_MODES, "dtype": DTYPES, "cache": CACHE_MODES},
        "import": {"bad_rows": BAD_ROWS},
    }
    for command, fields in expected.items():
        flags = {a.dest: a for a in parsers[command]._actions}
        for name, allowed in fields.items():
            assert tuple(flags[name].choices) == tuple(allowed), (command, name)
            assert "{" + ",".join(allowed) + "}" in parsers[command].format_help()
    # A value outside them: one line, exit code 2, the choices named, before any work.
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--beta", "0.1",
                 "--loss-type", "dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("odpo train: error: argument "
                                                         "--loss-type: invalid choice: 'dpo'")
    assert "'sigmoid'" in err and "odpo train --help" in err
    # A list: each name checked, the unknown one named.
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--beta", "0.1",
                 "--loss-type", "sigmoid,dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("odpo train: error: argument "
                                                         "--loss-type: invalid choice: 'dpo'")


def test_loss_lists_from_flags_and_yaml(tmp_path):
    """`--loss-type a,b,c` and `--loss-weights x,y,z` (or YAML lists) give lists; one name
    stays a string; wrong types are one-line errors."""
    from jobs.config import build, from_args
    from pipeline.errors import UserError
    from trainer.dpo import DPOConfig

    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--beta",
                              "0.1", "--loss-type", "sigmoid, bco_pair,sft",
                              "--loss-weights", "0.8,0.2,1"])
    cfg = from_args(DPOConfig, args)
    assert cfg.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert cfg.loss_weights == [0.8, 0.2, 1.0]
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--beta",
                              "0.1", "--loss-type", "kto"])
    assert from_args(DPOConfig, args).loss_type == "kto"
    base = {"model": "m", "data": "d", "out": "o", "beta": 0.1}
    cfg = build(DPOConfig, {**base, "loss_type": ["sigmoid", "nll"], "loss_weights": [1, 2]},
                "x.yaml")
    assert (cfg.loss_type, cfg.loss_weights) == (["sigmoid", "nll"], [1.0, 2.0])
    for bad, match in (({"loss_type": 3}, "loss_type must be str or a list of them"),
                       ({"loss_type": ["sigmoid", 1]}, "loss_type must be str or a list"),
                       ({"loss_weights": "0.5"}, "loss_weights must be list"),
                       ({"loss_weights": [0.5, "a"]}, "loss_weights must be list")):
        with pytest.raises(UserError, match=match):
            build(DPOConfig, {**base, **bad}, "x.yaml")
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--beta", "0.1",
                 "--loss-weights", "1,x"]) == 2
    text = next(p for path, p in _subcommands(parser) if path[1:] == ("train",)).format_help()
    assert "comma-separated" in " ".join(text.split())  # the field comment is the flag's help


def test_top_help_pictures_the_round_and_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    # The stages of a round, in order, as one chain of arrows; iterate chains the rounds.
    assert re.search(r"prompts --> sample -+> score -+> pair -+> precompute -+> train -+> eval",
                     text)
    assert re.search(r"\+-+ iterate: round k\+1 samples from the policy", text)
    assert "import --> sft on chosen --> precompute --> train" in text  # byod
    for command in ("sample", "score", "pair", "precompute", "train", "eval", "iterate", "sft",
                    "import", "byod", "toy", "report", "submit"):
        assert re.search(rf"^    {command}\b", text, re.M), command
    assert "odpo.log" in text and "-v" in text  # where the logs go


# ---------------------------------------------------------------- one summary formatter


def test_summary_lines_format_the_stage_summaries():
    sample = {"prompts": 19, "samples": 64, "prompts_sampled": 16, "k": 4, "skipped": False,
              "dropped": {"empty": 1, "too_long": 1, "repeated": 1}, "seconds": 12.34,
              "stats": {"samples_per_s": 5.21, "response_tokens_per_s": 40.4}, "out": "/r/s"}
    assert summary_lines("sample", sample) == [
        "sample: 19 prompts -> 64 samples (16 prompts x k=4; dropped prompts: empty 1, "
        "too_long 1, repeated 1), 5.2 samples/s, 40 tokens/s, in 12.3s -> /r/s"]
    # A skip: no rates (they would be an earlier run's), and says so.
    skipped = {**sample, "skipped": True, "dropped": {}}
    assert summary_lines("sample", skipped) == [
        "sample: 19 prompts -> 64 samples (16 prompts x k=4; dropped prompts: none), "
        "skipped: up to date, in 12.3s -> /r/s"]
    # A field the summary lacks, or holds None, leaves its part out.
    assert summary_lines("score", {"samples": 4, "scored": 4, "dropped": {}, "seconds": 1.0,
                                   "stats": {"mean_score": None}, "out": "o"}) == [
        "score: 4 samples -> 4 scored (dropped: none), in 1.0s -> o"]
    hit = {"pairs": 8, "dropped": {}, "cache": "hit", "source": "/c/k", "key": "ab" * 32,
           "seconds": 0.25, "out": "o", "stats": {"tokens": 1}}
    assert summary_lines("precompute", hit) == [
        f"precompute: 8 pairs (dropped: none), cache hit from /c/k (key {'ab' * 8}), in 0.2s -> o"]
    rounds = {"rounds": [{"round": 0, "greedy_reward": 0.25, "sampled_reward": 0.125,
                          "policy": "p0"}], "rounds_run": 0, "wall_s": 9.6, "report": "r.md"}
    assert summary_lines("iterate", rounds) == [
        "round 0: greedy 0.250, sampled 0.125  (p0)", "iterate: 0 rounds in 10s; report: r.md"]
    assert "train" in SUMMARIES and "sft" in SUMMARIES  # the CLI's commands all go through it


def test_every_command_prints_through_the_one_formatter():
    """No command of the CLI writes its own summary line: they call `show`."""
    import inspect

    import jobs.cli

    for name, func in inspect.getmembers(jobs.cli, inspect.isfunction):
        if name.startswith("_cmd_") and name != "_cmd_submit":
            source = inspect.getsource(func)
            assert "show(" in source and "print(" not in source, name


# ---------------------------------------------------------------- quiet by default


def test_quiet_sends_all_but_the_commands_own_lines_to_the_log(tmp_path, capfd):
    """What C code, threads (Ray's printer of the workers' output) and logging write, and
    anything on stderr but progress bars, goes to the log; the main thread's own lines reach the
    terminal; the log ends up in the output directory, a later run's appended."""
    out = tmp_path / "out"
    out.mkdir()
    noisy = logging.getLogger("test_cli.noise")
    noisy.addHandler(logging.StreamHandler(sys.__stderr__))  # made before: bound to fd 2
    try:
        for _ in range(2):
            with quiet("demo") as log:
                os.write(1, b"fd 1 noise\n")
                os.write(2, b"fd 2 noise\n")
                noisy.warning("a library's warning")
                print("stderr noise", file=sys.stderr)
                thread = threading.Thread(target=print, args=("a worker's line",))
                thread.start()
                thread.join()
                show("report", {"path": "the summary"}, log=str(out))
            assert log.kept == str(out / "odpo.log")
    finally:
        noisy.handlers.clear()
    said = capfd.readouterr()
    assert said.out == "report: the summary\n" * 2 and said.err == ""
    text = (out / "odpo.log").read_text()
    for noise in ("fd 1 noise", "fd 2 noise", "a library's warning", "stderr noise",
                  "a worker's line"):
        assert text.count(noise) == 2, noise
    assert text.count("==== odpo demo") == 2 and "the summary" not in text


def test_quiet_log_without_an_output_stays_and_is_named(tmp_path, capfd):
    with quiet("demo") as log:
        print("why it failed", file=sys.stderr)
    assert log.kept and os.path.exists(log.kept) and "why it failed" in open(log.kept).read()
    assert log.note() == f" (log: {log.kept})"
    os.unlink(log.kept)
    with quiet("demo") as log:  # nothing logged: nothing kept
        pass
    assert log.kept is None and log.note() == ""
    # A file output: the log goes beside it.
    with quiet("demo") as log:
        show("report", {"path": "x"}, log=str(tmp_path / "eval.json"))
    assert log.kept == str(tmp_path / "eval.log")
    assert capfd.readouterr().out == "report: x\n"


def _scored(path):
    rows = [{"prompt_id": f"p{p}", "prompt": f"{p}+1=", "response": f"r{i}", "sample_index": i,
             "score": float(i % 2)} for p in range(8) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_a_real_command_is_quiet_and_logs_ray_data(ray_local, tmp_path):
    """`odpo pair` (Ray Data passes) as a user runs it, in its own process (joining the session's
    Ray): its summary on stdout and nothing else; Ray's and Ray Data's lines (the execution
    plans) only in the output's odpo.log. `-v` shows them live and writes no log.

    In its own process because in pytest's the loggers were made on pytest's capture streams,
    not on file descriptors 1 and 2 as in a command's process."""
    import subprocess

    scored = _scored(tmp_path / "scored.parquet")
    address = ray_local.get_runtime_context().gcs_address

    def odpo(*argv):
        return subprocess.run([sys.executable, "-m", "jobs.cli", *argv, "--address", address],
                              capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).parent.parent)

    quiet_run = odpo("pair", "--scored", str(scored), "--out", str(tmp_path / "pairs"))
    assert quiet_run.returncode == 0, quiet_run.stderr[-3000:]
    lines = quiet_run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pair (best_worst): 8 prompts -> 8 pairs from 8 prompts"), quiet_run.stdout
    assert "Execution plan" not in quiet_run.stdout + quiet_run.stderr
    log = (tmp_path / "pairs" / "odpo.log").read_text()
    assert log.startswith("==== odpo pair") and "Execution plan of Dataset" in log
    assert "Ray's own logs" in log  # where the workers' output is

    loud = odpo("pair", "--scored", str(scored), "--out", str(tmp_path / "loud"), "-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert loud.stdout.splitlines()[-1].startswith("pair (best_worst): 8 prompts -> 8 pairs")
    assert "Execution plan of Dataset" in loud.stderr
    assert not (tmp_path / "loud" / "odpo.log").exists()
