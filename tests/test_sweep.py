"""`odpo sweep`: the shared steps once, every variant's rounds from them, on stand-in steps
(`stub_steps`, no Ray); the steps themselves are tested on their own, and iterate runs a real
round (tests/test_iterate.py)."""

import json

import pytest
import yaml
from conftest import stub_steps
from test_iterate import _files, _picked, _round

from jobs.cli import main
from jobs.sweep import SweepConfig, run_sweep
from pipeline.errors import UserError


def _sweep(tmp_path, variants: dict, **base) -> SweepConfig:
    files = _files(tmp_path)
    recipe = {**files, "rounds": 2, "sft_data": str(tmp_path / "sft.jsonl"),
              "pair": {"mode": "correct_incorrect"}, "train": {"beta": 0.1, "alpha": 1.0},
              **base}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return SweepConfig(iterate=str(tmp_path / "recipe.yaml"), variants=variants,
                       run_dir=str(tmp_path / "sweep"))


def test_variants_share_sft_and_round_one_samples(tmp_path, monkeypatch):
    """SFT, round 0's eval and round 1's sampling and scoring run once; each variant pairs and
    trains round 1 from the shared scored samples with its own sections, then samples round 2
    from its own round-1 policy; the report puts every variant side by side."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = _sweep(tmp_path, {"dpo_nll": {}, "ipo": {"train": {"loss_type": "ipo", "alpha": 0.0}},
                            "init": {"ref_model": "initial"}})
    summary = run_sweep(cfg)

    sweep, scorer = str(tmp_path / "sweep"), f"{tmp_path}/my_task.py:score"
    sft, shared = f"{sweep}/sft/model", f"{sweep}/round_1"
    places = {"scorer": scorer, "prompts": str(tmp_path / "prompts.jsonl"),
              "heldout": str(tmp_path / "heldout.jsonl")}
    expected = [
        ("sft", {"out": f"{sweep}/sft"}),
        ("eval", {"model": sft, "out": f"{sweep}/round_0/eval.json"}),
        *_round(sweep, 1, sft, sft, 1, **places)[:2],  # sample, score: once
    ]
    for name, train, ref_2 in (
        ("dpo_nll", {"beta": 0.1, "alpha": 1.0}, None),
        ("ipo", {"beta": 0.1, "alpha": 0.0, "loss_type": "ipo"}, None),
        ("init", {"beta": 0.1, "alpha": 1.0}, sft),
    ):
        run = f"{sweep}/{name}"
        one = _round(run, 1, sft, sft, 1, **places, train={"alpha": train["alpha"]})[2:]
        one[0] = ("pair", {**one[0][1], "scored": f"{shared}/scored"})  # the shared samples
        policy = f"{run}/round_1/train/model"
        two = _round(run, 2, policy, ref_2 or policy, 2, **places, train=train)
        expected += one + two
    assert _picked(calls, expected) == expected
    for step, c in calls:
        if step == "train" and "/ipo/" in c.out:
            assert c.loss_type == "ipo"

    variants = summary["variants"]
    assert list(variants) == ["dpo_nll", "ipo", "init"]
    for name, v in variants.items():
        assert [r["round"] for r in v["rounds"]] == [0, 1, 2]
        assert v["rounds"][0]["greedy_reward"] == 0.1  # the shared round 0, for every variant
        run = tmp_path / "sweep" / name
        assert json.loads((run / "round_0" / "eval.json").read_text())["greedy_reward"] == 0.1
        assert json.loads((run / "round_1" / "shared.json").read_text())["scored"] == \
            f"{shared}/scored"
        assert (run / "report" / "report.md").exists()
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    for name in variants:
        assert f"| {name} |" in report
    assert "loss_type=ipo" in report
    assert summary["table"].splitlines()[0].startswith("| variant | recipe | round 0 |")
    for png in ("reward.png", "logps.png", "rewards.png"):
        assert (tmp_path / "sweep" / "report" / png).stat().st_size > 1000, png


@pytest.mark.parametrize("variants, message", [
    ({"bad": {"sample": {"k": 2}}}, "variant bad: ['sample'] cannot vary in a sweep"),
    ({"bad": {"sft": {}}}, "variant bad: ['sft'] cannot vary in a sweep"),
    ({"sft": {}}, "variant name 'sft'"),
    ({"round_1": {}}, "variant name 'round_1'"),
    ({"a b": {}}, "variant name 'a b'"),
    ({"bad": {"train": {"loss_type": "nope"}}}, "variant bad: loss_type"),
    ({"bad": {"train": {"loss_type": "kto"}}}, "variant bad: pair: mode correct_incorrect makes"),
    ({}, "variants: give at least one"),
])
def test_bad_variants_fail_before_any_step(tmp_path, monkeypatch, variants, message):
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_sweep(_sweep(tmp_path, variants))
    assert calls == []


def test_the_command_prints_the_table(tmp_path, monkeypatch, capsys):
    stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = _sweep(tmp_path, {"a": {}, "b": {"train": {"alpha": 0.0}}}, rounds=1)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"iterate": cfg.iterate, "variants": cfg.variants}))
    assert main(["sweep", "--config", str(path), "--run-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert "| variant | recipe | round 0 | round 1 | wall |" in out
    assert "sweep: 2 variants in" in out and f"{tmp_path}/elsewhere/report/report.md" in out
