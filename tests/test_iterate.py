"""`odpo iterate`: one real round, the suite's end-to-end run (`e2e_run` in conftest: layout,
accounting, rewards, report, a run stopped and re-run, a changed section), and the sequencing of
rounds, policies, references, seeds and sections on stand-in steps (`stub_steps`, no Ray)."""

import dataclasses
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import stub_steps

from jobs.cli import main
from jobs.iterate import IterateConfig, run_iterate
from pipeline import storage

STAGES = ("samples", "scored", "pairs", "precompute")


# ---------------------------------------------------------------- the real round


def test_layout_and_rewards(e2e_run):
    run = e2e_run["run"]
    summary = json.loads((run / "iterate_summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert [r["policy"] for r in summary["rounds"]] == [
        str(run / "sft" / "model"), str(run / "round_1" / "train" / "model")]
    for k in (0, 1):
        e = json.loads((run / f"round_{k}" / "eval.json").read_text())
        assert 0.0 <= e["greedy_reward"] <= 1.0 and e["num_prompts"] == 64
        assert len(e["greedy_texts"]) == 64  # round 1: the DPO checkpoint loaded in vLLM as is
    for stage in STAGES:
        assert (run / "round_1" / stage / "manifest.json").exists(), stage
    for step in ("sft", "round_1/train"):
        assert (run / step / "model" / "model.safetensors").exists(), step


def test_rewards_are_the_scorer_on_the_greedy_texts(e2e_run, toy_data_dir):
    """Each round's reward, recomputed here from its greedy texts with the run's scorer rule
    (share of answer digits in place) on the held-out rows, which reach the scorer from JSONL."""
    answers = [r["answer"] for r in pq.read_table(toy_data_dir / "heldout.parquet").to_pylist()]
    for k in (0, 1):
        e = json.loads((e2e_run["run"] / f"round_{k}" / "eval.json").read_text())
        expect = []
        for text, want in zip(e["greedy_texts"], answers, strict=True):
            got = text.strip()
            hits = sum(a == b for a, b in zip(got, want, strict=False))
            expect.append(hits / max(len(got), len(want), 1))
        assert e["greedy_reward"] == pytest.approx(sum(expect) / len(expect), abs=1e-12)


def _shard_rows(stage_dir):
    """Rows read back from the stage's shards, not from its manifest's counts."""
    return [r for f in sorted(stage_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_stage_accounts_for_every_row(e2e_run, sample_prompts):
    """rows in = rows out (or kept) + dropped by reason in every manifest, each count equal to
    the rows actually in the shards, and each stage's input the previous stage's output."""
    r1 = e2e_run["run"] / "round_1"
    m = {s: json.loads((r1 / s / "manifest.json").read_text()) for s in STAGES}
    rows = {s: _shard_rows(r1 / s) for s in m}
    for s in m:
        assert m[s]["rows_out"] == len(rows[s]), s
        kept = m[s].get("rows_kept", m[s]["rows_out"])
        assert m[s]["rows_in"] == kept + sum(m[s]["dropped"].values()), s
    # sample: prompts in = prompts sampled + prompts dropped (empty, too long, repeated); k each
    assert m["samples"]["rows_in"] == pq.read_table(sample_prompts).num_rows == 19
    assert m["samples"]["dropped"] == {"empty_prompt": 1, "prompt_too_long": 1,
                                       "duplicate_prompt": 1}
    per_prompt = Counter(r["prompt_id"] for r in rows["samples"])
    assert len(per_prompt) == m["samples"]["rows_kept"] == 16 and set(per_prompt.values()) == {4}
    # score: one row per sample, the same samples; those cut at max_tokens dropped and counted
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    assert m["scored"]["rows_in"] == len(rows["samples"]) == 64
    assert set(m["scored"]["dropped"]) <= {"truncated"}
    cut = sum(r["finish_reason"] == "length" for r in rows["samples"])
    assert m["scored"]["dropped"].get("truncated", 0) == cut
    assert {key(r) for r in rows["scored"]} == {key(r) for r in rows["samples"]
                                                if r["finish_reason"] == "stop"}
    # pair: prompts in = prompts with pairs + prompts dropped by reason
    assert m["pairs"]["rows_in"] == len({r["prompt_id"] for r in rows["scored"]})
    assert m["pairs"]["rows_kept"] == len({r["prompt_id"] for r in rows["pairs"]}) > 0
    # precompute: one row per pair, the same pairs
    pair = lambda r: (r["prompt_id"], r["chosen"], r["rejected"])  # noqa: E731
    stored, source = Counter(map(pair, rows["precompute"])), Counter(map(pair, rows["pairs"]))
    assert not stored - source  # no pair invented or repeated
    assert source.total() - stored.total() == sum(m["precompute"]["dropped"].values())
    # train: every precompute row is a training pair, in whole batches of 4 (24 steps); the
    # rest of each epoch is reported, not silent
    summary = json.loads((r1 / "train" / "train_summary.json").read_text())
    assert summary["pairs"] == m["precompute"]["rows_out"] >= 4
    assert summary["steps"] == 24
    assert summary["pairs_left_over_per_epoch"] == summary["pairs"] % 4


def test_report_has_plots(e2e_run):
    run = e2e_run["run"]
    md = (run / "report" / "report.md").read_text()
    for png in ("reward.png", "logps.png", "rewards.png", "funnel.png", "landscape.png"):
        assert (run / "report" / png).stat().st_size > 1000, png
        assert png in md


def test_a_stopped_run_resumes_where_it_stopped(e2e_run):
    """The run was stopped as round 1's training began, and run again (README, Reliability): the
    re-run skipped every finished step, rewriting none of their files, and did the rest."""
    run, stopped = e2e_run["run"], e2e_run["stopped"]
    finished = {run / "sft" / "manifest.json", run / "round_0" / "eval.json",
                *(run / "round_1" / s / "manifest.json" for s in STAGES)}
    assert set(stopped) == finished
    for path, mtime in stopped.items():
        assert path.stat().st_mtime_ns == mtime, path
    assert json.loads((run / "round_1" / "train" / "manifest.json").read_text())["complete"]
    assert (run / "round_1" / "eval.json").exists()


def test_changed_train_section_retrains_and_reevaluates(e2e_run, tmp_path, capsys):
    """A beta sweep on the same run_dir, through `odpo iterate --config`: the changed `train:`
    section retrains the round (not resumed from the old checkpoints, not skipped) and
    everything downstream of it (its eval), while the steps upstream are skipped; the run dir
    then describes what it holds. (Last of the real-run tests: it retrains round 1.)"""
    run = e2e_run["run"]
    config = dataclasses.asdict(e2e_run["cfg"])
    config["train"] = {**config["train"], "beta": 0.5, "max_steps": 4}
    swept = tmp_path / "iterate_beta.yaml"
    swept.write_text(yaml.safe_dump(config))
    train = run / "round_1" / "train"
    upstream = {p: p.read_text() for p in [run / "sft" / "manifest.json",
                                           run / "round_0" / "eval.json",
                                           *(run / "round_1" / s / "manifest.json"
                                             for s in STAGES)]}
    weights = (train / "model" / "model.safetensors").read_bytes()
    eval_before = json.loads((run / "round_1" / "eval.json").read_text())
    capsys.readouterr()
    assert main(["iterate", "--config", str(swept)]) == 0
    out = capsys.readouterr().out
    assert "holds a run with another config; starting over" in out
    for path, text in upstream.items():
        assert path.read_text() == text, path
    assert (train / "model" / "model.safetensors").read_bytes() != weights
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["beta"] == 0.5
    metrics = [json.loads(x) for x in (train / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # from the start, not resumed
    eval_after = json.loads((run / "round_1" / "eval.json").read_text())
    assert eval_after["inputs"]["model"] != eval_before["inputs"]["model"]
    assert json.loads((run / "iterate_config.json").read_text())["train"]["beta"] == 0.5
    # The same config again: nothing is redone.
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("*.json")}
    assert main(["iterate", "--config", str(swept)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "round_1").rglob("*.json")} == mtimes


# ---------------------------------------------------------------- sequencing, on stand-ins


def _files(tmp_path) -> dict[str, str]:
    """An existing policy dir, prompt files and a scorer file named relative to the cwd."""
    (tmp_path / "policy").mkdir()
    for name in ("prompts", "heldout", "sft"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "my_task.py").write_text("def score(prompts, responses, rows):\n"
                                         "    return [0.0] * len(responses)\n")
    return {"run_dir": str(tmp_path / "run"), "policy": str(tmp_path / "policy"),
            "prompts": str(tmp_path / "prompts.jsonl"),
            "eval_prompts": str(tmp_path / "heldout.jsonl"), "scorer": "my_task.py:score"}


def _picked(calls, expected):
    """The steps run, each with the fields of its config that `expected` names."""
    assert [step for step, _ in calls] == [step for step, _ in expected]
    return [(step, {k: getattr(cfg, k) for k in want})
            for (step, cfg), (_, want) in zip(calls, expected, strict=True)]


def _round(run, k, policy, ref_model, seed, scorer, prompts, heldout, **sections):
    r = f"{run}/round_{k}"
    return [
        ("sample", {"model": policy, "prompts": prompts, "out": f"{r}/samples", "seed": seed,
                    **sections.get("sample", {})}),
        ("score", {"samples": f"{r}/samples", "out": f"{r}/scored", "scorer": scorer}),
        ("pair", {"scored": f"{r}/scored", "out": f"{r}/pairs", "round": k,
                  **sections.get("pair", {})}),
        ("precompute", {"pairs": f"{r}/pairs", "model": ref_model, "out": f"{r}/precompute"}),
        ("train", {"model": policy, "data": f"{r}/precompute", "out": f"{r}/train", "seed": seed,
                   **sections.get("train", {})}),
        ("eval", {"model": f"{r}/train/model", "prompts": heldout, "scorer": scorer,
                  "out": f"{r}/eval.json", **sections.get("eval", {})}),
    ]


def test_rounds_chain_policies_seeds_and_sections(tmp_path, monkeypatch):
    """SFT first, then round k samples and trains with policy k-1 (its reference: policy k-1),
    seed + k, each section reaching its step, the scorer file made absolute for the workers;
    a re-run runs every step again (each skips itself when current) with the same configs but
    the changed section's."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    sections = {"sample": {"k": 3}, "pair": {"mode": "best_worst"}, "train": {"beta": 0.3},
                "eval": {"samples": 2}}
    cfg = IterateConfig(**files, rounds=2, sft_data=str(tmp_path / "sft.jsonl"), seed=10,
                        sft={"max_steps": 5}, **sections)
    summary = run_iterate(cfg)

    run, scorer = files["run_dir"], f"{tmp_path}/my_task.py:score"
    sft = f"{run}/sft/model"
    places = {"scorer": scorer, "prompts": files["prompts"], "heldout": files["eval_prompts"]}
    expected = [
        ("sft", {"model": files["policy"], "data": str(tmp_path / "sft.jsonl"),
                 "out": f"{run}/sft", "max_steps": 5}),
        ("eval", {"model": sft, "prompts": files["eval_prompts"], "scorer": scorer,
                  "out": f"{run}/round_0/eval.json", "samples": 2}),
        *_round(run, 1, sft, sft, 11, **places, **sections),
        *_round(run, 2, f"{run}/round_1/train/model", f"{run}/round_1/train/model", 12,
                **places, **sections),
    ]
    assert _picked(calls, expected) == expected
    assert [(r["round"], r["policy"], r["greedy_reward"]) for r in summary["rounds"]] == [
        (0, sft, 0.1), (1, f"{run}/round_1/train/model", 0.2),
        (2, f"{run}/round_2/train/model", 0.3)]
    assert summary["report"] == f"{run}/report/report.md"
    for png in ("reward.png", "logps.png", "rewards.png", "funnel.png", "landscape.png"):
        assert (tmp_path / "run" / "report" / png).stat().st_size > 1000, png

    first = list(calls)
    calls.clear()
    run_iterate(dataclasses.replace(cfg, train={"beta": 0.5}))
    assert [step for step, _ in calls] == [step for step, _ in first]
    for (step, again), (_, before) in zip(calls, first, strict=True):
        assert again == (dataclasses.replace(before, beta=0.5) if step == "train" else before)


def test_ref_model_initial_keeps_the_first_policy(tmp_path, monkeypatch):
    """`ref_model: initial` (OpenRLHF's choice): every round's reference is the initial policy,
    while each round samples and trains with the previous round's; no `sft_data`: no SFT."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    run_iterate(IterateConfig(**files, rounds=2, ref_model="initial", train={"beta": 0.1}))
    run, policy = files["run_dir"], files["policy"]
    places = {"scorer": f"{tmp_path}/my_task.py:score", "prompts": files["prompts"],
              "heldout": files["eval_prompts"]}
    expected = [
        ("eval", {"model": policy, "out": f"{run}/round_0/eval.json"}),
        *_round(run, 1, policy, policy, 1, **places),
        *_round(run, 2, f"{run}/round_1/train/model", policy, 2, **places),
    ]
    assert _picked(calls, expected) == expected


def test_toy_sections_and_the_command_line(tmp_path, monkeypatch, capsys):
    """`toy_model:` / `toy_data:` make the toy model and task data inside the run dir and feed
    them to SFT, sampling and eval; `odpo iterate --rounds` overrides the config and prints each
    round; a bad section stops the command before any step runs."""
    calls = stub_steps(monkeypatch)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "rounds": 3, "scorer": "addition", "toy_model": {},
        "toy_data": {"sft_rows": 32, "prompts": 4, "heldout": 4}, "train": {"beta": 0.1}}))
    assert main(["iterate", "--config", str(path), "--rounds", "1"]) == 0
    run = tmp_path / "run"
    expected = [
        ("sft", {"model": str(run / "toy"), "data": str(run / "data" / "sft.parquet")}),
        ("eval", {"model": str(run / "sft" / "model"),
                  "prompts": str(run / "data" / "heldout.parquet")}),
        ("sample", {"model": str(run / "sft" / "model"),
                    "prompts": str(run / "data" / "prompts.parquet")}),
        ("score", {}), ("pair", {}), ("precompute", {}), ("train", {}), ("eval", {}),
    ]
    assert _picked(calls, expected) == expected
    assert json.loads((run / "toy" / "config.json").read_text())["model_type"] == "llama"
    assert pq.read_table(run / "data" / "prompts.parquet").num_rows == 4
    out = capsys.readouterr().out
    assert "round 0: greedy 0.100" in out and "round 1: greedy 0.200" in out
    assert "iterate: 1 rounds" in out

    calls.clear()
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "bad"), "scorer": "addition",
                                    "toy_model": {}, "toy_data": {}, "train": {"betta": 0.1}}))
    assert main(["iterate", "--config", str(path)]) == 2
    assert "unknown key(s) ['betta']" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "bad").exists()


def test_run_dir_policy_and_prompts_on_s3(s3_server, tmp_path, monkeypatch):
    """Everything named by URI: every step is handed URIs under the run dir, and the config,
    the summary and the report (read back from the steps' files) are written there."""
    calls = stub_steps(monkeypatch)
    b = s3_server("iterate")
    storage.write_text(f"{b}/sft/config.json", "{}")
    for name in ("prompts", "heldout"):
        storage.write_text(f"{b}/data/{name}.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    run = f"{b}/run"
    summary = run_iterate(IterateConfig(
        run_dir=run, rounds=1, policy=f"{b}/sft", prompts=f"{b}/data/prompts.jsonl",
        eval_prompts=f"{b}/data/heldout.jsonl", scorer="addition", train={"beta": 0.1}))
    outs = [cfg.out for _, cfg in calls]
    assert len(outs) == 7 and all(o.startswith(f"{run}/round_") for o in outs), outs
    assert summary["run_dir"] == run and summary["report"] == f"{run}/report/report.md"
    for name in ("iterate_config.json", "iterate_summary.json", "report/report.md",
                 "report/reward.png", "report/funnel.png"):
        assert storage.is_file(f"{run}/{name}"), name
    assert not list(tmp_path.iterdir())  # nothing written on local disk


@pytest.mark.parametrize("variant", ["fsdp", "lora"])
def test_real_model_recipe_reaches_every_step(tmp_path, monkeypatch, variant):
    """jobs/configs/real_model_gpu.yaml (a hub chat model on GPUs: FSDP, bfloat16, gradient
    checkpointing; its commented variant: LoRA with DDP) is a valid config whose every section
    reaches its step, with the toy's files standing in for the hub model and the user's data."""
    from pathlib import Path

    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "configs" /
                             "real_model_gpu.yaml").read_text())
    if variant == "lora":
        recipe["train"] = {**recipe["train"], "strategy": "ddp",
                           "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                    "target_modules": "all-linear"}}
    files = _files(tmp_path)
    summary = run_iterate(IterateConfig(**{**recipe, **files}))
    steps = dict(calls)  # the last config of each step: round 2's
    assert [step for step, _ in calls] == ["eval"] + [
        "sample", "score", "pair", "precompute", "train", "eval"] * 2
    train, sample, precompute = steps["train"], steps["sample"], steps["precompute"]
    assert (train.strategy, train.dtype, train.num_workers, train.use_gpu) == (
        "fsdp" if variant == "fsdp" else "ddp", "bfloat16", 4, True)
    assert train.gradient_checkpointing and train.lr == 5e-7 and train.alpha == 1.0
    assert train.lora.r == (16 if variant == "lora" else 0)
    assert (sample.engine.use_gpu, sample.engine.dtype, sample.engine.replicas) == (
        True, "bfloat16", 2)
    assert (precompute.use_gpu, precompute.dtype, precompute.replicas) == (True, "bfloat16", 2)
    assert steps["eval"].engine.use_gpu and steps["pair"].min_margin == 0.1
    assert len(summary["rounds"]) == 3


def test_reference_free_loss_runs_no_reference_model(tmp_path, monkeypatch):
    """`train: {loss_type: simpo}` (or orpo): each round's precompute step only tokenizes
    (`logps: false`, the policy's tokenizer), whatever `ref_model` says, and training reads the
    ids alone; a reference-based loss keeps its reference model."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    run_iterate(IterateConfig(**files, rounds=2, ref_model="initial",
                              train={"beta": 2.0, "loss_type": "simpo"}))
    pre = [cfg for step, cfg in calls if step == "precompute"]
    trained = [cfg for step, cfg in calls if step == "train"]
    assert [c.logps for c in pre] == [False, False]
    assert [c.model for c in pre] == [t.model for t in trained]  # the policy's tokenizer
    assert pre[1].model == f"{files['run_dir']}/round_1/train/model"
    calls.clear()
    run_iterate(IterateConfig(**files, rounds=2, ref_model="initial", train={"beta": 0.1}))
    pre = [cfg for step, cfg in calls if step == "precompute"]
    assert [(c.logps, c.model) for c in pre] == [(True, files["policy"])] * 2


def test_reference_free_loss_with_a_live_reference_is_refused():
    from pipeline.errors import UserError
    from trainer.dpo import DPOConfig, check_config

    with pytest.raises(UserError, match="needs no reference model"):
        check_config(DPOConfig(model="m", data="d", out="o", beta=2.0, loss_type="orpo",
                               ref_logps="live"))


def test_kto_rounds_pair_unpaired_rows(tmp_path, monkeypatch):
    """`train: {loss_type: kto}`: each round runs score -> pair (`mode: unpaired`, the default
    with kto) -> precompute (with the reference: kto is not reference-free) -> train; the
    stand-in trainer's metrics carry no accuracies and the report is still written."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    summary = run_iterate(IterateConfig(**files, rounds=2, ref_model="initial",
                                        train={"beta": 0.1, "loss_type": "kto",
                                               "desirable_weight": 1.2}))
    steps = [step for step, _ in calls]
    assert steps == ["eval"] + ["sample", "score", "pair", "precompute", "train", "eval"] * 2
    pairs = [cfg for step, cfg in calls if step == "pair"]
    assert [(c.mode, c.threshold) for c in pairs] == [("unpaired", 0.5)] * 2
    pre = [cfg for step, cfg in calls if step == "precompute"]
    assert [(c.logps, c.model) for c in pre] == [(True, files["policy"])] * 2
    trained = [cfg for step, cfg in calls if step == "train"]
    assert [(c.loss_type, c.desirable_weight) for c in trained] == [("kto", 1.2)] * 2
    assert summary["report"].endswith("report/report.md")


@pytest.mark.parametrize("pair, train, match", [
    ({"mode": "correct_incorrect"}, {"beta": 0.1, "loss_type": "kto"},
     "pair: mode correct_incorrect makes pairs, but train: loss_type kto"),
    ({"mode": "unpaired"}, {"beta": 0.1}, "pair: mode unpaired makes unpaired rows"),
    ({"mode": "unpaired"}, {"beta": 0.1, "loss_type": ["sigmoid", "sft"]},
     "only train: loss_type kto reads"),
])
def test_pair_mode_and_kto_must_agree(tmp_path, monkeypatch, pair, train, match):
    """A paired mode with kto, or unpaired rows with a pairwise loss: one line, before any
    step runs."""
    from pipeline.errors import UserError

    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match) as e:
        run_iterate(IterateConfig(**_files(tmp_path), pair=pair, train=train))
    assert len(str(e.value).splitlines()) == 1 and calls == []


def test_loss_list_in_iterate_is_reference_free_only_if_every_loss_is(tmp_path, monkeypatch):
    """`loss_type: [simpo, sft]` needs no reference (precompute only tokenizes);
    `[sigmoid, sft]` does."""
    calls = stub_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    for loss_type, logps in ((["simpo", "sft"], False), (["sigmoid", "sft"], True)):
        calls.clear()
        run_iterate(IterateConfig(**files, rounds=1, train={"beta": 0.5, "loss_type": loss_type,
                                                            "loss_weights": [1.0, 0.5]}))
        pre = [cfg for step, cfg in calls if step == "precompute"]
        assert [c.logps for c in pre] == [logps]
