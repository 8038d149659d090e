"""A custom task needs no code change: files + a scorer file named in the iterate config.

The README's worked example (word reversal with a partial-credit scorer) run for real.
"""

import json
import random
import string

import pytest
import yaml

from jobs.cli import main

pytestmark = pytest.mark.slow

SCORER = '''
def score(prompts, responses, rows):
    """Share of characters in the right place; a wrong length costs the missing/extra ones."""
    out = []
    for response, row in zip(responses, rows):
        got, want = response.strip(), row["target"]
        hits = sum(a == b for a, b in zip(got, want))
        out.append(hits / max(len(got), len(want), 1))
    return out
'''


def _words(n, rng, exclude=()):
    words = set()
    while len(words) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in exclude:
            words.add(w)
    return sorted(words)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reverse_task_through_iterate(ray_local, toy_model_dir, tmp_path):
    rng = random.Random(0)
    heldout = _words(32, rng)
    train = _words(256, rng, exclude=set(heldout))
    row = lambda w: {"prompt": f"reverse {w}=", "target": w[::-1]}  # noqa: E731
    (tmp_path / "my_task.py").write_text(SCORER)
    config = {
        "run_dir": str(tmp_path / "run"),
        "rounds": 1,
        "policy": toy_model_dir,
        "sft_data": _jsonl(tmp_path / "sft.jsonl", [
            {"prompt": r["prompt"], "response": r["target"]} for r in map(row, train)] * 8),
        "prompts": _jsonl(tmp_path / "prompts.jsonl", [row(w) for w in train[:64]]),
        "eval_prompts": _jsonl(tmp_path / "heldout.jsonl", [row(w) for w in heldout]),
        "scorer": str(tmp_path / "my_task.py") + ":score",
        "sft": {"max_steps": 40, "batch_size": 64},
        "sample": {"k": 4, "max_tokens": 10},
        "pair": {"mode": "best_worst"},
        "train": {"beta": 0.1, "alpha": 1.0, "lr": 5.0e-4, "batch_size": 8},
        "eval": {"samples": 2},
    }
    cfg_path = tmp_path / "reverse.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["iterate", "--config", str(cfg_path)]) == 0

    run = tmp_path / "run"
    scored = json.loads((run / "round_1" / "scored" / "manifest.json").read_text())
    # every sample scored, but those cut at max_tokens (dropped and counted, issue 15)
    assert scored["rows_in"] == 64 * 4
    assert scored["rows_out"] + scored["dropped"].get("truncated", 0) == 64 * 4
    pairs = json.loads((run / "round_1" / "pairs" / "manifest.json").read_text())
    assert pairs["rows_out"] >= 8
    for k in (0, 1):
        e = json.loads((run / f"round_{k}" / "eval.json").read_text())
        assert e["num_prompts"] == 32
        # The reward is the scorer's, recomputed here from the greedy texts.
        want = [w[::-1] for w in heldout]
        expect = []
        for g, t in zip(e["greedy_texts"], want, strict=True):
            g = g.strip()
            hits = sum(g[i] == t[i] for i in range(min(len(g), len(t))))
            expect.append(hits / max(len(g), len(t), 1))
        assert abs(e["greedy_reward"] - sum(expect) / len(expect)) < 1e-9
