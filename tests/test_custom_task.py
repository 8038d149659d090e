"""A custom task needs no code change: files + a scorer file named in the iterate config.

README's worked example (word reversal with a partial-credit scorer), checked as written: its
scorer file gives the hand-derived scores, and its config is a valid `odpo iterate` config whose
policy, data files, scorer file and sections reach the steps (stand-ins, no Ray). The real round
with a scorer file, JSONL data and metadata columns reaching the scorer is the suite's
end-to-end run (`e2e_run`, checked in tests/test_iterate.py)."""

import json
import re
from pathlib import Path

from conftest import stub_steps

from jobs.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(first_line: str) -> str:
    """The fenced code block of README's "Your own task" section that starts with `first_line`."""
    section = README.read_text().split("### Your own task", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\w*\n(.*?)```", section, flags=re.S)
    [block] = [b for b in blocks if b.startswith(first_line)]
    return block


def test_readme_scorer_gives_partial_credit():
    scope: dict = {}
    exec(_block("# my_task.py"), scope)  # noqa: S102 - the README's own example code
    responses = ["cba", " cba\n", "cbx", "cb", "abcd", ""]
    rows = [{"prompt": "reverse abc=", "target": "cba"}] * len(responses)
    # in-place characters / the longer of the two lengths, by hand
    assert scope["score"](["reverse abc="] * 6, responses, rows) == [
        1.0, 1.0, 2 / 3, 2 / 3, 1 / 4, 0.0]


def test_readme_config_runs_the_rounds(tmp_path, monkeypatch):
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)  # README's relative paths, in a fresh project dir
    (tmp_path / "reverse.yaml").write_text(_block("# reverse.yaml"))
    (tmp_path / "my_task.py").write_text(_block("# my_task.py"))
    (tmp_path / "runs" / "toy_addition" / "toy").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    for name, row in (("sft", {"prompt": "reverse abc=", "response": "cba"}),
                      ("prompts", {"prompt": "reverse abc=", "target": "cba"}),
                      ("heldout", {"prompt": "reverse xyz=", "target": "zyx"})):
        (tmp_path / "data" / f"reverse_{name}.jsonl").write_text(json.dumps(row) + "\n")
    assert main(["iterate", "--config", "reverse.yaml"]) == 0

    scorer = f"{tmp_path}/my_task.py:score"  # absolute: Ray workers run elsewhere
    steps = [step for step, _ in calls]
    assert steps == ["sft", "eval"] + ["sample", "score", "pair", "precompute", "train",
                                       "eval"] * 2
    by_step = {step: cfg for step, cfg in calls}  # the last call of each
    assert by_step["sft"].model == str(tmp_path / "runs" / "toy_addition" / "toy")
    assert by_step["sft"].data == str(tmp_path / "data" / "reverse_sft.jsonl")
    assert by_step["sample"].prompts == str(tmp_path / "data" / "reverse_prompts.jsonl")
    assert (by_step["sample"].k, by_step["sample"].max_tokens) == (8, 10)
    assert by_step["score"].scorer == by_step["eval"].scorer == scorer
    assert by_step["eval"].prompts == str(tmp_path / "data" / "reverse_heldout.jsonl")
    assert by_step["pair"].mode == "best_worst"
    train = by_step["train"]
    assert (train.beta, train.alpha, train.lr, train.batch_size) == (0.1, 1.0, 5.0e-4, 32)
    assert by_step["eval"].out == str(tmp_path / "runs" / "reverse" / "round_2" / "eval.json")
