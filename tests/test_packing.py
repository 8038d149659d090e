"""Issue 19, padding-free layouts (`trainer.packing`): `packed` and `shared_prompt` batches give
each pair's chosen and rejected log-probs, their gradients and an AdamW step equal to a plain
transformers forward of each sequence on its own (no padding, no packing; written out here) and
to the `padded` layout, to 1e-5 in float32. Layouts are checked by hand on small cases."""

import numpy as np
import pytest
import torch

from trainer.logps import IGNORE_INDEX, TokenLogps
from trainer.packing import (
    CHOSEN,
    PROMPT,
    REJECTED,
    allowed,
    attention_mask,
    layout_pairs,
    pair_logps,
    pair_tokens,
    plan_token_batches,
)

PAD = 0


# ---------------------------------------------------------------- the expected values, by hand


def plain_pair_logps(model, prompts, chosen, rejected) -> torch.Tensor:
    """(2B,) float64 sums, chosen then rejected, each sequence in its own unpadded forward
    through the model's full logits; the first completion token of an empty prompt has no
    position before it and is left out. Differentiable."""
    out = []
    for p, c in zip(list(prompts) * 2, list(chosen) + list(rejected), strict=True):
        logprobs = torch.log_softmax(
            model(input_ids=torch.tensor([list(p) + list(c)])).logits[0].float(), dim=-1)
        out.append(sum((logprobs[len(p) + j - 1, t].double() for j, t in enumerate(c)
                        if len(p) + j >= 1), torch.zeros((), dtype=torch.float64)))
    return torch.stack(out)


def llama(width=256, layers=2, vocab=512, heads=4, kv_heads=2, seed=0, **extra):
    """A random Llama wider than the toy's, with grouped-query attention, dropout off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False, **extra))
    return model.train()


def random_pairs(seed, n, vocab, prompt=(0, 12), completion=(1, 10)):
    g = np.random.default_rng(seed)

    def ids(lo, hi):
        return g.integers(1, vocab, size=int(g.integers(lo, hi + 1))).tolist()

    pairs = [(ids(*prompt), ids(*completion), ids(*completion)) for _ in range(n)]
    return tuple(list(x) for x in zip(*pairs, strict=True))


# Unequal lengths and the edge cases: an empty prompt, a one-token completion, a one-token
# prompt, chosen longer / shorter than rejected.
HAND_PAIRS = (
    [[5, 6, 7], [], [9], [3, 4, 5, 6, 7, 8, 9, 10, 11]],
    [[11, 12], [13, 14, 15], [16], [17, 18, 19]],
    [[21, 22, 23, 24], [25, 26], [27, 28, 29], [30]],
)


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy_model_dir).train()


# ---------------------------------------------------------------- pure layout functions


def test_plan_token_batches_keeps_items_whole_under_the_budget():
    lengths = [5, 9, 3, 7, 2, 20, 4]
    bins = plan_token_batches(lengths, 10)
    assert sorted(np.concatenate(bins).tolist()) == list(range(len(lengths)))  # each once
    for b in bins:
        assert b.tolist() == sorted(b.tolist())
        assert sum(lengths[i] for i in b) <= 10 or len(b) == 1  # 20 > 10: a bin of its own
    # first-fit decreasing by hand: 20 | 9 | 7+3 | 5+4 | 2 (room left: 1, 0, 1)
    assert [b.tolist() for b in bins] == [[5], [1], [2, 3], [0, 6], [4]]
    assert [b.tolist() for b in plan_token_batches([3, 3], 1)] == [[0], [1]]
    assert plan_token_batches([], 8) == []
    with pytest.raises(ValueError):
        plan_token_batches([1], 0)


def test_pair_tokens_count_the_prompt_once_when_shared():
    assert pair_tokens([4, 0], [2, 3], [5, 1], "packed").tolist() == [15, 4]
    assert pair_tokens([4, 0], [2, 3], [5, 1], "padded").tolist() == [15, 4]
    assert pair_tokens([4, 0], [2, 3], [5, 1], "shared_prompt").tolist() == [11, 4]
    with pytest.raises(ValueError):
        pair_tokens([1], [1], [1], "ragged")


def test_packed_layout_by_hand():
    """Two pairs, budget 9: sequences (p0 c0)=5, (p1 c1)=2, (p0 r0)=4, (p1 r1)=3 tokens pack
    first-fit decreasing into [seq 0 | seq 2] (9) and [seq 1 | seq 3] (5, padded to 9)."""
    t = layout_pairs([[1, 2], [3]], [[4, 5, 6], [7]], [[8, 9], [10, 11]], layout="packed",
                     max_tokens=9, pad_token_id=PAD)
    assert t["input_ids"].tolist() == [[1, 2, 4, 5, 6, 1, 2, 8, 9],
                                       [3, 7, 3, 10, 11, PAD, PAD, PAD, PAD]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3],
                                          [0, 1, 0, 1, 2, 0, 1, 2, 3]]
    assert t["segment_ids"].tolist() == [[0] * 5 + [2] * 4, [1, 1, 3, 3, 3, -1, -1, -1, -1]]
    assert (t["branch_ids"] == PROMPT).all()
    assert t["tokens"].sum() == 14
    # reads: token j of a completion from the position before it (row·9 + column)
    assert t["read_at"].tolist() == [1, 2, 3, 6, 7, 9, 11, 12]
    assert t["read_ids"].tolist() == [4, 5, 6, 8, 9, 7, 10, 11]
    assert t["read_seq"].tolist() == [0, 0, 0, 2, 2, 1, 3, 3]
    assert t["completion_lengths"].tolist() == [3, 1, 2, 2]


def test_shared_prompt_layout_by_hand():
    """One segment per pair [prompt, chosen, rejected]; rejected's positions continue from the
    prompt's end; the first chosen and the first rejected token are both read at the prompt's
    last position. An empty prompt: the first completion tokens are not read at all."""
    t = layout_pairs([[1, 2], []], [[4, 5, 6], [7, 8]], [[8, 9], [10]],
                     layout="shared_prompt", pad_token_id=PAD)
    # budget 0: the longest pair's 7 tokens; pair 1 (3 tokens) gets a row of its own
    assert t["input_ids"].tolist() == [[1, 2, 4, 5, 6, 8, 9], [7, 8, 10, PAD, PAD, PAD, PAD]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 0, 1, 2, 3]]
    p, c, r = PROMPT, CHOSEN, REJECTED
    assert t["branch_ids"].tolist() == [[p, p, c, c, c, r, r], [c, c, r, p, p, p, p]]
    assert t["read_at"].tolist() == [1, 2, 3, 1, 5, 7]
    assert t["read_ids"].tolist() == [4, 5, 6, 8, 9, 8]
    assert t["read_seq"].tolist() == [0, 0, 0, 2, 2, 1]  # pair 1's rejected: no read left
    assert t["completion_lengths"].tolist() == [3, 2, 2, 1]


def test_the_shared_prompt_mask_hides_chosen_from_rejected_and_pairs_from_each_other():
    t = layout_pairs([[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]], layout="shared_prompt",
                     max_tokens=100)
    m = allowed(t["segment_ids"], t["branch_ids"])[0, 0].int().tolist()
    # row: p p c c r | p c r r; pair 0 then pair 1
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0],  # rejected: prompt and itself, not chosen
        [0, 0, 0, 0, 0, 1, 0, 0, 0],  # pair 1 sees nothing of pair 0
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 1],
    ]
    eager = attention_mask(t["segment_ids"], t["branch_ids"], "eager")
    assert eager.dtype == torch.float32 and eager.shape == (1, 1, 9, 9)
    assert torch.equal(eager == 0, allowed(t["segment_ids"], t["branch_ids"]))
    with pytest.raises(ValueError, match="4D mask"):
        attention_mask(t["segment_ids"], t["branch_ids"], "flash_attention_2")


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_the_mask_is_its_definition_on_random_layouts(layout):
    """q attends to k iff the same segment, k <= q, and k is on the prompt or q's branch."""
    prompts, chosen, rejected = random_pairs(7, 9, 50, prompt=(0, 9), completion=(0, 7))
    t = layout_pairs(prompts, chosen, rejected, layout=layout, max_tokens=25)
    seg, br = t["segment_ids"], t["branch_ids"]
    q, k = torch.arange(seg.shape[1])[:, None], torch.arange(seg.shape[1])[None, :]
    want = ((seg[:, :, None] == seg[:, None, :]) & (k <= q)
            & ((br[:, None, :] == PROMPT) | (br[:, None, :] == br[:, :, None])))
    assert torch.equal(allowed(seg, br), want[:, None])


def test_padding_attends_to_itself_so_no_row_is_fully_masked():
    t = layout_pairs([[1], [2, 3, 4, 5]], [[6], [7]], [[8], [9]], layout="packed")
    m = allowed(t["segment_ids"], t["branch_ids"])
    assert (t["segment_ids"] == -1).any()
    assert m.any(dim=-1).all()


# ---------------------------------------------------------------- numbers equal the plain forward


def _compare(model, prompts, chosen, rejected, layouts=("padded", "packed", "shared_prompt"),
             max_tokens=0, atol=1e-5):
    with torch.no_grad():
        want = plain_pair_logps(model, prompts, chosen, rejected)
        n = len(prompts)
        got = {}
        for layout in layouts:
            c, r, t = pair_logps(model, prompts, chosen, rejected, layout=layout,
                                 max_tokens=max_tokens)
            assert c.dtype == r.dtype == torch.float64 and c.shape == r.shape == (n,)
            assert t["completion_lengths"].tolist() == [len(x) for x in chosen + rejected]
            torch.testing.assert_close(torch.cat([c, r]), want, atol=atol, rtol=0,
                                       msg=layout)
            got[layout] = torch.cat([c, r])
        for layout in layouts:  # and each other, to the same tolerance
            torch.testing.assert_close(got[layout], got[layouts[0]], atol=atol, rtol=0)
    return got


@pytest.mark.parametrize("max_tokens", [0, 1, 12, 1000])
def test_hand_pairs_on_the_toy_model_equal_the_plain_forward(toy, max_tokens):
    """max_tokens 1: smaller than any pair, so every sequence / pair gets its own row; 1000:
    everything in one row."""
    _compare(toy, *HAND_PAIRS, max_tokens=max_tokens)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_pairs_on_a_wider_llama_equal_the_plain_forward(seed):
    model = llama(seed=seed)
    prompts, chosen, rejected = random_pairs(seed, 6, 512, prompt=(0, 30), completion=(1, 25))
    prompts[2] = []  # an empty prompt among them
    _compare(model, prompts, chosen, rejected, max_tokens=64)


def test_empty_completions_sum_to_zero_as_padded():
    """A completion with no tokens (possible in a user's shards) reads nothing: 0, as padded."""
    model = llama(width=64, layers=1, vocab=64, heads=2, kv_heads=1)
    got = _compare(model, [[5, 6], [7], []], [[], [8, 9], [10]], [[11], [], [12, 13]],
                   max_tokens=4)
    # chosen 0 and rejected 1 empty; chosen 2 one token with an empty prompt: none read
    assert got["packed"][[0, 4, 2]].tolist() == [0.0, 0.0, 0.0]


def test_a_lora_policy_takes_the_packed_layouts(toy_model_dir):
    """PEFT's wrapper (`trainer.lora`): the lean forward through the adapted body."""
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM

    from trainer.lora import LoraSettings, add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(toy_model_dir),
                     asdict(LoraSettings(r=4, alpha=8.0)), base=toy_model_dir)
    with torch.no_grad():  # adapters that change the output (PEFT starts B at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    _compare(model, *HAND_PAIRS, max_tokens=16)


def test_the_full_logits_path_and_eager_attention_agree(toy):
    """A model whose head `trainer.logps` cannot chunk takes the full logits, and eager
    attention takes the additive mask: both equal the plain forward."""
    for lean in (False, True):
        with torch.no_grad():
            want = plain_pair_logps(toy, *HAND_PAIRS)
            for layout in ("packed", "shared_prompt"):
                c, r, _ = pair_logps(TokenLogps(toy, lean=lean), *HAND_PAIRS, layout=layout)
                torch.testing.assert_close(torch.cat([c, r]), want, atol=1e-5, rtol=0)
    model = llama(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    _compare(model, *random_pairs(5, 4, 512), layouts=("packed", "shared_prompt"))


def test_the_shared_prompt_is_computed_once():
    """Tokens computed (`t["attention_mask"]`, what the trainer counts): padded 2B·T_max,
    packed Σ (2P + C + R), shared_prompt Σ (P + C + R)."""
    prompts, chosen, rejected = HAND_PAIRS
    toy = llama(width=64, layers=1, vocab=64, heads=2, kv_heads=1)
    counts = {}
    for layout in ("padded", "packed", "shared_prompt"):
        with torch.no_grad():
            _, _, t = pair_logps(toy, prompts, chosen, rejected, layout=layout)
        counts[layout] = (int(t["attention_mask"].sum()), t["input_ids"].numel())
    p, c, r = (np.array([len(x) for x in xs]) for xs in HAND_PAIRS)
    assert counts["padded"] == (int((2 * p + c + r).sum()), 8 * int(max((p + c).max(),
                                                                         (p + r).max())))
    assert counts["packed"][0] == int((2 * p + c + r).sum())
    assert counts["shared_prompt"][0] == int((p + c + r).sum())


# ---------------------------------------------------------------- gradients and a step


def _grads(model, fn, weights):
    model.zero_grad()
    (fn() * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_gradients_equal_the_plain_forward_and_padded(layout):
    """Every parameter's gradient of a weighted sum of the 2B log-probs (each sequence weighed
    differently, as a loss does), through the module DDP wraps."""
    model = llama()
    prompts, chosen, rejected = random_pairs(3, 5, 512, prompt=(0, 20), completion=(1, 15))
    prompts[1] = []
    weights = torch.linspace(-1.0, 1.5, 10, dtype=torch.float64)
    module = TokenLogps(model)
    want = _grads(model, lambda: plain_pair_logps(model, prompts, chosen, rejected), weights)

    def run(name):
        return lambda: torch.cat(pair_logps(module, prompts, chosen, rejected, layout=name,
                                            max_tokens=48)[:2])

    padded, got = _grads(model, run("padded"), weights), _grads(model, run(layout), weights)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(got[name], padded[name], atol=1e-5, rtol=0, msg=name)


def test_one_adamw_dpo_step_equals_padded(toy):
    """`trainer.loop._pair_logps` with `layout`: one DPO+NLL step's loss and every weight after
    AdamW equal padded's."""
    from transformers import AutoModelForCausalLM

    from trainer.loop import _pair_logps
    from trainer.loss import dpo_loss, nll_loss

    prompts, chosen, rejected = HAND_PAIRS
    batch = {"prompt_input_ids": prompts, "chosen_input_ids": chosen,
             "rejected_input_ids": rejected}
    with torch.no_grad():  # a reference that is not the policy, so that the loss moves
        ref = plain_pair_logps(toy, prompts, chosen, rejected) - 0.3 * torch.arange(8)
    results = {}
    for layout in ("padded", "packed", "shared_prompt"):
        model = AutoModelForCausalLM.from_pretrained(toy.name_or_path).train()
        module = TokenLogps(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        c, r, t = _pair_logps(module, batch, PAD, layout=layout, max_tokens=20)
        lengths = t["completion_lengths"]
        assert lengths.tolist() == [len(x) for x in chosen + rejected]
        losses, _, _ = dpo_loss(c, r, ref[:4], ref[4:], beta=0.1, loss_type="sigmoid",
                                label_smoothing=0.0, chosen_lengths=lengths[:4],
                                rejected_lengths=lengths[4:])
        loss = losses.mean() + 0.5 * nll_loss(c, lengths[:4]).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        results[layout] = (loss.item(), grads, {n: p.detach().clone()
                                                for n, p in model.named_parameters()})
    loss0, grads0, weights0 = results["padded"]
    for layout in ("packed", "shared_prompt"):
        loss, grads, weights = results[layout]
        assert abs(loss - loss0) < 1e-6
        for name, w in weights.items():
            torch.testing.assert_close(grads[name], grads0[name], atol=1e-5, rtol=0, msg=name)
            # Adam's first step moves a weight by lr·g/(|g| + 1e-8): where |g| < 1e-7 that
            # ratio rides on g's rounding noise (tests/test_loop.py says the same), so those
            # weights are held to the step's size, lr; the rest to 1e-5.
            tol = torch.where(grads0[name].abs() < 1e-7, 1e-3, 1e-5)
            assert ((w - weights0[name]).abs() <= tol).all(), name


def test_labels_are_never_padding_or_prompt():
    """Every read is a completion token, never PAD or IGNORE_INDEX, and the reads number the
    completion tokens less the first of each sequence with an empty prompt."""
    prompts, chosen, rejected = HAND_PAIRS
    for layout in ("packed", "shared_prompt"):
        t = layout_pairs(prompts, chosen, rejected, layout=layout, max_tokens=10)
        assert IGNORE_INDEX not in t["read_ids"] and PAD not in t["read_ids"]
        empty = sum(1 for p in prompts if not p)
        want = sum(len(x) for x in chosen + rejected) - 2 * empty
        assert len(t["read_at"]) == want


def test_through_ddp_the_gradients_are_padded_ones(tmp_path):
    """The packed forward through DDP's wrapper of `TokenLogps` (as `wrap_policy` builds it;
    one gloo process): its keyword arguments reach the lean forward and its gradients equal
    padded's through the same wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = llama(width=64, layers=1, vocab=64, heads=2, kv_heads=1)
    prompts, chosen, rejected = random_pairs(11, 4, 64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(TokenLogps(model))
        grads = {}
        for layout in ("padded", "shared_prompt", "packed"):
            grads[layout] = _grads(model, lambda layout=layout: torch.cat(pair_logps(
                ddp, prompts, chosen, rejected, layout=layout, max_tokens=30)[:2]),
                torch.linspace(1.0, 2.0, 8, dtype=torch.float64))
    finally:
        dist.destroy_process_group()
    for layout in ("shared_prompt", "packed"):
        for name, g in grads["padded"].items():
            torch.testing.assert_close(grads[layout][name], g, atol=1e-5, rtol=0, msg=name)


def test_auto_layout_shares_the_prompt_where_the_attention_takes_a_4d_mask(toy):
    """`layout: auto` (odpo train's default) is shared_prompt under sdpa and eager attention,
    padded under flash attention (which takes no 4D mask); a forced layout stays as it is."""
    from trainer.loop import resolve_layout

    assert toy.config._attn_implementation == "sdpa"
    assert resolve_layout("auto", TokenLogps(toy)) == "shared_prompt"
    for forced in ("padded", "packed", "shared_prompt"):
        assert resolve_layout(forced, toy) == forced
    original = toy.config._attn_implementation
    try:
        toy.config._attn_implementation = "eager"
        assert resolve_layout("auto", toy) == "shared_prompt"
        toy.config._attn_implementation = "flash_attention_2"
        assert resolve_layout("auto", toy) == "padded"
    finally:
        toy.config._attn_implementation = original


def test_tokens_per_s_counts_the_pairs_tokens_in_every_layout(toy):
    """The `num_tokens` metric (tokens_per_s) counts each prompt with both responses in every
    layout, so a faster layout shows as more tokens/s, not fewer tokens."""
    from trainer.loop import dpo_step_loss

    prompts, chosen, rejected = HAND_PAIRS
    batch = {"prompt_input_ids": prompts, "chosen_input_ids": chosen,
             "rejected_input_ids": rejected}
    want = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected,
                                                                   strict=True))
    for layout in ("padded", "packed", "shared_prompt"):
        cfg = {"beta": 0.1, "loss_type": "orpo", "label_smoothing": 0.0, "alpha": 0.0,
               "layout": layout}
        _, metrics = dpo_step_loss(TokenLogps(toy), batch, PAD, cfg)
        assert metrics["num_tokens"] == want, layout
