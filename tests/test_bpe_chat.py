"""The BPE toy as a chat task (issue 18): what a real tokenizer and chat turns break and the
character toy cannot. The BPE toy (`odpo toy init --tokenizer bpe`) has merges with a leading
space, multi-byte characters spread over byte tokens, text whose tokens change at a split point,
and an end of turn `<|im_end|>` that is not EOS (`<|endoftext|>`); both stop generation.

Trusted values: the tokenizer's own `apply_chat_template(tokenize=True)` and encoding of plain
text, transformers' greedy `generate`, and a plain forward (conftest.plain_logp)."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import plain_logp, stub_steps

from jobs.cli import main
from pipeline.manifest import read_manifest
from pipeline.tasks import addition

REPO = Path(__file__).resolve().parents[1]
END_OF_TURN, EOS = "<|im_end|>", "<|endoftext|>"
# A raw (not chat) prompt that ends inside a word: "Tell the peo" + "ple" tokenizes apart as
# [..., Ġp, eo] + [ple], together as [..., Ġpeople] (the boundary case re-tokenization breaks).
PEO_PROMPT, PEO_RESPONSES = "Tell the peo", ("ple", "ple of the world", "ple who came")
EURO = "\u20ac"  # three byte tokens in the BPE toy, no merges


@pytest.fixture(scope="module")
def tok(bpe_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_model_dir)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _template_ids(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the tokenizer's own chat template tokenizes them."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True)["input_ids"]
    assert full[:len(p)] == p
    return list(p), list(full[len(p):])


def _table(stage_dir) -> list[dict]:
    files = [Path(stage_dir) / f["name"] for f in read_manifest(stage_dir)["files"]]
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


# ---------------------------------------------------------------- the chat task (no Ray)


def test_chat_task_data_and_its_sft_ids(bpe_model_dir, tok, tmp_path):
    """`odpo toy data --chat`: prompts are the user turn rendered with the generation prompt;
    SFT responses end with the end of turn, and the SFT text path gives the template's ids
    through that token, with no EOS after it (what vLLM samples and stops on)."""
    from pipeline.toy import write_task_data
    from trainer.sft import tokenize_sft_batch

    out = tmp_path / "chat"
    assert main(["toy", "data", "--out", str(out), "--sft-rows", "64", "--prompts", "16",
                 "--heldout", "16", "--chat", bpe_model_dir]) == 0
    plain = Path(write_task_data(tmp_path / "plain", 64, 16, 16))
    for name in ("sft", "prompts", "heldout"):
        chat_rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        plain_rows = pq.read_table(plain / f"{name}.parquet").to_pylist()
        assert len(chat_rows) == len(plain_rows)
        for c, p in zip(chat_rows, plain_rows, strict=True):
            assert (c["question"], c["answer"]) == (p["prompt"], p["answer"])
            assert c["prompt"] == tok.apply_chat_template(
                _user(p["prompt"]), add_generation_prompt=True, tokenize=False)
            assert addition.is_heldout(c["question"]) == (name == "heldout")
            if name == "sft":
                assert c["response"] == p["answer"] + END_OF_TURN

    rows = pq.read_table(out / "sft.parquet").to_pylist()[:16]
    got = tokenize_sft_batch({"prompt": [r["prompt"] for r in rows],
                              "response": [r["response"] for r in rows]},
                             model=bpe_model_dir, max_length=64, source="sft")
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    for r, p, c in zip(rows, got["prompt_input_ids"], got["completion_input_ids"], strict=True):
        assert c == _ids(tok, r["answer"]) + [end] and tok.eos_token_id not in c
        t_prompt, t_completion = _template_ids(
            tok, _user(r["question"]), [{"role": "assistant", "content": r["answer"]}])
        # The template's ids through the end of turn; only its newline after it is left out.
        assert (p, c) == (t_prompt, t_completion[:len(c)])
        assert tok.decode(t_completion[len(c):]) == "\n"


def test_chat_needs_a_template_one_line(toy_model_dir, tmp_path, capsys):
    assert main(["toy", "data", "--out", str(tmp_path / "d"), "--sft-rows", "4", "--prompts",
                 "4", "--heldout", "4", "--chat", toy_model_dir]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists()


def test_iterate_toy_data_chat_and_the_demo_config(tmp_path, monkeypatch, capsys):
    """`toy_data: {chat: true}` renders the task with the toy model's template;
    jobs/configs/toy_addition_chat.yaml is toy_addition.yaml's recipe on the BPE toy."""
    calls = stub_steps(monkeypatch)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "rounds": 1, "scorer": "addition",
        "toy_model": {"tokenizer": "bpe"},
        "toy_data": {"sft_rows": 8, "prompts": 4, "heldout": 4, "chat": True},
        "train": {"beta": 0.1}}))
    assert main(["iterate", "--config", str(path)]) == 0
    run = tmp_path / "run"
    for name in ("sft", "prompts", "heldout"):
        for row in pq.read_table(run / "data" / f"{name}.parquet").to_pylist():
            assert row["prompt"] == f"<|im_start|>user\n{row['question']}<|im_end|>\n" \
                                    f"<|im_start|>assistant\n"
    assert [c[0] for c in calls][:3] == ["sft", "eval", "sample"]

    for bad, msg in (({"toy_data": {"chat": 1}, "toy_model": {}}, "chat must be true or false"),
                     ({"toy_data": {"chat": True}}, "chat needs `toy_model:` or `policy:`")):
        path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "bad"), "scorer": "addition",
                                        "train": {"beta": 0.1}, **bad}))
        capsys.readouterr()
        assert main(["iterate", "--config", str(path)]) == 2
        assert msg in capsys.readouterr().err

    configs = REPO / "jobs" / "configs"
    chat = yaml.safe_load((configs / "toy_addition_chat.yaml").read_text())
    char = yaml.safe_load((configs / "toy_addition.yaml").read_text())
    assert chat.pop("toy_model") == {"tokenizer": "bpe"} and char.pop("toy_model") == {}
    assert chat["toy_data"].pop("chat") is True
    assert chat.pop("run_dir") == "runs/toy_addition_chat" and char.pop("run_dir")
    assert chat == char


def test_verifier_reads_the_answer_before_the_end_of_turn():
    responses = ["579", "579<|im_end|>", " 579<|im_end|>\n", "579<|endoftext|>", "57<|im_end|>9",
                 "5790", "<|im_end|>579"]
    assert addition.verify(["1+1="] * 7, responses, [{"answer": "579"}] * 7) == [
        1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- token ids (no Ray)


def test_completion_ends_where_generation_stops(tok, toy_tokenizer):
    """EOS is appended to a completion unless it already ends (trailing whitespace aside) with
    EOS or the end of turn: "579<|im_end|>" is what vLLM samples for a chat answer."""
    from trainer.collate import tokenize_completions

    end, eos, nl = tok.convert_tokens_to_ids(END_OF_TURN), tok.eos_token_id, _ids(tok, "\n")
    texts = ["579<|im_end|>", "579", "46<|im_end|>\n", "579<|endoftext|>", EURO, "a\n"]
    prompts, completions = tokenize_completions(tok, ["1+1="] * len(texts), texts)
    digits = _ids(tok, "579")
    assert completions == [digits + [end], digits + [eos], _ids(tok, "46") + [end] + nl,
                           digits + [eos], _ids(tok, EURO) + [eos], _ids(tok, "a\n") + [eos]]
    assert prompts == [_ids(tok, "1+1=")] * len(texts)  # the BPE toy adds no BOS
    # The character toy: as before, one EOS, also after a completion that spells it out.
    c_eos = toy_tokenizer.eos_token_id
    _, char = tokenize_completions(toy_tokenizer, ["1+2="] * 2, ["3", "3<eos>"])
    assert char == [toy_tokenizer.convert_tokens_to_ids(["3"]) + [c_eos]] * 2


def test_sampled_ids_are_kept_across_the_prompt_boundary(tok):
    """A case where tokenize(prompt) + tokenize(completion) != tokenize(prompt + completion):
    the text path tokenizes the two apart (as vLLM saw the prompt and generated after it) and
    the sampled ids are used as they are, a non-canonical split included."""
    from trainer.collate import tokenize_completions
    from trainer.precompute import tokenize_pairs

    apart = _ids(tok, PEO_PROMPT) + _ids(tok, "ple")
    assert apart != _ids(tok, PEO_PROMPT + "ple")  # [.., Ġp, eo, ple] vs [.., Ġpeople]
    p, c = tokenize_completions(tok, [PEO_PROMPT], ["ple"])
    assert p[0] + c[0] == apart + [tok.eos_token_id]

    eos = tok.eos_token_id
    chosen = _ids(tok, "ple") + _ids(tok, " of the world") + [eos]
    rejected = tok.convert_tokens_to_ids(["p", "l", "e"]) + [eos]  # decodes to "ple" too
    assert tok.decode(rejected, skip_special_tokens=True) == "ple" and rejected[:3] != _ids(
        tok, "ple")
    keep, p_ids, c_ids, r_ids, dropped, cut = tokenize_pairs(
        tok, [PEO_PROMPT], ["ple of the world"], ["ple"], max_length=64, max_prompt_length=32,
        truncation="truncate", vocab_size=len(tok), chosen_token_ids=[chosen],
        rejected_token_ids=[rejected])
    assert (keep, p_ids, c_ids, r_ids, cut) == ([0], [_ids(tok, PEO_PROMPT)], [chosen],
                                                 [rejected], 0)


def test_cut_inside_a_character_and_truncation_keep_whole_tokens(tok):
    """A response cut at max_tokens inside a multi-byte character is trained as sampled: its
    text cannot give the ids back. Truncating a pair cuts whole tokens: the kept completion is
    a prefix of its ids (a merge such as Ġpeople stays whole or goes), never a re-tokenization
    of cut text."""
    from trainer.precompute import tokenize_pairs

    end = tok.convert_tokens_to_ids(END_OF_TURN)
    cut = _ids(tok, EURO * 2)[:4]  # max_tokens 4: one euro sign and a byte of the next
    text = tok.decode(cut)
    assert text == EURO + "\ufffd" and _ids(tok, text) != cut
    prompt = tok.apply_chat_template(_user("euro"), add_generation_prompt=True, tokenize=False)
    keep, p, c, r, _, n_cut = tokenize_pairs(
        tok, [prompt], [text], [EURO], max_length=64, max_prompt_length=32,
        truncation="truncate", chosen_token_ids=[cut], rejected_token_ids=[_ids(tok, EURO) + [end]])
    assert (c, r, n_cut) == ([cut], [_ids(tok, EURO) + [end]], 0)  # no EOS after a cut

    # Text path: cut by max_length at every length, the completion keeps its first tokens.
    completion = "the people of the world say " + EURO * 3
    full = _ids(tok, completion) + [tok.eos_token_id]
    assert "Ġpeople" in tok.convert_ids_to_tokens(full)
    p_len = len(_ids(tok, "Q"))
    kept = []
    for max_length in range(p_len + 1, p_len + len(full)):
        _, _, c, r, _, n_cut = tokenize_pairs(
            tok, ["Q"], [completion], ["x"], max_length=max_length, max_prompt_length=1,
            truncation="truncate")
        room = max_length - p_len
        assert n_cut == 1 and c[0] == full[:room]
        assert r[0] == (_ids(tok, "x") + [tok.eos_token_id])[:room]
        kept.append(c[0])
    # Some cuts end inside the euro signs: byte tokens no text encodes back to.
    assert any(_ids(tok, tok.decode(k)) != k for k in kept)


def test_import_reproduces_apply_chat_template(bpe_model_dir, tok, tmp_path):
    """`odpo import` of conversations with the BPE toy's own template: the ids every stage
    tokenizes (tokenize_completions, precompute's tokenize_pairs) are exactly
    `apply_chat_template(..., tokenize=True)`'s, end of turn and the template's newline after
    it included, with no EOS added (TRL's rule for conversations)."""
    from trainer.collate import tokenize_completions
    from trainer.precompute import tokenize_pairs

    def turn(role, content):
        return {"role": role, "content": content}

    rows = [
        {"prompt": [turn("user", "12+34=")], "chosen": [turn("assistant", "46")],
         "rejected": [turn("assistant", "47")]},
        {"prompt": [turn("system", "Complete the text."), turn("user", PEO_PROMPT)],
         "chosen": [turn("assistant", "ple")], "rejected": [turn("assistant", " people")]},
        {"prompt": [turn("user", "1+1="), turn("assistant", "2"), turn("user", "price?")],
         "chosen": [turn("assistant", "5" + EURO)], "rejected": [turn("assistant", "5 euro")]},
        {"prompt": [turn("user", "9+9=")],
         "chosen": [turn("assistant", "18"), turn("user", "sure?"), turn("assistant", "yes")],
         "rejected": [turn("assistant", "17"), turn("user", "sure?"), turn("assistant", "no")]},
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs"
    assert main(["import", "--data", str(data), "--tokenizer", bpe_model_dir,
                 "--out", str(out)]) == 0
    pairs = _table(out)
    assert len(pairs) == len(rows)
    assert read_manifest(out)["rendering"] == {"bos_stripped": 0, "eos_stripped": 0}
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    for row, pair in zip(rows, pairs, strict=True):
        want_p, want_c = _template_ids(tok, row["prompt"], row["chosen"])
        _, want_r = _template_ids(tok, row["prompt"], row["rejected"])
        assert want_c[-2:] == [end] + _ids(tok, "\n")
        p_ids, c_ids = tokenize_completions(tok, [pair["prompt"]], [pair["chosen"]])
        _, r_ids = tokenize_completions(tok, [pair["prompt"]], [pair["rejected"]])
        assert (p_ids[0], c_ids[0], r_ids[0]) == (want_p, want_c, want_r)
        _, p2, c2, r2, _, _ = tokenize_pairs(
            tok, [pair["prompt"]], [pair["chosen"]], [pair["rejected"]], max_length=64,
            max_prompt_length=32, truncation="truncate")
        assert (p2[0], c2[0], r2[0]) == (want_p, want_c, want_r)


# ---------------------------------------------------------------- vLLM and the round (slow)


def _sft_rows(tok, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response): the chat addition task, plus the raw boundary prompt (three
    continuations, EOS appended) and a chat prompt answered by one or five euro signs."""
    from pipeline.toy import as_chat, chat_turn

    rng = random.Random(seed)
    rows = [(r["prompt"], r["response"]) for r in as_chat(addition.sft_data(4096, seed), tok)]
    for _ in range(600):
        rows.append((PEO_PROMPT, rng.choice(PEO_RESPONSES)))
        rows.append(chat_turn(tok, "euro", EURO * rng.choice((1, 5))))
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def chat_sft(bpe_model_dir, tok, tmp_path_factory):
    """The BPE toy after 200 SFT steps (batch 32, lr 3e-3; plain PyTorch in this process, on the
    ids of the project's text path `tokenize_completions`) on `_sft_rows`.

    Why train: the random toy's greedy output runs on to max_tokens, cycling a few merged
    words, and never ends its turn, so neither stop token would be exercised. After these steps
    it answers a chat turn with digits then `<|im_end|>`, the boundary prompt with a
    continuation then `<|endoftext|>`, and "euro" with euro signs (cut at a small max_tokens
    inside a character)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.collate import collate, tokenize_completions

    torch.manual_seed(0)
    rows = _sft_rows(tok)
    prompt_ids, completion_ids = tokenize_completions(tok, [p for p, _ in rows],
                                                      [r for _, r in rows])
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    model.train()
    for _ in range(200):
        idx = [rng.randrange(len(rows)) for _ in range(32)]
        b = collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx],
                    tok.pad_token_id)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              labels=b["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("bpe_sft") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template(_user(question), add_generation_prompt=True, tokenize=False)


VLLM_GREEDY = """
import json, os, sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
from vllm import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    # a 64 MiB KV cache: the 0.1 share of memory would be allocated and zeroed at start (seconds)
    llm = LLM(model=model, dtype="float32", kv_cache_memory_bytes=64 * 2**20, enforce_eager=True,
              seed=0, load_format="safetensors", distributed_executor_backend="uni")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    print("RESULT " + json.dumps([
        {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
         "finish_reason": o.outputs[0].finish_reason} for o in outs]))
"""


@pytest.mark.slow
def test_vllm_greedy_equals_transformers_greedy_and_stops(chat_sft, tok, tmp_path):
    """The BPE toy loads unchanged in vLLM; float32 greedy decoding gives transformers' greedy
    ids token for token on held-out chat prompts; vLLM stops at the end of turn and at EOS (both
    in generation_config.json) and keeps the stop token as the last id."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [_chat_prompt(tok, r["prompt"]) for r in addition.heldout(8, seed=3)]
    prompts += [PEO_PROMPT, _chat_prompt(tok, "euro")]
    script = tmp_path / "greedy.py"
    script.write_text(VLLM_GREEDY)
    proc = subprocess.run([sys.executable, str(script), str(chat_sft), json.dumps(prompts)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])

    model = AutoModelForCausalLM.from_pretrained(chat_sft).eval()
    end, eos = tok.convert_tokens_to_ids(END_OF_TURN), tok.eos_token_id
    for prompt, o in zip(prompts, got, strict=True):
        ids = tok(prompt)["input_ids"]
        assert o["prompt_token_ids"] == ids
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                dtype=torch.long), do_sample=False, max_new_tokens=16)
        assert o["token_ids"] == hf[0, len(ids):].tolist(), prompt
        stops = [i for i, t in enumerate(o["token_ids"]) if t in (end, eos)]
        assert (o["finish_reason"] == "stop") == (stops == [len(o["token_ids"]) - 1])
    answers = [tuple(o["token_ids"]) for o in got[:8]]
    assert all(a[-1] == end for a in answers) and len(set(answers)) >= 3  # varied, turn ended
    assert got[8]["token_ids"][-1] == eos and got[8]["finish_reason"] == "stop"
    assert tok.decode(got[8]["token_ids"][:-1]) in PEO_RESPONSES


LENGTH_SCORER = ("def score(prompts, responses, rows):\n"
                 "    return [float(r['num_response_tokens']) for r in rows]\n")


@pytest.fixture(scope="module")
def chat_round(ray_local, chat_sft, tok, tmp_path_factory):
    """One round by hand on the trained BPE toy: `odpo sample` (k=8, temperature 1,
    max_tokens 8: five euro signs are cut inside the third) of six chat addition prompts, the
    raw boundary prompt and "euro" -> score (response length in tokens, cut responses kept) ->
    best_worst pairs -> precompute."""
    from pipeline.toy import as_chat

    root = tmp_path_factory.mktemp("chat_round")
    rows = as_chat(addition.prompts(6, seed=1), tok)
    rows += [{"prompt": PEO_PROMPT, "answer": "ple", "question": PEO_PROMPT},
             {"prompt": _chat_prompt(tok, "euro"), "answer": EURO, "question": "euro"}]
    pq.write_table(pa.Table.from_pylist(rows), root / "prompts.parquet")
    (root / "length.py").write_text(LENGTH_SCORER)
    steps = [
        ["sample", "--model", str(chat_sft), "--prompts", str(root / "prompts.parquet"),
         "--out", str(root / "samples"), "--k", "8", "--max-tokens", "8", "--seed", "1"],
        ["score", "--samples", str(root / "samples"), "--out", str(root / "scored"),
         "--scorer", f"{root / 'length.py'}:score", "--keep-truncated"],
        ["pair", "--scored", str(root / "scored"), "--out", str(root / "pairs")],
        ["precompute", "--pairs", str(root / "pairs"), "--model", str(chat_sft), "--out",
         str(root / "precompute"), "--cache-dir", str(root / "cache")],
    ]
    for args in steps:
        assert main(args) == 0, args[0]
    return root


def _first_dpo_step(model_dir, stage_dir) -> dict:
    """Step 0's metrics of `odpo train --beta 0.1 --batch-size <every pair>` on `stage_dir`:
    the loop a Ray Train worker runs (`trainer.loop.train_steps`), on the policy loaded and
    wrapped as there, with the precompute shards' columns the trainer reads, in this process
    (Ray Train's own part: the end-to-end run and tests/test_dpo.py)."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from trainer.dpo import DPOConfig, needed_columns
    from trainer.loop import load_policy, make_optimizer, train_steps, wrap_policy

    files = [stage_dir / f["name"] for f in read_manifest(stage_dir)["files"]]
    table = pa.concat_tables([pq.read_table(f, columns=list(needed_columns("sigmoid")))
                              for f in files])
    cfg = {**dataclasses.asdict(DPOConfig(model=str(model_dir), data=str(stage_dir), out="-",
                                          beta=0.1, batch_size=table.num_rows)),
           "objective": "dpo", "total_steps": 1, "steps_per_epoch": 1}
    model = wrap_policy(load_policy(cfg, str(model_dir)).train(), cfg, torch.device("cpu"), 1)
    optimizer, scheduler = make_optimizer(model, cfg)
    logged = []
    train_steps(model, optimizer, scheduler, table, cfg, rank=0, world=1, start_step=0,
                pad_token_id=AutoTokenizer.from_pretrained(model_dir).pad_token_id,
                log=lambda step, m: logged.append({"step": step, **m}),
                after_step=lambda done, epoch: None)
    return logged[0]


def _by_key(rows) -> dict:
    return {(r["prompt_id"], r["sample_index"]): r for r in rows}


@pytest.mark.slow
def test_sampled_ids_reach_training_unchanged(chat_round, tok):
    """Every pair's precompute ids are the ids vLLM sampled, ending in the token it stopped on
    (`<|im_end|>` for chat turns, `<|endoftext|>` after the raw prompt), with no EOS added; the
    boundary prompt's samples are pairs that a joint re-tokenization would change."""
    end, eos = tok.convert_tokens_to_ids(END_OF_TURN), tok.eos_token_id
    samples = _by_key(_table(chat_round / "samples"))
    for s in samples.values():
        ids = s["response_token_ids"]
        assert (s["finish_reason"] == "stop") == (ids[-1] in (end, eos))
        assert end not in ids[:-1] and eos not in ids[:-1]
    ends = {(s["prompt"] == PEO_PROMPT, s["response_token_ids"][-1]) for s in samples.values()}
    assert {(False, end), (True, eos)} <= ends  # chat turns end at <|im_end|>, raw text at EOS
    rows = _table(chat_round / "precompute")
    boundary = 0
    for r in rows:
        assert r["prompt_input_ids"] == tok(r["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            s = samples[(r["prompt_id"], r[f"{side}_sample_index"])]
            assert r[f"{side}_input_ids"] == s["response_token_ids"]
            if r["prompt"] == PEO_PROMPT and s["response"].startswith("ple"):
                # [.., Ġp, eo] + [ple, ..] as sampled; re-tokenized together: [.., Ġpeople, ..]
                text_ids = [t for t in r[f"{side}_input_ids"] if t not in (end, eos)]
                assert r["prompt_input_ids"] + text_ids != _ids(tok, PEO_PROMPT + s["response"])
                boundary += 1
    assert boundary >= 2  # a boundary pair reached training


@pytest.mark.slow
def test_response_cut_inside_a_character_is_trained_as_sampled(chat_round, tok):
    """A euro-sign answer cut at max_tokens inside a character: vLLM's text drops the lone
    byte, so the text tokenizes to fewer ids; precompute keeps the sampled ids, without EOS."""
    samples = _by_key(_table(chat_round / "samples"))
    cut_pairs = 0
    for r in _table(chat_round / "precompute"):
        s = samples[(r["prompt_id"], r["chosen_sample_index"])]
        if s["finish_reason"] != "length" or "euro" not in r["prompt"]:
            continue
        ids = r["chosen_input_ids"]
        assert ids == s["response_token_ids"] and len(ids) == 8
        assert tok.decode(ids).endswith("\ufffd") and _ids(tok, s["response"]) != ids
        assert tok.eos_token_id not in ids and tok.convert_tokens_to_ids(END_OF_TURN) not in ids
        cut_pairs += 1
    assert cut_pairs == 1


@pytest.mark.slow
def test_reference_stage_and_trainer_see_identical_ids(chat_round, chat_sft, tok):
    """The precompute log-probs are a plain forward's over the stored ids, and the trainer, whose
    policy starts as that reference, gets the very same log-probs at step 0: loss ln 2, zero
    rewards, its mean chosen log-prob the reference's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_sft).eval()
    rows = _table(chat_round / "precompute")
    for r in rows:
        for side in ("chosen", "rejected"):
            assert r[f"ref_{side}_logps"] == pytest.approx(
                plain_logp(model, r["prompt_input_ids"], r[f"{side}_input_ids"]), abs=1e-5)
    first = _first_dpo_step(chat_sft, chat_round / "precompute")
    assert first["step"] == 0
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    for side in ("chosen", "rejected"):
        mean = sum(r[f"ref_{side}_logps"] for r in rows) / len(rows)
        assert first[f"logps/{side}"] == pytest.approx(mean, abs=1e-4)
