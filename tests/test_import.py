"""`odpo import`, `odpo sft --from-pairs` and `odpo byod`: someone else's preference data into the
same precompute + train path. Trusted values: hand-derived splits and counts, a copy of TRL's
prompt-extraction rule, the tokenizer's own `apply_chat_template(tokenize=True)`, `datasets`, and
log-probs from a plain `transformers` forward written here."""

import contextlib
import hashlib
import io
import json
import math
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.errors import UserError
from pipeline.importer import common_prefix_split
from pipeline.manifest import read_manifest

TEMPLATE = Path(__file__).parents[1] / "jobs" / "configs" / "toy_chat_template.jinja"


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


def _pairs(out) -> list[dict]:
    files = [Path(out) / f["name"] for f in read_manifest(out)["files"]]
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _write_jsonl(path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def chat_toy(toy_model_dir, tmp_path_factory):
    """A copy of the toy model whose tokenizer carries a chat template (saved with the model)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat_toy") / "model"
    shutil.copytree(toy_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = TEMPLATE.read_text()
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_tok(chat_toy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_toy)


def _template_ids(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the tokenizer's own chat template tokenizes them."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True)["input_ids"]
    assert full[:len(p)] == p
    return list(p), list(full[len(p):])


# ---------------------------------------------------------------- prompt extraction (no Ray)


def trl_extract_prompt(chosen, rejected):
    """TRL's `_extract_prompt` (trl/data_utils.py), copied as the reference rule."""
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def test_common_prefix_hand_derived():
    assert common_prefix_split("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")
    assert common_prefix_split("12+3=15", "12+3=16") == ("12+3=1", "5", "6")
    assert common_prefix_split("abc", "xbc") is None  # no common prefix
    assert common_prefix_split("ab", "abcd") is None  # chosen is a prefix of rejected
    conv_c = [user("1+1="), assistant("2"), user("and 2+2?"), assistant("4")]
    conv_r = [user("1+1="), assistant("2"), user("and 2+2?"), assistant("5")]
    assert common_prefix_split(conv_c, conv_r) == (conv_c[:3], [conv_c[3]], [conv_r[3]])
    assert common_prefix_split([user("a"), assistant("b")], [user("c"), assistant("b")]) is None


def test_common_prefix_agrees_with_trl_rule():
    rng = random.Random(0)
    agreed = 0
    for _ in range(3000):
        c = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 8)))
        r = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 8)))
        if c == r:
            continue
        ours = common_prefix_split(c, r)
        trl = trl_extract_prompt(c, r)
        n = next((i for i, (x, y) in enumerate(zip(c, r, strict=False)) if x != y), None)
        if ours is None:  # TRL's rule gives an empty prompt or completion there
            assert n in (None, 0) or not all(s.strip() for s in trl)
        else:
            assert ours == trl
            agreed += 1
    assert agreed > 300  # both rules ran on enough real splits


# ---------------------------------------------------------------- the import stage (no Ray)


def test_conversational_rows_tokenize_exactly_like_apply_chat_template(chat_toy, chat_tok,
                                                                        tmp_path):
    from trainer.collate import tokenize_completions

    rows = [
        {"prompt": [user("12+34=")], "chosen": [assistant("46")], "rejected": [assistant("47")]},
        {"prompt": [{"role": "system", "content": "add"}, user("1+1=")],
         "chosen": [assistant("2")], "rejected": [assistant("3")]},
        {"prompt": [user("1+1="), assistant("2"), user("2+2=")],
         "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": [user("9+9=")], "chosen": [assistant("18"), user("ok?"), assistant("yes")],
         "rejected": [assistant("17"), user("ok?"), assistant("no")]},
    ]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "pairs"
    assert main(["import", "--data", str(data), "--tokenizer", str(chat_toy),
                 "--out", str(out)]) == 0
    pairs = _pairs(out)
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs, strict=True):
        p_ids, c_ids = tokenize_completions(chat_tok, [pair["prompt"]], [pair["chosen"]])
        _, r_ids = tokenize_completions(chat_tok, [pair["prompt"]], [pair["rejected"]])
        assert (p_ids[0], c_ids[0]) == _template_ids(chat_tok, row["prompt"], row["chosen"])
        assert r_ids[0] == _template_ids(chat_tok, row["prompt"], row["rejected"])[1]
        assert pair["prompt_id"] == _digest(pair["prompt"])
        assert (pair["chosen_score"], pair["rejected_score"], pair["round"]) == (None, None, 0)
        assert json.loads(pair["prompt_messages"]) == row["prompt"]
        assert json.loads(pair["chosen_messages"]) == row["chosen"]
    # Hand-derived text for the first row: BOS and EOS are added at tokenization, not stored.
    assert (pairs[0]["prompt"], pairs[0]["chosen"]) == ("Q:12+34= A:", "46")
    m = read_manifest(out)
    assert (m["stage"], m["form"], m["rows_in"], m["rows_out"]) == ("import", "conversational",
                                                                    4, 4)
    assert m["rendering"] == {"bos_stripped": 4, "eos_stripped": 8}

    # The same template given as a file to a tokenizer without one: the same shards.
    plain = tmp_path / "plain_toy"
    shutil.copytree(chat_toy, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    assert main(["import", "--data", str(data), "--tokenizer", str(plain),
                 "--out", str(tmp_path / "bare")]) == 2
    assert main(["import", "--data", str(data), "--tokenizer", str(plain), "--chat-template",
                 str(TEMPLATE), "--out", str(tmp_path / "from_file")]) == 0
    strip = ("prompt", "chosen", "rejected")
    assert ([{k: p[k] for k in strip} for p in _pairs(tmp_path / "from_file")]
            == [{k: p[k] for k in strip} for p in pairs])


def test_implicit_prompt_is_the_common_prefix_and_failures_are_counted(chat_toy, chat_tok,
                                                                        tmp_path, capsys):
    import datasets

    rows = [  # no prompt column: TRL's implicit-prompt conversational form
        {"chosen": [user("3+4="), assistant("7")], "rejected": [user("3+4="), assistant("8")]},
        {"chosen": [user("1+1="), assistant("2"), user("2+2="), assistant("4")],
         "rejected": [user("1+1="), assistant("2"), user("2+2="), assistant("5")]},
        {"chosen": [user("5+5="), assistant("10")], "rejected": [user("5+6="), assistant("11")]},
        {"chosen": [user("6+6=")], "rejected": [user("6+6="), assistant("12")]},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "prefs")
    out = tmp_path / "pairs"
    assert main(["import", "--data", str(tmp_path / "prefs"), "--tokenizer", str(chat_toy),
                 "--out", str(out)]) == 0
    assert "common-prefix prompt found in 2 rows, failed in 2" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["prompt_source"] == "extracted"
    assert m["prompt_extraction"] == {"extracted": 2, "failed": 2}
    assert m["dropped"] == {"no_common_prefix": 2}
    pairs = _pairs(out)
    assert json.loads(pairs[1]["prompt_messages"]) == rows[1]["chosen"][:3]
    from trainer.collate import tokenize_completions

    p_ids, c_ids = tokenize_completions(chat_tok, [pairs[1]["prompt"]], [pairs[1]["chosen"]])
    assert (p_ids[0], c_ids[0]) == _template_ids(chat_tok, rows[1]["chosen"][:3],
                                                 rows[1]["chosen"][3:])


def test_standard_form_from_parquet_and_datasets(tmp_path):
    import datasets

    table = pa.table({
        "prompt": ["What is 2+2?", "Name a colour."],
        "chosen": [" 4", " Blue"],
        "rejected": [" 5", " Blue"],  # identical: dropped
        "score_chosen": [9.0, 7.5],
        "score_rejected": [2.0, 7.5],
        "source": ["math", "misc"],
    })
    pq.write_table(table, tmp_path / "prefs.parquet")
    out = tmp_path / "pairs"
    assert main(["import", "--data", str(tmp_path / "prefs.parquet"), "--out", str(out)]) == 0
    [pair] = _pairs(out)
    assert pair == {"prompt_id": _digest("What is 2+2?"), "prompt": "What is 2+2?",
                    "chosen": " 4", "rejected": " 5", "chosen_score": 9.0,
                    "rejected_score": 2.0, "round": 0, "source": "math"}
    m = read_manifest(out)
    assert (m["form"], m["dropped"], m["score_columns"]) == (
        "standard", {"identical": 1}, ["score_chosen", "score_rejected"])
    # TRL / `datasets` read the shards as they are (docs/design.md, Data contracts).
    loaded = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    assert loaded[0]["chosen"] == " 4" and loaded.column_names[:4] == [
        "prompt_id", "prompt", "chosen", "rejected"]

    # Implicit prompt from strings, in a `datasets` directory.
    datasets.Dataset.from_dict({
        "chosen": ["Human: 2+2? Assistant: 4", "abc", "same start"],
        "rejected": ["Human: 2+2? Assistant: 5", "xbc", "same start and more"],
    }).save_to_disk(tmp_path / "implicit")
    out = tmp_path / "implicit_pairs"
    assert main(["import", "--data", str(tmp_path / "implicit"), "--out", str(out)]) == 0
    [pair] = _pairs(out)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (
        "Human: 2+2? Assistant:", " 4", " 5")
    assert read_manifest(out)["prompt_extraction"] == {"extracted": 1, "failed": 2}


BAD_ROWS = [  # (row, reason it is dropped for); every reason once
    ({"prompt": [user("1+1=")], "chosen": [assistant("2")], "rejected": [assistant("3")]}, None),
    ({"prompt": [user("1+2=")], "chosen": [], "rejected": [assistant("4")]}, "empty_chosen"),
    ({"prompt": [user("1+3=")], "chosen": [assistant("4")], "rejected": [assistant(" ")]},
     "empty_rejected"),
    ({"prompt": [], "chosen": [assistant("4")], "rejected": [assistant("5")]}, "empty_prompt"),
    ({"prompt": [user("1+4=")], "chosen": [assistant("5")], "rejected": [assistant("5")]},
     "identical"),
    ({"prompt": [user("1+5=")], "chosen": [assistant("6")],
      "rejected": [user("hm"), assistant("7")]}, "mismatched_roles"),
    ({"prompt": [user("1+6="), assistant("?")], "chosen": [assistant("7")],
      "rejected": [assistant("8")]}, "mismatched_roles"),
    ({"prompt": [user("1+7=")], "chosen": [user("8")], "rejected": [assistant("9")]},
     "final_not_assistant"),
    ({"prompt": [user("1+8=")], "chosen": [assistant(None)], "rejected": [assistant("9")]},
     "non_string_content"),
    ({"prompt": [{"role": None, "content": "1+9="}], "chosen": [assistant("10")],
      "rejected": [assistant("11")]}, "malformed_message"),
    ({"prompt": [user("2+2=")], "chosen": [assistant("4")], "rejected": [assistant("5")]}, None),
]


def test_bad_rows_are_dropped_by_reason_or_stop_with_one_line(chat_toy, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_ROWS])
    out = tmp_path / "pairs"
    assert main(["import", "--data", str(data), "--tokenizer", str(chat_toy),
                 "--out", str(out)]) == 0
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    m = read_manifest(out)
    assert m["dropped"] == expected
    assert (m["rows_in"], m["rows_out"]) == (len(BAD_ROWS), 2)
    assert [p["prompt"] for p in _pairs(out)] == ["Q:1+1= A:", "Q:2+2= A:"]

    capsys.readouterr()
    assert main(["import", "--data", str(data), "--tokenizer", str(chat_toy), "--out",
                 str(tmp_path / "strict"), "--bad-rows", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "row 1:" in err and "empty_chosen" in err
    assert not (tmp_path / "strict").exists()


def test_schema_problems_are_one_line_errors(chat_toy, toy_model_dir, tmp_path, capsys):
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "1+1=", "chosen": [assistant("2")], "rejected": [assistant("3")]}])
    cases = [
        (["--data", str(mixed), "--tokenizer", str(chat_toy)], "prompt_column"),
        (["--data", str(_write_jsonl(tmp_path / "c.jsonl", [
            {"prompt": [user("1+1=")], "chosen": [assistant("2")],
             "rejected": [assistant("3")]}]))], "needs --tokenizer"),
        (["--data", str(_write_jsonl(tmp_path / "n.jsonl", [
            {"prompt": "a", "chosen": 1, "rejected": 2}]))], "expected strings"),
        (["--data", str(_write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}]))],
         "missing column"),
        (["--data", str(mixed), "--bad-rows", "maybe"], "--bad-rows: invalid choice: 'maybe'"),
    ]
    for i, (args, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["import", *args, "--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    # A string prompt beside message lists: `--prompt-column ""` takes the prompt from the
    # messages instead (here they share none: the row is counted as such).
    assert main(["import", "--data", str(mixed), "--tokenizer", str(chat_toy), "--prompt-column",
                 "", "--out", str(tmp_path / "ok")]) == 0
    assert read_manifest(tmp_path / "ok")["dropped"] == {"no_common_prefix": 1}


def test_import_is_skipped_when_current(chat_toy, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "p.jsonl", [r for r, reason in BAD_ROWS if reason is None])
    args = ["import", "--data", str(data), "--tokenizer", str(chat_toy), "--out",
            str(tmp_path / "pairs")]
    assert main(args) == 0
    before = (tmp_path / "pairs" / "manifest.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert (tmp_path / "pairs" / "manifest.json").read_text() == before


def test_sft_needs_exactly_one_data_source(toy_model_dir, tmp_path):
    from trainer.sft import SFTConfig, run_sft

    for extra in ({}, {"data": "d.parquet", "from_pairs": "pairs"}):
        with pytest.raises(UserError, match="exactly one of --data"):
            run_sft(SFTConfig(model=toy_model_dir, out=str(tmp_path / "o"), **extra))


def test_training_run_dir_is_kept_resumed_or_cleared_by_its_manifest(tmp_path, capsys):
    """Ray Train resumes whatever checkpoints a run dir holds, so a training run whose config or
    inputs changed must start from an empty dir; a half-done run of the same config is kept;
    a directory that is not a run of this step is never removed."""
    from pipeline.manifest import current_run, finish_run, start_run

    out, cfg, d1 = str(tmp_path / "sft"), {"lr": 1}, {"data": "d1"}
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no manifest.json; refusing"):
        current_run(out, "sft", cfg, d1)  # not a run's: never removed
    assert (tmp_path / "sft" / "model" / "config.json").exists()
    (tmp_path / "sft" / "model" / "config.json").unlink()
    assert current_run(out, "sft", cfg, d1) is None
    start_run(out, "sft", cfg, d1)
    (tmp_path / "sft" / "ray").mkdir()  # its checkpoints
    assert current_run(out, "sft", cfg, d1) is None  # half-done: not skipped
    start_run(out, "sft", cfg, d1)
    assert (tmp_path / "sft" / "ray").exists()  # same config: kept, to resume
    (tmp_path / "sft" / "model" / "model.safetensors").write_bytes(b"weights")
    finish_run(out, "sft", cfg, d1, "model", {"summary": {"steps": 3}})
    assert current_run(out, "sft", cfg, d1)["summary"] == {"steps": 3}  # current: skip
    assert current_run(out, "sft", {"lr": 2}, d1) is None  # another config: not current...
    assert (tmp_path / "sft" / "model").exists()  # ...and nothing removed until a run starts
    (tmp_path / "sft" / "model" / "model.safetensors").write_bytes(b"damaged")
    assert current_run(out, "sft", cfg, d1) is None  # damaged: redone (resumed), kept
    start_run(out, "sft", cfg, d1)
    assert (tmp_path / "sft" / "ray").exists()
    capsys.readouterr()
    start_run(out, "sft", cfg, {"data": "d2"})  # other inputs: the old run is removed
    assert "another inputs; starting over" in capsys.readouterr().out
    assert not (tmp_path / "sft" / "ray").exists()
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["inputs"] == {
        "data": "d2"}
    with pytest.raises(UserError, match="holds 'sft' output"):
        current_run(out, "train", cfg, d1)


# ---------------------------------------------------------------- the whole path (Ray)


def _addition_prefs(n: int, seed: int) -> list[dict]:
    """Conversational addition preferences "made by another model": chosen the right sum,
    rejected a near miss; some prompts carry a system turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt = [user(f"{a}+{b}=")]
        if i % 4 == 0:
            prompt = [{"role": "system", "content": "add"}, *prompt]
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append({"prompt": prompt, "chosen": [assistant(str(a + b))],
                     "rejected": [assistant(str(wrong))]})
    return rows


def _chosen_logps(model_dir, tok, rows) -> list[float]:
    """Summed log-prob of each chosen completion: a plain forward on the template's ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for r in rows:
            p, c = _template_ids(tok, r["prompt"], r["chosen"])
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(),
                                         -1)
            out.append(float(sum(logprobs[len(p) + j - 1, t] for j, t in enumerate(c))))
    return out


# ---------------------------------------------------------------- byod: the order (no Ray)


def test_byod_runs_import_sft_precompute_train_in_order(tmp_path, monkeypatch):
    """`odpo byod`: import (the model's tokenizer renders chat rows) -> SFT on chosen (over-long
    rows dropped and counted) -> precompute with the SFT model -> DPO from the SFT model, each
    section reaching its step, a section's own value over byod's default; a re-run runs every
    step again (each skips itself when current) with the same configs but the changed section's."""
    import dataclasses

    from conftest import stub_steps

    from jobs.byod import BYODConfig, run_byod

    calls = stub_steps(monkeypatch)
    (tmp_path / "model").mkdir()
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    run, model = str(tmp_path / "run"), str(tmp_path / "model")
    cfg = BYODConfig(run_dir=run, data=str(tmp_path / "prefs.jsonl"), model=model,
                     sft={"max_steps": 4}, precompute={"cache_dir": str(tmp_path / "c")},
                     train={"beta": 0.1})
    summary = run_byod(cfg)
    sft = f"{run}/sft/model"
    expected = [
        ("import", {"data": str(tmp_path / "prefs.jsonl"), "out": f"{run}/pairs",
                    "tokenizer": model}),
        ("sft", {"model": model, "from_pairs": f"{run}/pairs", "out": f"{run}/sft",
                 "max_steps": 4, "too_long": "drop"}),
        ("precompute", {"pairs": f"{run}/pairs", "model": sft, "out": f"{run}/precompute",
                        "cache_dir": str(tmp_path / "c")}),
        ("train", {"model": sft, "data": f"{run}/precompute", "out": f"{run}/train",
                   "beta": 0.1}),
    ]
    assert [step for step, _ in calls] == [step for step, _ in expected]
    assert [(step, {k: getattr(c, k) for k in want}) for (step, c), (_, want)
            in zip(calls, expected, strict=True)] == expected
    assert summary["train"]["model"] == f"{run}/train/model"
    assert json.loads((tmp_path / "run" / "byod_summary.json").read_text())["run_dir"] == run

    first = list(calls)
    calls.clear()
    run_byod(dataclasses.replace(cfg, train={"beta": 0.5},
                                 sft={"max_steps": 4, "too_long": "error"}))
    for (step, again), (_, before) in zip(calls, first, strict=True):
        changed = {"train": {"beta": 0.5}, "sft": {"too_long": "error"}}.get(step, {})
        assert again == dataclasses.replace(before, **changed), step


def test_byod_toy_model(tmp_path, monkeypatch):
    """`toy_model:` instead of `model:`: the toy is made in the run dir and is the model."""
    from conftest import stub_steps

    from jobs.byod import BYODConfig, run_byod

    calls = stub_steps(monkeypatch)
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    run_byod(BYODConfig(run_dir=str(tmp_path / "run"), data=str(tmp_path / "prefs.jsonl"),
                        toy_model={}, train={"beta": 0.1}))
    toy = str(tmp_path / "run" / "toy")
    assert [(step, getattr(c, "tokenizer", None) or c.model) for step, c in calls[:2]] == [
        ("import", toy), ("sft", toy)]
    assert json.loads((tmp_path / "run" / "toy" / "config.json").read_text())["model_type"] == \
        "llama"


# ---------------------------------------------------------------- the whole path (Ray)


def _addition_prefs(n: int, seed: int) -> list[dict]:
    """Conversational addition preferences "made by another model": chosen the right sum,
    rejected a near miss; some prompts carry a system turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt = [user(f"{a}+{b}=")]
        if i % 4 == 0:
            prompt = [{"role": "system", "content": "add"}, *prompt]
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append({"prompt": prompt, "chosen": [assistant(str(a + b))],
                     "rejected": [assistant(str(wrong))]})
    return rows


def _chosen_logps(model_dir, tok, rows) -> list[float]:
    """Summed log-prob of each chosen completion: a plain forward on the template's ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for r in rows:
            p, c = _template_ids(tok, r["prompt"], r["chosen"])
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(),
                                         -1)
            out.append(float(sum(logprobs[len(p) + j - 1, t] for j, t in enumerate(c))))
    return out


LONG = "1+" * 40 + "1="  # with the template's "Q:" and " A:", longer than the 64-token context


@pytest.fixture(scope="module")
def byod_run(ray_local, chat_toy, tmp_path_factory):
    """One real `odpo byod --config`: 256 conversational preference rows (plus one identical
    pair and one too long for the context) -> import -> SFT on chosen (40 steps) -> precompute
    with the SFT model -> 8 DPO steps; then the same command again."""
    import yaml

    root = tmp_path_factory.mktemp("byod")
    rows = _addition_prefs(256, seed=0)
    rows.append({"prompt": [user("1+1=")], "chosen": [assistant("2")],
                 "rejected": [assistant("2")]})  # identical: dropped at import, counted
    rows.append({"prompt": [user(LONG)], "chosen": [assistant("41")],
                 "rejected": [assistant("40")]})  # too long: SFT drops it, precompute cuts it
    config = {
        "run_dir": str(root / "run"), "data": str(_write_jsonl(root / "prefs.jsonl", rows)),
        "model": str(chat_toy),
        "sft": {"max_steps": 40, "batch_size": 32, "lr": 3e-3, "lr_schedule": "constant",
                "warmup_steps": 5, "log_every": 10},
        "precompute": {"cache_dir": str(root / "cache")},
        "train": {"beta": 0.1, "lr": 5e-4, "lr_schedule": "constant", "epochs": 1,
                  "batch_size": 32, "log_every": 1},
    }
    path = root / "byod.yaml"
    path.write_text(yaml.safe_dump(config))
    rc, printed, weights = [], [], []
    for _ in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc.append(main(["byod", "--config", str(path)]))
        printed.append(out.getvalue())
        weights.append((root / "run" / "train" / "model" / "model.safetensors").read_bytes())
    return {"run": root / "run", "rows": rows, "rc": rc, "printed": printed, "weights": weights}


def test_byod_sft_on_chosen_precompute_and_train(byod_run, chat_toy, chat_tok):
    run, rows = byod_run["run"], byod_run["rows"]
    assert byod_run["rc"] == [0, 0]
    assert [read_manifest(run / d)["stage"] for d in ("pairs", "precompute")] == [
        "import", "precompute"]
    assert read_manifest(run / "pairs")["dropped"] == {"identical": 1}
    # SFT on chosen (each distinct prompt + chosen once): the over-long row left out and
    # counted, the others trained on.
    distinct = len({json.dumps([r["prompt"], r["chosen"]]) for r in rows[:256]})
    sft = json.loads((run / "sft" / "sft_summary.json").read_text())
    assert (sft["rows_in"], sft["rows"], sft["dropped"]) == (distinct + 1, distinct,
                                                             {"too_long": 1})
    assert f"{distinct} rows (1 too long, dropped)" in byod_run["printed"][0]
    # The reference is the SFT model; the over-long pair is cut (TRL's rule), not dropped.
    ref = read_manifest(run / "precompute")
    assert ref["config"]["model"] == str(run / "sft" / "model")
    assert ref["rows_out"] == 257 and ref["stats"]["truncated_pairs"] == 1
    kept = rows[:256]
    shards = _pairs(run / "precompute")
    assert [json.loads(s["prompt_messages"]) for s in shards] == [r["prompt"] for r in
                                                                   rows[:256] + rows[257:]]
    # The stage's reference log-probs are the SFT model's, on the template's exact tokens.
    sft_logps = _chosen_logps(run / "sft" / "model", chat_tok, kept)
    assert [s["ref_chosen_logps"] for s in shards[:256]] == pytest.approx(sft_logps, abs=1e-4)
    # SFT on chosen raised the chosen responses' log-prob (the point of the step).
    base_logps = _chosen_logps(chat_toy, chat_tok, kept)
    rise = sum(sft_logps) / len(kept) - sum(base_logps) / len(kept)
    assert rise > 1.0
    assert sum(s > b for s, b in zip(sft_logps, base_logps, strict=True)) > 0.9 * len(kept)
    # The policy starts at the reference: the step-0 DPO loss is ln 2.
    metrics = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0
    assert abs(metrics[0]["dpo_loss"] - math.log(2)) < 1e-5
    assert json.loads((run / "train" / "train_summary.json").read_text())["steps"] == 257 // 32


def test_byod_rerun_skips_every_step(byod_run):
    out = byod_run["printed"][1]
    assert "import:" in out and "skipped: up to date" in out
    assert "sft on chosen: skipped" in out and "train: skipped" in out
    assert "cache hit" in out
    assert byod_run["weights"][1] == byod_run["weights"][0]
