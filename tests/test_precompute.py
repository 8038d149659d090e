"""`odpo precompute` against an independent `transformers` forward and hand-derived truncation, and
the cache's promises: an equal key finishes without loading the model, any change recomputes."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import char_ids as _char_ids
from conftest import plain_logp as _plain_logp

from jobs.cli import main
from pipeline.checkpoint import tokenizer_digest, weights_digest
from pipeline.manifest import read_manifest, write_stage
from trainer.precompute import (
    length_batches,
    padding_fraction,
    pair_padding_fraction,
    pair_reference_logps,
    reference_logps,
    tokenize_pairs,
    truncate_pair,
)

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH, MAX_PROMPT = 20, 10  # small enough that the special rows below need cutting


def _wrong(answer: str) -> str:
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)




def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


# ------------------------------------------------------------------ pure functions, no Ray


def test_truncate_pair_rule_by_hand():
    kw = {"max_length": 6, "max_prompt_length": 3, "bos_token_id": 1}
    # Fits (3 + 3 <= 6): untouched.
    assert truncate_pair([1, 10, 11], [20, 2], [21, 22, 2], **kw) == (
        [1, 10, 11], [20, 2], [21, 22, 2], False)
    # Prompt within max_prompt_length: only completions keep their first 6 - 3 tokens.
    assert truncate_pair([1, 10, 11], [20, 21, 22, 23, 2], [30, 2], **kw) == (
        [1, 10, 11], [20, 21, 22], [30, 2], True)
    # Prompt too long: BOS + its last 2 tokens, then completions keep 3.
    assert truncate_pair([1, 10, 11, 12, 13, 14], [20, 2], [30, 31, 32, 2], **kw) == (
        [1, 13, 14], [20, 2], [30, 31, 32], True)
    # No BOS in front: the last 3 prompt tokens.
    assert truncate_pair([10, 11, 12, 13, 14], [20, 2], [30, 31, 32, 2], **kw)[0] == [12, 13, 14]


def test_tokenize_pairs_counts_drops_and_cuts(toy_tokenizer):
    tok = toy_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompts = ["1+2=", "5+5=", "5+6=", "please add: 12+34="]
    chosen = ["3", "10", "1" * 20, "46"]
    rejected = ["4", "10" + "9" * 20, "1" * 21, "47"]
    kw = {"max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT}
    keep, p, c, r, dropped, cut = tokenize_pairs(tok, prompts, chosen, rejected,
                                                 truncation="truncate", **kw)
    assert keep == [0, 1, 3] and dropped == {"too_long": 0, "identical_ids": 1} and cut == 2
    assert p[0] == [bos] + _char_ids(tok, "1+2=") and c[0] == _char_ids(tok, "3") + [eos]
    # Row 1: prompt (5 tokens) fits max_prompt_length; completions keep their first 15.
    assert p[1] == [bos] + _char_ids(tok, "5+5=")
    assert c[1] == _char_ids(tok, "10") + [eos] and r[1] == _char_ids(tok, ("10" + "9" * 20)[:15])
    # Row 3: 19-token prompt -> BOS + last 9 characters.
    assert p[2] == [bos] + _char_ids(tok, "d: 12+34=") and r[2] == _char_ids(tok, "47") + [eos]
    keep, *_, dropped, cut = tokenize_pairs(tok, prompts, chosen, rejected, truncation="drop",
                                            **kw)
    assert keep == [0] and dropped == {"too_long": 3, "identical_ids": 0} and cut == 0


def test_length_batches_and_padding_fraction():
    lengths = [3, 9, 5, 9, 1]
    batches = length_batches(lengths, 2)
    assert [b.tolist() for b in batches] == [[1, 3], [2, 0], [4]]
    # Padded widths 9*2 + 5*2 + 1*1 = 29 positions for 27 tokens.
    assert padding_fraction(lengths, batches) == pytest.approx(1 - 27 / 29)


def test_pair_padding_fraction_by_hand():
    # Pairs (P, C, R): (4, 3, 5) -> 12 shared / 16 padded tokens; (1, 1, 1) -> 3 / 4;
    # (2, 6, 1) -> 9 / 11.
    p, c, r = [4, 1, 2], [3, 1, 6], [5, 1, 1]
    batches = [np.array([0, 2]), np.array([1])]
    # shared_prompt, batch 0: budget 12, pairs of 12 and 9 need 2 rows -> 24 positions for 21;
    # batch 1: one row of 3. Total 27 positions, 24 real.
    assert pair_padding_fraction(p, c, r, batches, "shared_prompt") == pytest.approx(1 - 24 / 27)
    # One batch of budget 12: rows [0] and [2, 1] (9 + 3) -> 24 positions, all real.
    assert pair_padding_fraction(p, c, r, [np.array([0, 1, 2])], "shared_prompt") == 0.0
    # padded, batch 0: 4 rows of max(4 + 5, 2 + 6) = 9 -> 36 for 27; batch 1: 2 rows of 2 for 4.
    assert pair_padding_fraction(p, c, r, batches, "padded") == pytest.approx(1 - 31 / 40)


def test_pair_reference_logps_equal_plain_forward(toy_model_dir, toy_tokenizer):
    """The pair rows' forward, each layout, equals the plain unpadded forward of each sequence;
    `auto` on the toy (sdpa) is the shared prompt."""
    from trainer.loop import resolve_layout

    model = _load(toy_model_dir)
    assert resolve_layout("auto", model) == "shared_prompt"
    rng = np.random.default_rng(1)
    tok = toy_tokenizer
    p, c, r = [], [], []
    for _ in range(16):
        p.append([tok.bos_token_id] + rng.integers(4, 99, rng.integers(2, 30)).tolist())
        c.append(rng.integers(4, 99, rng.integers(1, 30)).tolist() + [tok.eos_token_id])
        r.append(rng.integers(4, 99, rng.integers(1, 30)).tolist() + [tok.eos_token_id])
    plain_c = [_plain_logp(model, *x) for x in zip(p, c, strict=True)]
    plain_r = [_plain_logp(model, *x) for x in zip(p, r, strict=True)]
    for layout in ("shared_prompt", "padded"):
        chosen, rejected = pair_reference_logps(model, p, c, r, tok.pad_token_id, layout)
        assert chosen.dtype == rejected.dtype == np.float64
        np.testing.assert_allclose(chosen, plain_c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rejected, plain_r, rtol=0, atol=1e-5)


def test_reference_logps_equal_plain_forward_any_batching(toy_model_dir, toy_tokenizer):
    """Batch size 1 and one big mixed-length batch both equal the plain unpadded forward."""
    model = _load(toy_model_dir)
    rng = np.random.default_rng(0)
    tok = toy_tokenizer
    prompts, completions = [], []
    for _ in range(40):
        prompts.append([tok.bos_token_id] + rng.integers(4, 99, rng.integers(2, 30)).tolist())
        completions.append(rng.integers(4, 99, rng.integers(1, 30)).tolist() + [tok.eos_token_id])
    plain = np.array([_plain_logp(model, p, c) for p, c in zip(prompts, completions, strict=True)])
    big = reference_logps(model, prompts, completions, tok.pad_token_id)
    one = np.array([reference_logps(model, [p], [c], tok.pad_token_id)[0]
                    for p, c in zip(prompts, completions, strict=True)])
    assert big.dtype == np.float64 and plain.min() < -100  # long sums, where fp32 rounding shows
    np.testing.assert_allclose(big, plain, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one, plain, rtol=0, atol=1e-5)


def test_digests_follow_weights_and_tokenizer(toy_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy_model_dir, model)
    w, t = weights_digest(model), tokenizer_digest(model)
    (model / "README.md").write_text("notes do not change the model")
    assert weights_digest(model) == w and tokenizer_digest(model) == t
    _nudge_one_weight(model)
    assert weights_digest(model) != w and tokenizer_digest(model) == t
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 123
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_digest(model) != t


def _nudge_one_weight(model_dir: Path) -> None:
    """Change one number of the checkpoint: the EOS row of the output head, read by every pair."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"][2, 0] += 0.5  # toy vocab: <pad>=0, <bos>=1, <eos>=2
    save_file(state, path, metadata={"format": "pt"})


# ------------------------------------------------------------------ the stage, on real Ray


def _pair_rows(toy_data_dir):
    rows = pq.read_table(toy_data_dir / "prompts.parquet").slice(0, 24).to_pylist()
    # Rejected answers padded with 0..4 zeros: mixed lengths within one prompt length.
    out = [{"prompt": r["prompt"], "chosen": r["answer"], "answer": r["answer"],
            "rejected": _wrong(r["answer"]) + "0" * (i % 5)} for i, r in enumerate(rows)]
    # Rows that the rule must cut (prompt / rejected) and one that becomes a tie after the cut.
    out += [
        {"prompt": "please add: 12+34=", "chosen": "46", "rejected": "47", "answer": "46"},
        {"prompt": "5+5=", "chosen": "10", "rejected": "10" + "9" * 20, "answer": "10"},
        {"prompt": "5+6=", "chosen": "1" * 20, "rejected": "1" * 21, "answer": "11"},
    ]
    for i, r in enumerate(out):
        r.update({"prompt_id": f"p{i:03d}", "chosen_score": 1.0, "rejected_score": 0.0, "round": 0})
    return out


@pytest.fixture(scope="module")
def pairs_dir(toy_data_dir, tmp_path_factory):
    rows = _pair_rows(toy_data_dir)
    table = pa.Table.from_pylist(rows)
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    write_stage(out, "pair", {"test": True}, {}, lambda d: pq.write_table(
        table, d / "part-00000.parquet"), rows_in=len(rows), dropped={})
    return out


def _args(pairs, model, out, cache, *extra):
    return ["precompute", "--pairs", str(pairs), "--model", str(model), "--out", str(out),
            "--cache-dir", str(cache), "--max-length", str(MAX_LENGTH), "--max-prompt-length",
            str(MAX_PROMPT), *extra]


@pytest.fixture(scope="module")
def computed(ray_local, pairs_dir, toy_model_dir, tmp_path_factory):
    """One real run: one big mixed-length batch of all 52 sequences."""
    root = tmp_path_factory.mktemp("precompute")
    out, cache = root / "out", root / "cache"
    assert main(_args(pairs_dir, toy_model_dir, out, cache, "--batch-size", "64")) == 0
    return {"out": out, "cache": cache, "root": root}


def _read(out):
    return pq.read_table(sorted(Path(out).glob("*.parquet"))).to_pylist()


@pytest.mark.slow
def test_stage_values_ids_and_manifest(computed, toy_model_dir, toy_tokenizer, toy_data_dir):
    tok = toy_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    manifest = read_manifest(computed["out"])
    assert manifest["stage"] == "precompute" and manifest["rows_in"] == 27
    assert manifest["rows_out"] == 26 and manifest["dropped"] == {"identical_ids": 1}
    assert manifest["stats"]["truncated_pairs"] == 2
    assert manifest["stats"]["layout"] == "shared_prompt"  # auto, on the toy's sdpa
    # auto sizing, no cluster named: one reference copy with every CPU this process may use
    assert (manifest["stats"]["replicas"], manifest["stats"]["torch_threads"]) == (
        1, len(os.sched_getaffinity(0)))
    schema = pq.read_schema(sorted(computed["out"].glob("*.parquet"))[0])
    for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert schema.field(c).type == pa.list_(pa.int32())
    for c in ("ref_chosen_logps", "ref_rejected_logps"):
        assert schema.field(c).type == pa.float64()
    for c in ("chosen_num_tokens", "rejected_num_tokens"):
        assert schema.field(c).type == pa.int32()

    rows = _read(computed["out"])
    for r in rows:  # the completion tokens behind each sum (truncated completions included)
        assert r["chosen_num_tokens"] == len(r["chosen_input_ids"]) > 0
        assert r["rejected_num_tokens"] == len(r["rejected_input_ids"]) > 0
    expected = _pair_rows(toy_data_dir)[:26]
    assert [r["prompt_id"] for r in rows] == [e["prompt_id"] for e in expected]  # order kept
    for r, e in zip(rows[:24], expected[:24], strict=True):  # fit: plain tokenization, BOS / EOS
        assert r["answer"] == e["answer"] and r["round"] == 0
        assert r["prompt_input_ids"] == [bos] + _char_ids(tok, e["prompt"])
        assert r["chosen_input_ids"] == _char_ids(tok, e["chosen"]) + [eos]
        assert r["rejected_input_ids"] == _char_ids(tok, e["rejected"]) + [eos]
    assert rows[24]["prompt_input_ids"] == [bos] + _char_ids(tok, "d: 12+34=")
    assert rows[25]["rejected_input_ids"] == _char_ids(tok, ("10" + "9" * 20)[:15])

    model = _load(toy_model_dir)
    for r in rows:
        for side in ("chosen", "rejected"):
            plain = _plain_logp(model, r["prompt_input_ids"], r[f"{side}_input_ids"])
            assert r[f"ref_{side}_logps"] == pytest.approx(plain, abs=1e-5)


@pytest.mark.slow
def test_shared_prompt_stage_equals_padded_stage_and_counts_each_prompt_once(
        ray_local, pairs_dir, toy_model_dir, tmp_path):
    """Both layouts forced, nothing reused (no store, new outputs), several batches each: the
    same values to float32 rounding, each equal to the plain forward; the manifest counts the
    positions each computed, the prompt once per pair in the shared layout."""
    runs = {}
    for layout in ("shared_prompt", "padded"):
        out = tmp_path / layout
        assert main(_args(pairs_dir, toy_model_dir, out, "", "--batch-size", "8",
                          "--layout", layout)) == 0
        runs[layout] = (read_manifest(out), _read(out))
    (m_shared, shared), (m_padded, padded) = runs["shared_prompt"], runs["padded"]
    assert m_shared["source"] == m_padded["source"] == "computed"
    assert m_shared["stats"]["layout"] == "shared_prompt"
    assert m_padded["stats"]["layout"] == "padded"
    for side in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose([r[side] for r in shared], [r[side] for r in padded],
                                   rtol=0, atol=1e-5)
    model = _load(toy_model_dir)
    for r in shared:
        for side in ("chosen", "rejected"):
            plain = _plain_logp(model, r["prompt_input_ids"], r[f"{side}_input_ids"])
            assert r[f"ref_{side}_logps"] == pytest.approx(plain, abs=1e-5)
    p, c, r = ([len(row[f"{k}_input_ids"]) for row in shared]
               for k in ("prompt", "chosen", "rejected"))
    once = sum(p) + sum(c) + sum(r)
    assert m_shared["stats"]["tokens"] == once
    assert m_padded["stats"]["tokens"] == once + sum(p)  # each prompt twice
    assert m_shared["stats"]["sequences"] == m_padded["stats"]["sequences"] == 2 * len(shared)
    # Same key: the layouts' outputs serve each other (module docstring, cache key comment).
    assert m_shared["cache_key"] == m_padded["cache_key"]


@pytest.mark.slow
def test_batch_size_one_equals_big_batch(computed, pairs_dir, toy_model_dir):
    out = computed["root"] / "bs1"
    assert main(_args(pairs_dir, toy_model_dir, out, computed["cache"], "--batch-size", "1",
                      "--replicas", "2", "--cache", "recompute")) == 0
    big, one = _read(computed["out"]), _read(out)
    # set replicas win; the machine's CPUs are shared out between them
    stats = read_manifest(out)["stats"]
    assert (stats["replicas"], stats["torch_threads"]) == (
        2, max(1, len(os.sched_getaffinity(0)) // 2))
    for side in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose([r[side] for r in one], [r[side] for r in big], atol=1e-5)


def _run_isolated(*argvs) -> dict:
    """`odpo` commands, one after the other in one fresh interpreter: each one's exit code and
    output, and what that process loaded. A model is loaded either here, which imports its
    `transformers` modeling module, or in a Ray actor, which needs this process to start Ray
    (the CLI's embedded default): both are observed after the last command."""
    code = (
        "import contextlib, io, json, sys\n"
        "from jobs.cli import main\n"
        "runs = []\n"
        f"for argv in {list(argvs)!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        rc = main(argv)\n"
        "    runs.append({'rc': rc, 'out': out.getvalue()})\n"
        "import ray\n"
        "mods = [m for m in sys.modules if m.startswith('transformers.models.')"
        " and '.modeling_' in m]\n"
        "print('RESULT ' + json.dumps({'runs': runs, 'ray': ray.is_initialized(),"
        " 'modeling': mods}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_equal_key_finishes_without_loading_the_model(computed, pairs_dir, toy_model_dir):
    """The same command again, then a beta sweep (each run asks for its own output dir, which
    the store fills): every one a cache hit, in a process that neither starts Ray nor imports
    a model."""
    key = read_manifest(computed["out"])["cache_key"]
    stored = (computed["cache"] / key / "part-00000.parquet").read_bytes()
    sweep = [computed["root"] / f"sweep-beta{beta}" for beta in ("0.1", "0.3")]
    r = _run_isolated(_args(pairs_dir, toy_model_dir, computed["out"], computed["cache"]),
                      *(_args(pairs_dir, toy_model_dir, out, computed["cache"],
                              "--cache", "require") for out in sweep))
    assert [(run["rc"], "cache hit" in run["out"]) for run in r["runs"]] == [(0, True)] * 3, r
    assert not r["ray"] and r["modeling"] == [], r
    for out in sweep:
        assert (out / "part-00000.parquet").read_bytes() == stored
        assert read_manifest(out)["cache_key"] == key


@pytest.mark.slow
@pytest.mark.parametrize("change", [
    ["--dtype", "bfloat16"],
    ["--max-length", "24"],
    ["--max-prompt-length", "8"],
    ["--truncation", "drop"],
    "tokenizer",
    "pairs",
])
def test_any_key_change_misses_under_require(computed, pairs_dir, toy_model_dir, tmp_path,
                                             capsys, change):
    pairs, extra = pairs_dir, list(change) if isinstance(change, list) else []
    if change == "tokenizer":
        tok_dir = tmp_path / "tok"
        shutil.copytree(toy_model_dir, tok_dir)
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        cfg["model_max_length"] = 99
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
        extra = ["--tokenizer", str(tok_dir)]
    if change == "pairs":
        rows = _read(pairs_dir)
        rows[0]["chosen_score"] = 0.9  # any content change, even in a passthrough column
        pairs = tmp_path / "pairs"
        table = pa.Table.from_pylist(rows)
        write_stage(pairs, "pair", {}, {}, lambda d: pq.write_table(
            table, d / "part-00000.parquet"), rows_in=len(rows), dropped={})
    capsys.readouterr()
    rc = main(_args(pairs, toy_model_dir, computed["out"], computed["cache"], *extra,
                    "--cache", "require"))
    err = capsys.readouterr().err
    assert rc == 2 and "reference cache miss" in err and err.count("\n") == 1, err
    assert read_manifest(computed["out"])["stage"] == "precompute"  # left as it was


@pytest.mark.slow
def test_one_changed_weight_recomputes(computed, pairs_dir, toy_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(toy_model_dir, model_dir)
    _nudge_one_weight(model_dir)
    out = tmp_path / "out"
    shutil.copytree(computed["out"], out)  # holds the old model's values under the old key
    assert main(_args(pairs_dir, model_dir, out, computed["cache"])) == 0
    manifest = read_manifest(out)
    assert manifest["source"] == "computed"
    assert manifest["cache_key"] != read_manifest(computed["out"])["cache_key"]
    old, new = _read(computed["out"]), _read(out)
    model = _load(model_dir)
    for r in new:
        plain = _plain_logp(model, r["prompt_input_ids"], r["chosen_input_ids"])
        assert r["ref_chosen_logps"] == pytest.approx(plain, abs=1e-5)
    moved = [abs(r["ref_chosen_logps"] - o["ref_chosen_logps"])
             for o, r in zip(old, new, strict=True)]
    assert max(moved) > 1e-2  # the old values were not kept


@pytest.mark.slow
def test_unloadable_model_fails_fast_with_its_error(ray_local, pairs_dir, toy_model_dir, tmp_path,
                                                    capsys):
    model_dir = tmp_path / "broken"
    shutil.copytree(toy_model_dir, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    rc = main(_args(pairs_dir, model_dir, tmp_path / "out", tmp_path / "cache"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load" in err and "SafetensorError" in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_wrong_inputs_and_outputs(pairs_dir, toy_model_dir, tmp_path, capsys):
    other = tmp_path / "samples"
    write_stage(other, "sample", {}, {}, lambda d: pq.write_table(
        pa.table({"prompt": ["1+1="]}), d / "part-00000.parquet"), rows_in=1, dropped={})
    for argv, msg in (
        (_args(other, toy_model_dir, tmp_path / "o1", tmp_path / "c"), "holds 'sample' output"),
        (_args(pairs_dir, toy_model_dir, other, tmp_path / "c"), "refusing to overwrite"),
        (_args(pairs_dir, tmp_path / "nope", tmp_path / "o2", tmp_path / "c"), "no such dir"),
        (_args(pairs_dir, toy_model_dir, tmp_path / "o3", tmp_path / "c", "--max-length", "99"),
         "exceeds the model's context of 64"),
        (_args(pairs_dir, toy_model_dir, tmp_path / "o4", tmp_path / "c", "--dtype", "fp8"),
         "--dtype: invalid choice: 'fp8'"),
        (_args(pairs_dir, toy_model_dir, tmp_path / "o5", tmp_path / "c", "--layout", "packed"),
         "--layout: invalid choice: 'packed'"),
    ):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_trainer_reads_the_shards_and_starts_at_ln2(computed, toy_model_dir, toy_tokenizer):
    """The trainer's own step on the stored ids, with policy == reference: every logit is 0."""
    from trainer.dpo import read_precompute_stage
    from trainer.loop import dpo_step_loss

    read_precompute_stage(str(computed["out"]))
    table = pq.read_table(sorted(computed["out"].glob("*.parquet")))
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 0.0}
    loss, metrics = dpo_step_loss(_load(toy_model_dir), batch, toy_tokenizer.pad_token_id, cfg)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_no_logps_tokenizes_only_for_reference_free_losses(computed, pairs_dir, toy_model_dir,
                                                           toy_tokenizer, tmp_path):
    """`--no-logps`: the same ids and counts as the full stage, no reference log-probs and no
    reference forward; simpo trains on them to the loss it gets from the full stage's shards
    (where it ignores the reference columns), and a reference-based loss is refused them."""
    from pipeline.errors import UserError
    from trainer.dpo import read_precompute_stage
    from trainer.loop import dpo_step_loss

    out = tmp_path / "ids"
    assert main(_args(pairs_dir, toy_model_dir, out, tmp_path / "cache", "--no-logps")) == 0
    manifest = read_manifest(out)
    assert manifest["config"]["logps"] is False and "forward_s" in manifest["stats"]
    ids, full = _read(out), _read(computed["out"])
    keep = ("prompt_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
            "chosen_num_tokens", "rejected_num_tokens")
    assert [{k: r[k] for k in keep} for r in ids] == [{k: r[k] for k in keep} for r in full]
    assert not any(k.startswith("ref_") for k in ids[0])

    read_precompute_stage(str(out), "simpo")
    with pytest.raises(UserError, match=r"precomputed without reference log-probs \(--no-logps"):
        read_precompute_stage(str(out), "sigmoid")
    cfg = {"beta": 2.0, "loss_type": "simpo", "label_smoothing": 0.0, "alpha": 0.0}
    model = _load(toy_model_dir)
    losses = []
    for d in (out, computed["out"]):
        table = pq.read_table(sorted(Path(d).glob("*.parquet")))
        batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        losses.append(dpo_step_loss(model, batch, toy_tokenizer.pad_token_id, cfg)[0].item())
    assert losses[0] == losses[1] and math.isfinite(losses[0])
