"""Sampled token ids, not re-tokenized text (issue 15, item 6): `odpo sample` stores the ids vLLM
generated, responses cut at `max_tokens` are dropped (or kept without an EOS), and `odpo
precompute` trains on exactly the stored ids; a prompt the tokenizer cannot encode is dropped.
Checked against vLLM itself, the tokenizer and an independent `transformers` forward."""

import glob
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import char_ids as _char_ids
from conftest import plain_logp as _plain_logp

from jobs.cli import main
from pipeline.manifest import read_manifest, write_stage

REPO = Path(__file__).resolve().parents[1]
EMOJI = "\U0001F600"


def _table(stage_dir):
    return pa.concat_tables(
        [pq.read_table(f) for f in sorted(glob.glob(str(Path(stage_dir) / "*.parquet")))]
    )




# ------------------------------------------------------------------ pure functions, no Ray


def test_emoji_prompt_is_unencodable(toy_model_dir, toy_tokenizer):
    from pipeline.sample import check_prompts

    # The toy's character tokenizer maps the emoji to <unk>: vLLM would sample "5+5=<unk>".
    assert toy_tokenizer.unk_token_id in toy_tokenizer("5+5=" + EMOJI)["input_ids"]
    table = pa.table({"prompt": ["5+5=", "5+5=" + EMOJI, "", EMOJI * 70]})
    got = check_prompts(table, model=toy_model_dir, max_model_len=64)
    assert got["drop_reason"].to_pylist() == [
        "", "unencodable_prompt", "empty_prompt", "unencodable_prompt"]


def test_unencodable_without_unk_token_is_a_failed_round_trip():
    """A tokenizer without an unk token that silently loses a character (here a normalizer that
    strips non-ASCII) is caught by decoding back."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.sample import unencodable

    vocab = {c: i for i, c in enumerate(chr(c) for c in range(32, 127))}
    tok = Tokenizer(models.WordLevel(vocab=vocab))  # no unk_token
    tok.normalizer = normalizers.Replace(Regex("[^ -~]"), "")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=True)
    assert hf.unk_token_id is None
    texts = ["1 , 2", "caf" + "\u00e9", "a" + EMOJI]
    assert unencodable(hf, texts) == [False, True, True]


def test_expand_samples_stores_the_generated_ids():
    from pipeline.sample import expand_samples

    table = pa.table({"prompt_id": ["a"], "prompt": ["1+1="], "num_prompt_tokens": [5]})
    out = SimpleNamespace(prompt_token_ids=[1, 21, 15, 21, 33], outputs=[
        SimpleNamespace(text="2", token_ids=[22, 2], finish_reason="stop"),
        SimpleNamespace(text="22", token_ids=[22, 1, 22], finish_reason="length"),
    ])
    t = expand_samples(table, [out], 2)
    assert t["response_token_ids"].type == pa.list_(pa.int32())
    assert t["response_token_ids"].to_pylist() == [[22, 2], [22, 1, 22]]
    assert t["num_response_tokens"].to_pylist() == [2, 3]
    # vLLM's prompt ids are what the precompute stage will rebuild from the text: checked.
    with pytest.raises(Exception, match="tokenized the prompt"):
        expand_samples(table, [out], 2, prompt_token_ids=[[1, 21, 15, 21]])


def test_tokenize_pairs_uses_stored_ids_as_they_are(toy_tokenizer):
    from trainer.precompute import tokenize_pairs

    tok = toy_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    chosen_ids = [[bos, 20, 21], list(range(4, 40))]  # a BOS the text cannot show; a long one
    rejected_ids = [[22, eos], [23, eos]]
    keep, p, c, r, dropped, cut = tokenize_pairs(
        tok, ["1+2=", "5+5="], ["ignored", "ignored"], ["x", "y"], max_length=20,
        max_prompt_length=10, truncation="truncate", chosen_token_ids=chosen_ids,
        rejected_token_ids=rejected_ids, vocab_size=len(tok))
    assert keep == [0, 1] and cut == 1 and dropped == {"too_long": 0, "identical_ids": 0}
    assert p == [[bos] + _char_ids(tok, "1+2="), [bos] + _char_ids(tok, "5+5=")]
    assert c == [[bos, 20, 21], list(range(4, 19))] and r == rejected_ids  # cut to 20 - 5
    with pytest.raises(Exception, match="beyond the model's vocab_size"):
        tokenize_pairs(tok, ["1"], ["a"], ["b"], max_length=20, max_prompt_length=10,
                       truncation="truncate", chosen_token_ids=[[len(tok)]],
                       rejected_token_ids=[[4]], vocab_size=len(tok))


# ------------------------------------------------------------------ sample_run against vLLM

VLLM_SCRIPT = """
import hashlib, json, os, sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
from vllm import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    # vLLM's own KV cache sizing (0.1 of memory), where the stage's engine sized it to the
    # toy's need (engine.kv_cache_bytes): the samples must not depend on it
    llm = LLM(model=model, dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True,
              seed=3, load_format="safetensors", distributed_executor_backend="uni")
    def seed(p):  # the documented per-prompt seed: sha256(f"{run seed}:{prompt}")[:4]
        return int.from_bytes(hashlib.sha256(f"3:{p}".encode()).digest()[:4], "big") & 0x7FFFFFFF
    params = [SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=8, seed=seed(p))
              for p in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    print("RESULT " + json.dumps([
        {"prompt": o.prompt, "prompt_token_ids": list(o.prompt_token_ids),
         "samples": [[list(c.token_ids), c.finish_reason] for c in o.outputs]} for o in outs]))
"""


@pytest.mark.slow
def test_sample_run_stores_the_ids_vllm_generated(sample_run, sft_run, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_run / "model")
    t = _table(sample_run)
    assert t.schema.field("response_token_ids").type == pa.list_(pa.int32())
    rows = t.to_pylist()
    for r in rows:
        ids = r["response_token_ids"]
        assert len(ids) == r["num_response_tokens"] <= 8
        assert tok.decode(ids, skip_special_tokens=True) == r["response"]
        # vLLM keeps the EOS it stopped on; a response cut at max_tokens has none.
        assert (ids[-1] == tok.eos_token_id) == (r["finish_reason"] == "stop")

    # The same requests straight to vLLM, in a fresh process of its own.
    prompts = sorted({r["prompt"] for r in rows})[:4]
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(sft_run / "model"),
                           json.dumps(prompts)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    stored = {(r["prompt"], r["sample_index"]): (r["response_token_ids"], r["finish_reason"])
              for r in rows}
    for o in result:
        # vLLM's prompt ids are the tokenizer's encoding with special tokens (what precompute uses)
        assert o["prompt_token_ids"] == tok(o["prompt"])["input_ids"]
        for j, (ids, finish) in enumerate(o["samples"]):
            assert stored[(o["prompt"], j)] == (ids, finish)


# ------------------------------------------------------------------ truncated samples, end to end

LENGTH_SCORER = "def length(prompts, responses, rows):\n" \
                "    return [float(len(r)) for r in responses]\n"


@pytest.fixture(scope="module")
def short_run(ray_local, sft_run, toy_data_dir, tmp_path_factory):
    """8 addition prompts plus one with an emoji, sampled with max_tokens 4: a 3-digit answer
    and its EOS fit, a 4-digit answer is cut."""
    root = tmp_path_factory.mktemp("short")
    rows = pq.read_table(toy_data_dir / "prompts.parquet").to_pylist()[:8]
    rows.append({"prompt": "12+3=" + EMOJI, "answer": "15"})
    pq.write_table(pa.Table.from_pylist(rows), root / "prompts.parquet")
    assert main(["sample", "--model", str(sft_run / "model"), "--prompts",
                 str(root / "prompts.parquet"), "--out", str(root / "samples"), "--k", "4",
                 "--max-tokens", "4", "--seed", "5"]) == 0
    (root / "length.py").write_text(LENGTH_SCORER)
    return root


@pytest.mark.slow
def test_unencodable_prompt_is_dropped_and_counted(short_run, capsys):
    m = read_manifest(short_run / "samples")
    assert m["dropped"] == {"unencodable_prompt": 1}
    assert (m["rows_in"], m["rows_kept"], m["rows_out"]) == (9, 8, 32)
    assert EMOJI not in "".join(_table(short_run / "samples")["prompt"].to_pylist())


@pytest.mark.slow
def test_truncated_dropped_as_counted_reason_or_kept_without_eos(short_run, toy_tokenizer,
                                                                 sft_run, capsys):
    tok = toy_tokenizer
    samples = _table(short_run / "samples").to_pylist()
    cut = [r for r in samples if r["finish_reason"] == "length"]
    assert cut and len(cut) < len(samples)  # some cut, some stopped: the test can fail
    assert all(r["response_token_ids"][-1] != tok.eos_token_id for r in cut)

    scorer = f"{short_run / 'length.py'}:length"
    out = short_run / "scored"
    capsys.readouterr()
    assert main(["score", "--samples", str(short_run / "samples"), "--out", str(out),
                 "--scorer", scorer]) == 0
    assert f"truncated {len(cut)}" in capsys.readouterr().out  # the CLI line names the reason
    m = read_manifest(out)
    assert (m["rows_in"], m["rows_out"], m["dropped"]) == (32, 32 - len(cut),
                                                           {"truncated": len(cut)})
    assert all(r["finish_reason"] == "stop" for r in _table(out).to_pylist())

    kept = short_run / "scored_all"
    assert main(["score", "--samples", str(short_run / "samples"), "--out", str(kept),
                 "--scorer", scorer, "--keep-truncated"]) == 0
    m = read_manifest(kept)
    assert (m["rows_in"], m["rows_out"], m["dropped"]) == (32, 32, {})
    # Scoring passes the sampled ids through unchanged.
    key = ("prompt_id", "sample_index")
    scored = {tuple(r[k] for k in key): r for r in _table(kept).to_pylist()}
    for r in samples:
        assert scored[tuple(r[k] for k in key)]["response_token_ids"] == r["response_token_ids"]

    # best_worst on length: the longest response is chosen, a cut one where there is one.
    pairs = short_run / "pairs"
    assert main(["pair", "--scored", str(kept), "--out", str(pairs)]) == 0
    pair_rows = _table(pairs).to_pylist()
    by_key = {(r["prompt_id"], r["sample_index"]): r for r in samples}
    cut_keys = {(r["prompt_id"], r["sample_index"]) for r in cut}
    for p in pair_rows:
        for side in ("chosen", "rejected"):
            s = by_key[(p["prompt_id"], p[f"{side}_sample_index"])]
            assert p[f"{side}_token_ids"] == s["response_token_ids"]
    assert any((p["prompt_id"], p["chosen_sample_index"]) in cut_keys for p in pair_rows)

    ref = short_run / "precompute"
    assert main(["precompute", "--pairs", str(pairs), "--model", str(sft_run / "model"),
                 "--out", str(ref), "--cache-dir", str(short_run / "cache")]) == 0
    rows = _table(ref).to_pylist()
    assert len(rows) == len(pair_rows)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_run / "model").eval()
    for r in rows:
        assert r["prompt_input_ids"] == tok(r["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            s = by_key[(r["prompt_id"], r[f"{side}_sample_index"])]
            # Exactly the sampled ids: an EOS only where vLLM stopped on one.
            assert r[f"{side}_input_ids"] == s["response_token_ids"]
            assert (r[f"{side}_input_ids"][-1] == tok.eos_token_id) == (
                s["finish_reason"] == "stop")
            plain = _plain_logp(model, r["prompt_input_ids"], r[f"{side}_input_ids"])
            assert r[f"ref_{side}_logps"] == pytest.approx(plain, abs=1e-5)


# ----------------------------------------------------------------- precompute on stored ids


def _pairs_stage(path, rows, stage="pair", extra=None):
    table = pa.Table.from_pylist(rows)
    write_stage(path, stage, {}, {}, lambda d: pq.write_table(table, d / "part-00000.parquet"),
                rows_in=len(rows), dropped={}, extra=extra)
    return path


@pytest.mark.slow
def test_precompute_uses_stored_ids_not_a_retokenization(ray_local, toy_model_dir, toy_tokenizer,
                                                         tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tok = toy_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # Stored ids that the texts do not tokenize to: a BOS inside the response (decoded text
    # skips it), a cut response without EOS, and ids of other characters altogether.
    stored = [
        (_char_ids(tok, "1") + [bos] + _char_ids(tok, "2") + [eos], _char_ids(tok, "13") + [eos]),
        (_char_ids(tok, "579"), _char_ids(tok, "58") + [eos]),
        (_char_ids(tok, "abc") + [eos], _char_ids(tok, "xyz")),
    ]
    rows = []
    for i, (c, r) in enumerate(stored):
        prompt = f"{i}+{i}="
        rows.append({"prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                     "prompt": prompt, "chosen": "12", "rejected": "13", "chosen_score": 1.0,
                     "rejected_score": 0.0, "round": 0, "chosen_token_ids": c,
                     "rejected_token_ids": r})
    pairs = _pairs_stage(tmp_path / "pairs", rows)
    out = tmp_path / "ref"
    assert main(["precompute", "--pairs", str(pairs), "--model", toy_model_dir, "--out",
                 str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    got = _table(out).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    assert len(got) == 3
    for r, (c, rej) in zip(got, stored, strict=True):
        assert r["prompt_input_ids"] == [bos] + _char_ids(tok, r["prompt"])
        assert (r["chosen_input_ids"], r["rejected_input_ids"]) == (c, rej)
        assert r["ref_chosen_logps"] == pytest.approx(
            _plain_logp(model, r["prompt_input_ids"], c), abs=1e-5)
        assert r["ref_rejected_logps"] == pytest.approx(
            _plain_logp(model, r["prompt_input_ids"], rej), abs=1e-5)

    # Imported preference data keeps the text path (ids in an import are just metadata).
    imported = _pairs_stage(tmp_path / "imported", rows, stage="import")
    out = tmp_path / "ref_imported"
    assert main(["precompute", "--pairs", str(imported), "--model", toy_model_dir, "--out",
                 str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    for r in _table(out).to_pylist():
        assert r["chosen_input_ids"] == _char_ids(tok, "12") + [eos]
        assert r["rejected_input_ids"] == _char_ids(tok, "13") + [eos]

    # Ids sampled with another vocabulary than the reference's tokenizer: refused, one line.
    other = _pairs_stage(tmp_path / "other_vocab", rows, extra={"tokenizer_vocab": "0" * 64})
    capsys.readouterr()
    assert main(["precompute", "--pairs", str(other), "--model", toy_model_dir, "--out",
                 str(tmp_path / "ref_other"), "--cache-dir", str(tmp_path / "cache2")]) == 2
    err = capsys.readouterr().err
    assert "another vocabulary" in err and err.count("\n") == 1, err
    assert not (tmp_path / "ref_other").exists()
