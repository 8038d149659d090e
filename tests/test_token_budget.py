"""Issue 19 item 3, token-budget batching (`max_tokens_per_batch`): a step's pairs cut into
micro-batches of whole pairs under a token budget, as many on every worker, train to the step
that one micro-batch of all the pairs (or `grad_accum` equal ones) trains to. Pure torch, no
Ray; the two-process check reuses tests/test_loop.py's gloo workers."""

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from test_loop import _cfg, _sft_rows, _spawn, _table

from pipeline.errors import UserError
from trainer import loop
from trainer.collate import collate
from trainer.packing import (
    batch_cost,
    layout_pairs,
    pair_cost,
    plan_pair_batches,
    split_batches,
)

LAYOUTS = ("padded", "packed", "shared_prompt")


def _lengths(seed, n):
    g = np.random.default_rng(seed)
    return (g.integers(0, 40, n), g.integers(1, 60, n), g.integers(1, 60, n))


def _plans(num_rows, world, costs, layout, budget, steps=6, batch_size=24, grad_accum=1):
    return [list(loop.plan_batches(
        num_rows, batch_size=batch_size, grad_accum=grad_accum, world=world, rank=rank, seed=3,
        shuffle=True, start_step=0, total_steps=steps, max_tokens_per_batch=budget,
        costs=costs, layout=layout)) for rank in range(world)]


# ---------------------------------------------------------------- the plan


def test_batch_cost_is_what_the_layout_computes():
    """padded: the collated rows × width; packed / shared_prompt: the real tokens laid out."""
    p, c, r = _lengths(0, 9)
    g = np.random.default_rng(1)
    ids = [[g.integers(1, 50, n).tolist() for n in xs] for xs in (p, c, r)]
    t = collate(ids[0] * 2, ids[1] + ids[2], 0)
    assert batch_cost(pair_cost(p, c, r, "padded"), "padded") == t["input_ids"].numel()
    for layout in ("packed", "shared_prompt"):
        t = layout_pairs(*ids, layout=layout)
        assert batch_cost(pair_cost(p, c, r, layout), layout) == int(t["tokens"].sum())
    assert batch_cost(np.zeros(0, dtype=np.int64), "padded") == 0


def test_padded_micro_batches_group_similar_widths_by_hand():
    # widths 2·max(P + C, P + R): 40, 10, 30, 12, 100
    costs = pair_cost([5, 0, 5, 1, 20], [15, 5, 10, 5, 30], [10, 2, 5, 1, 10], "padded")
    assert costs.tolist() == [40, 10, 30, 12, 100]
    bins = plan_pair_batches(costs, "padded", 80)
    # 100 alone (over the budget); 40 + 30 (2 x 40 = 80); 12 + 10 (2 x 12)
    assert [b.tolist() for b in bins] == [[4], [0, 2], [1, 3]]
    assert [batch_cost(costs[b], "padded") for b in bins] == [100, 80, 24]


def test_split_batches_cuts_the_costliest_until_the_count():
    costs = np.array([9, 1, 5, 4, 3, 3])
    bins = [np.array([0]), np.array([1, 2, 3, 4, 5])]
    out = split_batches(bins, costs, "shared_prompt", 4)
    # [1..5] (16), dealt 5, 4, 3, 3, 1 to the lighter half: {2, 5} (8) + {1, 3, 4} (8); then
    # {2, 5}, the first of the costliest splittable (not [0]: one pair), -> {2}, {5}
    assert [b.tolist() for b in out] == [[0], [2], [5], [1, 3, 4]]
    kept = split_batches(bins, costs, "shared_prompt", 2)  # already 2: as they are
    assert [b.tolist() for b in kept] == [[0], [1, 2, 3, 4, 5]]
    with pytest.raises(ValueError):
        split_batches(bins, costs, "shared_prompt", 7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_plan_covers_each_step_within_the_budget_on_equal_counts(layout, world):
    """Every pair of a step exactly once, on the worker whose slice it is without a budget; no
    micro-batch over the budget but a lone oversized pair; as many micro-batches on every
    worker; the same plan when computed again."""
    num_rows = 80
    p, c, r = _lengths(world, num_rows)
    p[5] = 200  # a pair over any budget here: alone, in every layout
    costs = pair_cost(p, c, r, layout)
    budget = 260
    plans = _plans(num_rows, world, costs, layout, budget)
    plain = _plans(num_rows, world, costs, layout, 0)
    again = _plans(num_rows, world, costs, layout, budget)
    for rank in range(world):
        for (_, _, rows, micro), (_, _, rows0, [mine]), (*_, micro2) in zip(
                plans[rank], plain[rank], again[rank], strict=True):
            np.testing.assert_array_equal(rows, rows0)
            assert sorted(np.concatenate(micro).tolist()) == sorted(mine.tolist())
            for m in micro:
                assert batch_cost(costs[m], layout) <= budget or len(m) == 1
            assert [m.tolist() for m in micro] == [m.tolist() for m in micro2]
    counts = [[len(micro) for *_, micro in plan] for plan in plans]
    assert all(c == counts[0] for c in counts)  # equal counts across workers, every step
    assert max(counts[0]) > 1  # the budget cuts
    alone = [len(m) for plan in plans for *_, micro in plan for m in micro if 5 in m]
    assert alone and set(alone) == {1}  # the oversized pair: a micro-batch of its own


def test_unequal_workers_are_split_to_the_same_count():
    """Worker 0 holds long pairs, worker 1 short ones: 1 has fewer micro-batches of its own and
    is split to 0's count, its micro-batches still whole pairs within the budget."""
    costs = np.array([50, 50, 50, 50, 10, 10, 10, 10])
    step_rows = np.arange(8)
    raw = [len(plan_pair_batches(costs[rows], "shared_prompt", 100))
           for rows in (step_rows[:4], step_rows[4:])]
    assert raw == [2, 1]
    out = loop.token_budget_batches(step_rows, costs, world=2, layout="shared_prompt",
                                    max_tokens_per_batch=100)
    assert [len(w) for w in out] == [2, 2]
    assert [m.tolist() for m in out[1]] == [[4, 6], [5, 7]]


def test_the_plan_refuses_a_budget_with_grad_accum():
    with pytest.raises(ValueError, match="grad_accum 1"):
        _plans(48, 1, np.ones(48, dtype=np.int64), "padded", 10, grad_accum=2)


# ---------------------------------------------------------------- the step's maths


def _one_step(model_dir, table, cfg, monkeypatch):
    """`train_steps` for cfg's steps on one worker (as `wrap_policy` wraps the policy); the
    trained weights, the log and the gradients each optimizer step saw (before clipping)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.checkpoint import disable_dropout

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    disable_dropout(model)
    model.train()
    model = loop.wrap_policy(model, cfg, torch.device("cpu"), 1)
    optimizer, scheduler = loop.make_optimizer(model, cfg)
    grads, logged = [], []
    step = loop.optimizer_step

    def recording(model, *args):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        return step(model, *args)

    monkeypatch.setattr(loop, "optimizer_step", recording)
    loop.train_steps(model, optimizer, scheduler, table, cfg, rank=0, world=1, start_step=0,
                     pad_token_id=tok.pad_token_id, log=lambda s, m: logged.append(m),
                     after_step=lambda *_: None)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, logged, grads


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_one_adamw_step_under_a_budget_equals_one_micro_batch(toy_model_dir, toy_tokenizer,
                                                              layout, monkeypatch):
    """8 pairs of very unequal lengths in one step: under a 50-token budget (4-5 micro-batches
    of 1-3 pairs, pairs over it alone) the loss, the metrics, num_tokens (tokens_per_s), the
    gradients and the weights after AdamW equal grad_accum 1's, to 1e-5 in float32."""
    table = _table(toy_tokenizer, _sft_rows(20), "dpo")
    cfg = {**_cfg("dpo", 1, 1), "layout": layout}
    want, want_log, want_grads = _one_step(toy_model_dir, table, cfg, monkeypatch)
    got, got_log, got_grads = _one_step(toy_model_dir, table,
                                        {**cfg, "max_tokens_per_batch": 50}, monkeypatch)
    [a], [b] = want_log, got_log
    assert a["micro_batches"] == 1 and b["micro_batches"] >= 4
    assert b["over_budget_pairs"] >= 1 and "over_budget_pairs" not in a
    for key in ("loss", "dpo_loss", "nll_loss", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "grad_norm"):
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    for name, g in want_grads[0].items():
        torch.testing.assert_close(got_grads[0][name], g, atol=1e-5, rtol=0, msg=name)
        # Adam's first step moves a weight by lr·g/(|g| + 1e-8): where |g| < 1e-7 that ratio
        # rides on g's rounding noise (tests/test_loop.py), so those are held to lr
        tol = torch.where(g.abs() < 1e-7, cfg["lr"], 1e-5)
        assert ((got[name] - want[name]).abs() <= tol).all(), name


def test_num_tokens_counts_the_same_pairs_under_a_budget(toy_model_dir, toy_tokenizer,
                                                         monkeypatch):
    """tokens_per_s is num_tokens / time: the budget's micro-batches count the step's pair
    tokens Σ (2P + C + R) once each, as one micro-batch does."""
    table = _table(toy_tokenizer, _sft_rows(20), "dpo")
    cfg = {**_cfg("dpo", 1, 1), "layout": "shared_prompt"}
    seen = []
    shares = loop.accumulate_gradients

    def recording(*args, **kwargs):
        out = shares(*args, **kwargs)
        seen.append(out["num_tokens"])
        return out

    monkeypatch.setattr(loop, "accumulate_gradients", recording)
    for budget in (0, 30):
        _one_step(toy_model_dir, table, {**cfg, "max_tokens_per_batch": budget}, monkeypatch)
    [(_, _, rows, _)] = loop.plan_batches(20, batch_size=8, grad_accum=1, world=1, rank=0,
                                          seed=0, shuffle=True, start_step=0, total_steps=1)
    lengths = [pc.list_value_length(table[f"{n}_input_ids"]).to_numpy()[rows]
               for n in ("prompt", "chosen", "rejected")]
    want = float((2 * lengths[0] + lengths[1] + lengths[2]).sum())
    assert seen == [want, want]


@pytest.mark.slow  # processes of their own (gloo): not in `make test-fast`
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_under_a_budget_equal_one_worker(toy_model_dir, toy_tokenizer, tmp_path,
                                                     strategy):
    """2 gloo workers, each cutting its 4 pairs of a step under a 40-token budget (their own
    counts differ, split to the same: DDP's reduce and FSDP's all-gathers pair up), train 4
    steps to the weights and losses of one worker without a budget."""
    from test_loop import _train_layout

    table = _table(toy_tokenizer, _sft_rows(20), "dpo")
    cfg = {**_cfg("dpo", 1, 4), "layout": "shared_prompt"}
    costs = pair_cost(*(pc.list_value_length(table[f"{n}_input_ids"]).to_numpy()
                        for n in ("prompt", "chosen", "rejected")), "shared_prompt")
    raw = [[len(plan_pair_batches(costs[rows[w * 4:(w + 1) * 4]], "shared_prompt", 40))
            for w in (0, 1)] for *_, rows, _ in loop.plan_batches(
        20, batch_size=8, grad_accum=1, world=1, rank=0, seed=0, shuffle=True, start_step=0,
        total_steps=4)]
    assert any(a != b for a, b in raw)  # the split is needed
    one, one_log = _train_layout(toy_model_dir, table, cfg, 0, 1)
    two, two_log = _spawn(tmp_path, strategy, toy_model_dir, table,
                          {**cfg, "max_tokens_per_batch": 40, "strategy": strategy})
    assert [m["micro_batches"] for m in two_log] == [max(r) for r in raw]
    for a, b in zip(one_log, two_log, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------- the driver's checks


@pytest.mark.parametrize("fields, match", [
    (dict(max_tokens_per_batch=-1), "max_tokens_per_batch must be >= 0"),
    (dict(max_tokens_per_batch=512, grad_accum=2), "both cut a step into micro-batches"),
    (dict(max_tokens_per_batch=512, loss_type="kto"), "kto's reference point"),
])
def test_the_driver_refuses_a_bad_budget_in_one_line(fields, match):
    from trainer.dpo import DPOConfig, check_config

    with pytest.raises(UserError, match=match) as e:
        check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, **fields))
    assert len(str(e.value).splitlines()) == 1
    check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, max_tokens_per_batch=512,
                           batch_size=8, num_workers=2))


def test_the_flag_reaches_the_config_and_fails_before_ray(capsys):
    """`--max-tokens-per-batch` is a DPOConfig flag like the others; a bad value is one line
    (exit 2) from `odpo train`, before any path is read or Ray starts."""
    from jobs.cli import build_parser, main
    from jobs.config import from_args
    from trainer.dpo import DPOConfig

    argv = ["train", "--model", "m", "--data", "d", "--out", "o", "--beta", "0.1"]
    cfg = from_args(DPOConfig, build_parser().parse_args([*argv, "--max-tokens-per-batch",
                                                          "4096"]))
    assert cfg.max_tokens_per_batch == 4096
    assert from_args(DPOConfig, build_parser().parse_args(argv)).max_tokens_per_batch == 0
    assert main([*argv, "--max-tokens-per-batch", "4096", "--grad-accum", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both cut a step" in err, err
