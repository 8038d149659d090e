"""KTO on scored samples (issue 20): unpaired rows from `odpo pair --mode unpaired`, the
mismatched KL pairs `odpo precompute` stores, the trainer's KTO step against hand-derived values
and TRL 1.16's KTOTrainer, and one small run of pair -> precompute -> train on Ray."""

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import UserError
from pipeline.pair import PairConfig, unpaired_group, unpaired_rows, unpaired_schema
from trainer.loss import kto_kl_baseline
from trainer.precompute import kl_partners, tokenize_unpaired

# ---------------------------------------------------------------- unpaired rows (pure)


def _scored(prompt_id, responses, scores):
    return [{"prompt_id": prompt_id, "prompt": f"q{prompt_id}", "response": r, "sample_index": i,
             "score": s, "answer": "5"}
            for i, (r, s) in enumerate(zip(responses, scores, strict=True))]


def test_unpaired_rows_label_by_threshold_and_drop_repeats():
    """score >= threshold is desirable (equal counts as desirable), below it undesirable; a
    repeated response counts once (its lowest sample index) and the repeats are counted."""
    rows = _scored("a", ["5", "4", "5", "6", "4"], [1.0, 0.0, 1.0, 0.5, 0.0])
    kept, repeats = unpaired_rows(rows, threshold=0.5)
    assert [(r["sample_index"], d) for r, d in kept] == [(0, True), (1, False), (3, True)]
    assert repeats == 2
    kept, _ = unpaired_rows(rows, threshold=0.75)
    assert [(r["sample_index"], d) for r, d in kept] == [(0, True), (1, False), (3, False)]
    # all undesirable (the prompts correct_incorrect drops as no_correct) still gives rows
    kept, repeats = unpaired_rows(_scored("b", ["1", "2"], [0.0, 0.0]), threshold=0.5)
    assert [d for _, d in kept] == [False, False] and repeats == 0


def test_unpaired_group_writes_rows_and_counts_drops():
    """The Ray Data group function on a hand-made scored table: one row per distinct response
    with TRL's unpaired columns (prompt, completion, label) and the sampled ids; one
    `duplicate` row per repeat; the prompt's metadata carried."""
    rows = _scored("a", ["5", "4", "5"], [1.0, 0.0, 1.0])
    for i, r in enumerate(rows):
        r["response_token_ids"] = [10 + i, 2]
    table = pa.Table.from_pylist(rows)
    schema = unpaired_schema(table.schema)
    out = unpaired_group(table, cfg=PairConfig(scored="s", out="o", mode="unpaired", round=3),
                         schema=schema).to_pylist()
    kept = [r for r in out if r["drop_reason"] == ""]
    assert [(r["completion"], r["label"], r["score"], r["sample_index"], r["round"],
             r["completion_token_ids"], r["answer"], r["prompt"]) for r in kept] == [
        ("5", True, 1.0, 0, 3, [10, 2], "5", "qa"), ("4", False, 0.0, 1, 3, [11, 2], "5", "qa")]
    assert [r["drop_reason"] for r in out if r["drop_reason"]] == ["duplicate"]
    assert "response" not in schema.names and "finish_reason" not in schema.names


# ---------------------------------------------------------------- the KL mismatch (pure)


def test_kl_partners_mismatch_every_row_and_use_each_completion_once():
    prompts = [[1, 5]] * 3 + [[1, 7]] + [[2]] * 2 + [[1, 5]] + [[3]] * 2  # 4 + 1 + 2 + 2 rows
    partners = kl_partners(prompts)
    assert sorted(partners.tolist()) == list(range(len(prompts)))  # a permutation
    assert all(prompts[i] != prompts[j] for i, j in enumerate(partners))
    # by hand: sorted by prompt ids (stable) the rows are 0 1 2 6 | 3 | 4 5 | 7 8; m = 4, so
    # sorted position k takes position k + 4 (mod 9)
    order = [0, 1, 2, 6, 3, 4, 5, 7, 8]
    assert partners.tolist() == [order[(order.index(i) + 4) % 9] for i in range(9)]
    assert kl_partners([]).tolist() == []
    assert kl_partners(prompts) .tolist() == partners.tolist()  # deterministic


def test_kl_partners_refuse_a_prompt_with_more_than_half_the_rows():
    with pytest.raises(UserError, match="one prompt holds 3 of the 5 rows") as e:
        kl_partners([[1]] * 3 + [[2], [3]])
    assert len(str(e.value).splitlines()) == 1
    kl_partners([[1]] * 3 + [[2]] * 3)  # exactly half: fine


def test_tokenize_unpaired_uses_stored_ids_and_cuts_like_pairs(toy_tokenizer):
    from conftest import char_ids

    tok = toy_tokenizer
    prompts, completions = ["12+3=", "4+4="], ["15", "8"]
    stored = [char_ids(tok, "15") + [tok.eos_token_id], char_ids(tok, "8")]  # cut: no EOS
    keep, p_ids, c_ids, dropped, cut = tokenize_unpaired(
        tok, prompts, completions, max_length=64, max_prompt_length=32, truncation="truncate",
        completion_token_ids=stored)
    assert keep == [0, 1] and c_ids == stored and dropped == {"too_long": 0} and cut == 0
    assert p_ids == [tok(p)["input_ids"] for p in prompts]
    # too long (BOS + 5 characters + 3 completion tokens > 7): the prompt keeps BOS and its
    # last 4 tokens, the completion its first 2 (no EOS); or the row is dropped, counted
    full = p_ids[0]
    keep, p_ids, c_ids, dropped, cut = tokenize_unpaired(
        tok, prompts, completions, max_length=7, max_prompt_length=5,
        truncation="truncate", completion_token_ids=stored)
    assert cut == 1 and p_ids[0] == full[:1] + full[-4:] and c_ids == [stored[0][:2], stored[1]]
    keep, *_, dropped, _ = tokenize_unpaired(
        tok, prompts, completions, max_length=7, max_prompt_length=5,
        truncation="drop", completion_token_ids=stored)
    assert keep == [1] and dropped == {"too_long": 1}


# ---------------------------------------------------------------- the trainer's step


def _logp(model, prompt, completion) -> float:
    from conftest import plain_logp

    return plain_logp(model, prompt, completion)


def _kto_batch(tok, model, rows, kl_of, ref_shift=None):
    """A micro-batch as the trainer reads it: ids, labels, and reference log-probs from a plain
    forward of `model` (+ `ref_shift` per row: a reference that differs from the policy)."""
    from conftest import char_ids

    prompts = [char_ids(tok, p) for p, _, _ in rows]
    completions = [char_ids(tok, c) + [tok.eos_token_id] for _, c, _ in rows]
    kl = [completions[j] for j in kl_of]
    shift = ref_shift or [0.0] * len(rows)
    return {
        "prompt_input_ids": prompts, "completion_input_ids": completions,
        "kl_completion_input_ids": kl, "label": [d for _, _, d in rows],
        "ref_logps": [_logp(model, p, c) + s for p, c, s in zip(prompts, completions, shift,
                                                                strict=True)],
        "ref_kl_logps": [_logp(model, p, c) for p, c in zip(prompts, kl, strict=True)],
    }


ROWS = [("12+3=", "15", True), ("12+3=", "16", False), ("7+7=", "14", True),
        ("40+2=", "41", False), ("40+2=", "42", True), ("9+9=", "99", False)]


def test_kto_step_at_the_reference_is_half_lambda(toy_model_dir, toy_tokenizer):
    """Policy == reference: r = 0 and z₀ = max(0, 0) = 0, so each row's loss is λ·(1 − σ(0)) =
    λ/2 (λ_D for desirable rows, λ_U for the others) and the rewards are 0."""
    from transformers import AutoModelForCausalLM

    from trainer.loop import kto_step_loss, pooled_means

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    batch = _kto_batch(toy_tokenizer, model, ROWS, kl_of=[3, 4, 5, 0, 1, 2])
    cfg = {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.8}
    loss, metrics = kto_step_loss(model, batch, toy_tokenizer.pad_token_id, cfg)
    expected = np.mean([0.5 * (1.5 if d else 0.8) for _, _, d in ROWS])
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    metrics = pooled_means(metrics)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(
        np.mean([x for x, (_, _, d) in zip(batch["ref_logps"], ROWS, strict=True) if d]))


def test_kto_step_matches_the_paper_off_the_reference(toy_model_dir, toy_tokenizer):
    """A reference that differs from the policy row by row, and KL completions whose mean
    log-ratio is > 0: the step's loss equals KTO's formula written here in floats (TRL's eq. 7),
    and the metrics are means over each side's rows."""
    from transformers import AutoModelForCausalLM

    from trainer.loop import kto_step_loss, pooled_means

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    shift = [0.7, -1.2, 2.5, 0.1, -0.4, 1.9]
    batch = _kto_batch(toy_tokenizer, model, ROWS, kl_of=[3, 4, 5, 0, 1, 2], ref_shift=shift)
    batch["ref_kl_logps"] = [x - 0.3 * (i + 1) for i, x in enumerate(batch["ref_kl_logps"])]
    beta, wd, wu = 0.5, 1.0, 1.3
    cfg = {"beta": beta, "loss_type": "kto", "desirable_weight": wd, "undesirable_weight": wu}
    loss, metrics = kto_step_loss(model, batch, toy_tokenizer.pad_token_id, cfg)
    z0 = max(0.0, np.mean([0.3 * (i + 1) for i in range(6)]))  # π − ref on the KL pairs
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * (-s - z0))) if d else wu * (1 - sig(beta * (z0 + s)))
            for s, (_, _, d) in zip(shift, ROWS, strict=True)]
    assert float(loss.detach()) == pytest.approx(np.mean(want), abs=1e-6)
    metrics = pooled_means(metrics)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-6)
    desirable = [d for _, _, d in ROWS]
    assert metrics["rewards/chosen"] == pytest.approx(
        np.mean([-beta * s for s, d in zip(shift, desirable, strict=True) if d]), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(
        np.mean([-beta * s for s, d in zip(shift, desirable, strict=True) if not d]), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(
        metrics["rewards/chosen"] - metrics["rewards/rejected"])


def test_pooled_means_are_over_rows_not_micro_batches():
    from trainer.loop import pooled_means

    # two micro-batches' shares summed: 3 desirable rows (rewards 1, 2, 6), no undesirable ones
    out = pooled_means({"loss": 0.4, "_count/chosen": 3.0, "_sum/rewards/chosen": 9.0,
                        "_sum/logps/chosen": -30.0, "_count/rejected": 0.0,
                        "_sum/rewards/rejected": 0.0, "_sum/logps/rejected": 0.0})
    assert out == {"loss": 0.4, "rewards/chosen": 3.0, "logps/chosen": -10.0}
    assert pooled_means({"loss": 1.0, "rewards/margins": 2.0}) == {"loss": 1.0,
                                                                   "rewards/margins": 2.0}


def test_kto_first_batch_equals_trl_kto_trainer(toy_model_dir, tmp_path):
    """The trainer's KTO step (`trainer.loop.kto_step_loss`: the project's collation, forward,
    z₀ and loss) on TRL's batch equals TRL 1.16's KTOTrainer first-batch loss and metrics to
    1e-5, with a policy three Adam steps away from the reference. The reference log-probs are
    the precompute stage's (`reference_logps`), the KL completions TRL's own (each row with the
    previous row's completion in the batch), read from its dataset."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from trainer.collate import collate, tokenize_completions
    from trainer.logps import sequence_logps
    from trainer.loop import kto_step_loss, pooled_means
    from trainer.precompute import reference_logps

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    prompts = [p for p, _, _ in ROWS] + ["3+4=", "100+1="]
    completions = [c for _, c, _ in ROWS] + ["7", "102"]
    labels = [d for _, _, d in ROWS] + [True, False]
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    prompt_ids, completion_ids = tokenize_completions(tok, prompts, completions)
    t = collate(prompt_ids, completion_ids, tok.pad_token_id)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(3):  # the policy learns the desirable completions
        logps = sequence_logps(policy(input_ids=t["input_ids"],
                                      attention_mask=t["attention_mask"]).logits, t["labels"])
        loss = -(logps * torch.tensor(labels)).sum() / t["completion_lengths"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()

    rows = [dict(prompt=p, completion=c, label=d)
            for p, c, d in zip(prompts, completions, labels, strict=True)]
    beta, weights = 0.5, dict(desirable_weight=1.0, undesirable_weight=1.25)
    args = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                     disable_tqdm=True, seed=0, per_device_train_batch_size=len(rows),
                     max_length=None, beta=beta, **weights)
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                         args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = float(trainer.compute_loss(trainer.model, inputs).detach())
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    data = trainer.train_dataset
    assert data["prompt_ids"] == prompt_ids and data["completion_ids"] == completion_ids
    kl_ids = data["KL_completion_ids"]
    assert kl_ids == completion_ids[-1:] + completion_ids[:-1]
    batch = {"prompt_input_ids": prompt_ids, "completion_input_ids": completion_ids,
             "kl_completion_input_ids": kl_ids, "label": labels,
             "ref_logps": reference_logps(reference, prompt_ids, completion_ids,
                                          tok.pad_token_id).tolist(),
             "ref_kl_logps": reference_logps(reference, prompt_ids, kl_ids,
                                             tok.pad_token_id).tolist()}
    cfg = {"beta": beta, "loss_type": "kto", **weights}
    loss, metrics = kto_step_loss(policy, batch, tok.pad_token_id, cfg)
    metrics = pooled_means(metrics)
    assert metrics["kl"] > 0.1  # the reference point is exercised, not the clamp at 0
    assert float(loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-5)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                "rewards/margins"):
        assert metrics[key] == pytest.approx(trl[key], rel=1e-5, abs=1e-5), key
    # and the loss function alone on the same log-probs
    assert metrics["kl"] == pytest.approx(float(kto_kl_baseline(
        torch.tensor(reference_logps(policy, prompt_ids, kl_ids, tok.pad_token_id)),
        torch.tensor(batch["ref_kl_logps"]))), abs=1e-5)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("fields, match", [
    (dict(loss_type=["sigmoid", "kto"]), "kto trains on unpaired rows, alone"),
    (dict(loss_type="kto", alpha=1.0), "alpha adds the NLL of a chosen response"),
    (dict(loss_type="kto", loss_weights=[1.0]), "kto weighs its rows"),
    (dict(loss_type="kto", label_smoothing=0.1), "label_smoothing applies to"),
    (dict(desirable_weight=2.0), "would ignore them"),
    (dict(loss_type="kto", undesirable_weight=0.0), "must be > 0"),
])
def test_kto_config_errors_are_one_line(fields, match):
    from trainer.dpo import DPOConfig, check_config

    with pytest.raises(UserError, match=match) as e:
        check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, **fields))
    assert len(str(e.value).splitlines()) == 1


def test_kto_balance_follows_the_papers_advice():
    from trainer.dpo import kto_balance

    assert kto_balance(120, 100, 1.0, 1.0) is None  # 1.2 in [1, 4/3]
    assert kto_balance(0, 100, 1.0, 1.0) is None
    advice = kto_balance(30, 90, 1.0, 1.0)  # 1/3: desirable rows are scarce
    assert "0.333" in advice and "desirable_weight 3 to 4" in advice
    assert kto_balance(30, 90, 3.5, 1.0) is None


# ---------------------------------------------------------------- pair -> precompute -> train


def _scored_samples(tok, data_dir, path):
    """16 addition prompts x 4 hand-made samples, exactly scored: the right sum twice (a repeat),
    and two wrong ones; every 4th prompt has no right answer (a `no_correct` prompt for the
    paired modes). `response_token_ids` as vLLM writes them: the characters and the EOS."""
    from conftest import char_ids

    prompts = pq.read_table(data_dir / "prompts.parquet").to_pylist()[:16]
    rows = []
    for n, p in enumerate(prompts):
        answer = p["answer"]
        wrong = [str(int(answer) + 1), str(int(answer) + 11)]
        responses = ([wrong[0], wrong[1], wrong[0] + "0", wrong[0]] if n % 4 == 0
                     else [answer, wrong[0], answer, wrong[1]])
        for i, r in enumerate(responses):
            rows.append({"prompt_id": f"p{n:02d}", "prompt": p["prompt"], "answer": answer,
                         "response": r, "sample_index": i, "score": float(r == answer),
                         "finish_reason": "stop",
                         "response_token_ids": char_ids(tok, r) + [tok.eos_token_id]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_kto_from_scored_samples_to_training(ray_local, toy_model_dir, toy_tokenizer,
                                             toy_data_dir, tmp_path):
    """`odpo pair --mode unpaired` on scored samples -> `odpo precompute` -> `odpo train
    --loss-type kto` (Ray Data, Ray Train). The rows and counts are the hand-derived ones; the
    KL ids are another prompt's completion and their reference log-probs a plain forward's;
    step 0 (policy == reference) is λ/2 per row and the policy then learns."""
    from conftest import plain_logp
    from transformers import AutoModelForCausalLM

    from pipeline.pair import run_pair
    from trainer.dpo import DPOConfig, read_precompute_stage, run_dpo
    from trainer.precompute import PrecomputeConfig, run_precompute

    _scored_samples(toy_tokenizer, toy_data_dir, tmp_path / "scored.parquet")
    pairs = run_pair(PairConfig(scored=str(tmp_path / "scored.parquet"),
                                out=str(tmp_path / "rows"), mode="unpaired", round=1))
    # 64 samples: 16 repeats (the right answer twice in 12 prompts, a wrong one twice in 4)
    assert (pairs["samples"], pairs["rows"], pairs["dropped"]) == (64, 48, {"duplicate": 16})
    assert {k: pairs["stats"][k] for k in ("prompts", "desirable", "undesirable",
                                           "prompts_without_desirable")} == {
        "prompts": 16, "desirable": 12, "undesirable": 36, "prompts_without_desirable": 4}

    cache = str(tmp_path / "cache")
    pre = run_precompute(PrecomputeConfig(pairs=str(tmp_path / "rows"), model=toy_model_dir,
                                          out=str(tmp_path / "pre"), cache_dir=cache))
    assert pre["pairs"] == 48 and pre["stats"]["desirable"] == 12
    # from the store into a new directory: still unpaired rows, which kto reads and DPO refuses
    again = run_precompute(PrecomputeConfig(pairs=str(tmp_path / "rows"), model=toy_model_dir,
                                            out=str(tmp_path / "pre2"), cache_dir=cache))
    assert again["cache"] == "hit" and again["source"] != str(tmp_path / "pre2")
    read_precompute_stage(str(tmp_path / "pre2"), "kto")
    with pytest.raises(UserError, match="holds unpaired rows"):
        read_precompute_stage(str(tmp_path / "pre2"), ["sigmoid", "sft"])
    table = pq.read_table(sorted((tmp_path / "pre").glob("*.parquet"))).to_pylist()
    reference = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    partners = kl_partners([r["prompt_input_ids"] for r in table])  # the rule, tested above
    for i, r in enumerate(table):
        assert r["completion_input_ids"] == r["completion_token_ids"]  # the sampled ids
        # the KL completion is another row's, answering another prompt
        other = table[partners[i]]
        assert r["kl_completion_input_ids"] == other["completion_input_ids"]
        assert other["prompt_id"] != r["prompt_id"]
    for r in table[::7]:
        assert r["ref_logps"] == pytest.approx(plain_logp(
            reference, r["prompt_input_ids"], r["completion_input_ids"]), abs=1e-5)
        assert r["ref_kl_logps"] == pytest.approx(plain_logp(
            reference, r["prompt_input_ids"], r["kl_completion_input_ids"]), abs=1e-5)

    weights = {"desirable_weight": 3.0, "undesirable_weight": 1.0}
    run = run_dpo(DPOConfig(model=toy_model_dir, data=str(tmp_path / "pre"),
                            out=str(tmp_path / "train"), beta=0.1, loss_type="kto",
                            lr=5e-3, lr_schedule="constant", batch_size=16, epochs=3,
                            shuffle=False, log_every=1, torch_threads=1, **weights))
    assert run["rows"] == 48 and run["steps"] == 9
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in lines]
    labels = [r["label"] for r in table[:16]]  # step 0: the first 16 rows (no shuffle)
    assert log[0]["loss"] == pytest.approx(
        np.mean([0.5 * (3.0 if d else 1.0) for d in labels]), abs=1e-5)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert log[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert log[6]["loss"] < log[0]["loss"] - 0.05  # the same rows two epochs later
    assert log[-1]["rewards/chosen"] > log[-1]["rewards/rejected"]


def test_train_refuses_pairs_for_kto(tmp_path):
    """Precompute shards of pairs given to kto: one line naming `odpo pair --mode unpaired`,
    before any shard is read."""
    from trainer.dpo import read_precompute_stage

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"stage": "precompute", "complete": True, "config": {"logps": True}, "files": []}))
    with pytest.raises(UserError, match="holds pairs; loss_type kto trains on unpaired rows "
                                        r"\(`odpo pair --mode unpaired`") as e:
        read_precompute_stage(str(tmp_path), "kto")
    assert len(str(e.value).splitlines()) == 1
