"""`odpo iterate` end to end on a small config: layout, accounting, report, resume."""

import json

import pytest
import yaml
from conftest import write_digits_scorer

from jobs.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def iterate_run(ray_local, sft_run, toy_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("iterate") / "run"
    # The 40-step SFT model is rarely exactly right, so the test scores partial credit (share of
    # answer digits in place) and pairs best against worst: every round has pairs to train on.
    scorer = write_digits_scorer(run.parent / "digits.py")
    config = {
        "run_dir": str(run),
        "rounds": 1,
        "policy": str(sft_run / "model"),
        "prompts": str(toy_data_dir / "prompts.parquet"),
        "eval_prompts": str(toy_data_dir / "heldout.parquet"),
        "scorer": scorer,
        "sample": {"k": 4, "max_tokens": 8},
        "pair": {"mode": "best_worst"},
        "train": {"beta": 0.1, "alpha": 1.0, "lr": 5.0e-4, "batch_size": 8, "log_every": 1},
        "eval": {"samples": 2},
    }
    path = run.parent / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["iterate", "--config", str(path)]) == 0
    return run, path


def test_layout_and_rewards(iterate_run):
    run, _ = iterate_run
    summary = json.loads((run / "iterate_summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for k in (0, 1):
        e = json.loads((run / f"round_{k}" / "eval.json").read_text())
        assert 0.0 <= e["greedy_reward"] <= 1.0 and e["num_prompts"] == 64
    for stage in ("samples", "scored", "pairs", "reference"):
        assert (run / "round_1" / stage / "manifest.json").exists(), stage
    assert (run / "round_1" / "train" / "model" / "model.safetensors").exists()


def _shard_rows(stage_dir):
    """Rows read back from the stage's shards, not from its manifest's counts."""
    import pyarrow.parquet as pq

    return [r for f in sorted(stage_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_stage_accounts_for_every_row(iterate_run, toy_data_dir):
    """rows in = rows out (or kept) + dropped by reason in every manifest, each count equal to
    the rows actually in the shards, and each stage's input the previous stage's output."""
    from collections import Counter

    import pyarrow.parquet as pq

    run, _ = iterate_run
    m = {s: json.loads((run / "round_1" / s / "manifest.json").read_text())
         for s in ("samples", "scored", "pairs", "reference")}
    rows = {s: _shard_rows(run / "round_1" / s) for s in m}
    for s in m:
        assert m[s]["rows_out"] == len(rows[s]), s
        kept = m[s].get("rows_kept", m[s]["rows_out"])
        assert m[s]["rows_in"] == kept + sum(m[s]["dropped"].values()), s
    # sample: prompts in = prompts sampled + prompts dropped; k samples each
    prompts = pq.read_table(toy_data_dir / "prompts.parquet")
    assert m["samples"]["rows_in"] == prompts.num_rows == 64
    per_prompt = Counter(r["prompt_id"] for r in rows["samples"])
    assert len(per_prompt) == m["samples"]["rows_kept"] and set(per_prompt.values()) == {4}
    # score: one row per sample, the same samples
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    assert m["scored"]["rows_in"] == len(rows["samples"])
    dropped_scores = sum(m["scored"]["dropped"].values())
    assert {key(r) for r in rows["scored"]} <= {key(r) for r in rows["samples"]}
    assert len({key(r) for r in rows["scored"]}) == len(rows["samples"]) - dropped_scores
    # pair: prompts in = prompts with pairs + prompts dropped by reason
    assert m["pairs"]["rows_in"] == len({r["prompt_id"] for r in rows["scored"]})
    assert m["pairs"]["rows_kept"] == len({r["prompt_id"] for r in rows["pairs"]})
    # reference: one row per pair, the same pairs
    pair = lambda r: (r["prompt_id"], r["chosen"], r["rejected"])  # noqa: E731
    stored, source = Counter(map(pair, rows["reference"])), Counter(map(pair, rows["pairs"]))
    assert not stored - source  # no pair invented or repeated
    assert source.total() - stored.total() == sum(m["reference"]["dropped"].values())
    # train: every reference row is a training pair
    summary = json.loads((run / "round_1" / "train" / "train_summary.json").read_text())
    assert summary["pairs"] == m["reference"]["rows_out"]
    # whole batches only (batch_size 8): the rest of each epoch is reported, not silent
    assert summary["pairs_left_over_per_epoch"] == summary["pairs"] % 8


def test_report_has_plots(iterate_run):
    run, _ = iterate_run
    md = (run / "report" / "report.md").read_text()
    for png in ("reward.png", "logps.png", "rewards.png", "funnel.png", "landscape.png"):
        assert (run / "report" / png).stat().st_size > 1000, png
        assert png in md


def test_rerun_skips_finished_and_redoes_half_done(iterate_run, capsys):
    run, path = iterate_run
    train = run / "round_1" / "train"
    before = {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("manifest.json")}
    model_mtime = (train / "model" / "model.safetensors").stat().st_mtime_ns
    # Simulate a run interrupted after training but before its evaluation was written.
    (run / "round_1" / "eval.json").unlink()
    assert main(["iterate", "--config", str(path)]) == 0
    after = {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("manifest.json")}
    assert before == after  # sample/score/pair/reference were skipped, not rewritten
    assert (train / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime
    assert (run / "round_1" / "eval.json").exists()


def test_changed_train_section_retrains_and_reevaluates(iterate_run, capsys):
    """A beta sweep on the same run_dir: the changed `train:` section retrains the round (not
    resumed from the old checkpoints, not skipped) and everything downstream of it (its eval),
    while the stages upstream are skipped; the run dir then describes what it holds."""
    import yaml

    run, path = iterate_run
    config = yaml.safe_load(path.read_text())
    config["train"]["beta"] = 0.5
    swept = path.parent / "iterate_beta.yaml"
    swept.write_text(yaml.safe_dump(config))
    train = run / "round_1" / "train"
    upstream = {s: (run / "round_1" / s / "manifest.json").read_text()
                for s in ("samples", "scored", "pairs", "reference")}
    weights = (train / "model" / "model.safetensors").read_bytes()
    eval_before = json.loads((run / "round_1" / "eval.json").read_text())
    capsys.readouterr()
    assert main(["iterate", "--config", str(swept)]) == 0
    out = capsys.readouterr().out
    assert "holds a run with another config; starting over" in out
    for s, text in upstream.items():
        assert (run / "round_1" / s / "manifest.json").read_text() == text, s
    assert (train / "model" / "model.safetensors").read_bytes() != weights
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["beta"] == 0.5
    metrics = [json.loads(x) for x in (train / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0  # trained from the start, not resumed
    eval_after = json.loads((run / "round_1" / "eval.json").read_text())
    assert eval_after["inputs"]["model"] != eval_before.get("inputs", {}).get("model")
    assert json.loads((run / "iterate_config.json").read_text())["train"]["beta"] == 0.5
    # The same config again: nothing is redone.
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("*.json")}
    assert main(["iterate", "--config", str(swept)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("*.json")} == mtimes
