"""`odpo pair`: pairing rules against hand-derived pairs, then the stage on real Ray Data."""

import glob
import hashlib
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.pair import make_pairs


def _rows(responses, scores, prompt_id="p"):
    return [{"prompt_id": prompt_id, "response": r, "sample_index": i, "score": s}
            for i, (r, s) in enumerate(zip(responses, scores, strict=True))]


def _idx(pairs):
    return [(c["sample_index"], r["sample_index"]) for c, r in pairs]


# ---------------------------------------------------------------- pure rules, no Ray


def test_best_worst_picks_extremes_and_breaks_ties_by_sample_index():
    rows = _rows(["a", "b", "c", "d"], [0.2, 0.9, 0.2, 0.9])
    pairs, reason = make_pairs(rows, mode="best_worst")
    assert reason == "" and _idx(pairs) == [(1, 0)]
    assert (pairs[0][0]["score"], pairs[0][1]["score"]) == (0.9, 0.2)


def test_best_worst_tie_and_margin_are_dropped_with_reasons():
    assert make_pairs(_rows(["a", "b", "c"], [0.5, 0.5, 0.5]), mode="best_worst") == ([], "tie")
    rows = _rows(["a", "b"], [0.25, 0.75])  # margin 0.5, exact in binary
    assert make_pairs(rows, mode="best_worst", min_margin=0.75) == ([], "below_margin")
    assert _idx(make_pairs(rows, mode="best_worst", min_margin=0.5)[0]) == [(1, 0)]


def test_correct_incorrect_all_pairs_of_distinct_responses():
    # "5" is correct twice (one distinct response, index 0); "4" twice, "3" once: 2 pairs.
    rows = _rows(["4", "5", "3", "5", "4"], [0.0, 1.0, 0.0, 1.0, 0.0])
    pairs, reason = make_pairs(rows, mode="correct_incorrect", max_pairs_per_prompt=0)
    assert reason == "" and _idx(pairs) == [(1, 0), (1, 2)]
    assert [(c["response"], r["response"]) for c, r in pairs] == [("5", "4"), ("5", "3")]


def test_correct_incorrect_reasons():
    kw = {"mode": "correct_incorrect"}
    assert make_pairs(_rows(["1", "2"], [0.0, 0.0]), **kw) == ([], "no_correct")
    assert make_pairs(_rows(["1", "2"], [1.0, 1.0]), **kw) == ([], "no_incorrect")
    rows = _rows(["a", "b"], [0.75, 0.25])  # correct (>= 0.5) and incorrect, margin 0.5
    assert make_pairs(rows, min_margin=0.75, **kw) == ([], "below_margin")
    assert _idx(make_pairs(rows, min_margin=0.5, **kw)[0]) == [(0, 1)]
    rows = _rows(["a", "b"], [0.9, 0.8])
    assert make_pairs(rows, correct_threshold=0.85, **kw)[1] == ""
    assert make_pairs(rows, correct_threshold=0.95, **kw) == ([], "no_correct")


def test_correct_incorrect_cap_is_a_seeded_subset():
    rows = _rows(["c1", "c2", "w1", "w2", "w3"], [1, 1, 0, 0, 0])
    every = set(_idx(make_pairs(rows, mode="correct_incorrect", max_pairs_per_prompt=0)[0]))
    assert every == {(c, w) for c in (0, 1) for w in (2, 3, 4)}
    capped = _idx(make_pairs(rows, mode="correct_incorrect", max_pairs_per_prompt=4, seed=7)[0])
    assert len(capped) == len(set(capped)) == 4 and set(capped) <= every
    assert capped == sorted(capped)
    again = _idx(make_pairs(rows, mode="correct_incorrect", max_pairs_per_prompt=4, seed=7)[0])
    assert again == capped
    seeds = {tuple(_idx(make_pairs(rows, mode="correct_incorrect", max_pairs_per_prompt=4,
                                   seed=s)[0])) for s in range(20)}
    assert len(seeds) > 1  # the seed does choose


def test_pairs_carry_the_sampled_token_ids():
    """Chosen and rejected keep their samples' `response_token_ids` (the ids training uses)."""
    from pipeline.pair import PairConfig, output_schema, pair_group

    rows = _rows(["12", "3", "45"], [0.0, 1.0, 0.5])
    token_ids = [[5, 6, 2], [7, 1, 2], [8, 9]]  # a BOS inside one; a cut one without EOS
    for r, ids in zip(rows, token_ids, strict=True):
        r.update(prompt="1+2=", finish_reason="stop", response_token_ids=ids)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("prompt_id", pa.string()), ("response", pa.string()), ("sample_index", pa.int64()),
        ("score", pa.float64()), ("prompt", pa.string()), ("finish_reason", pa.string()),
        ("response_token_ids", pa.list_(pa.int32()))]))
    schema = output_schema(table.schema)
    assert schema.field("chosen_token_ids").type == pa.list_(pa.int32())
    assert "response_token_ids" not in schema.names and "finish_reason" not in schema.names
    got = pair_group(table, cfg=PairConfig(scored="x", out="y"), schema=schema).to_pylist()
    assert [(g["chosen"], g["rejected"]) for g in got] == [("3", "12")]
    assert (got[0]["chosen_token_ids"], got[0]["rejected_token_ids"]) == ([7, 1, 2], [5, 6, 2])
    # Scored data without ids (a user's Parquet): no id columns, as before.
    plain = table.drop_columns(["response_token_ids"])
    assert "chosen_token_ids" not in output_schema(plain.schema).names


# ---------------------------------------------------------------- the stage on Ray Data

# Five prompts, hand-derived outcome under correct_incorrect (threshold 0.5, cap 0):
#   p0: correct "3" x2, wrong "4", "5"   -> pairs ("3","4"), ("3","5")
#   p1: all wrong                          -> no_correct
#   p2: all correct                        -> no_incorrect
#   p3: correct "7", wrong "8"             -> pair ("7","8")
#   p4: correct "9", wrong "0"             -> pair ("9","0")
GROUPS = {
    "0+3=": (["3", "4", "3", "5"], [1, 0, 1, 0]),
    "0+1=": (["2", "3"], [0, 0]),
    "1+1=": (["2", "2", "2"], [1, 1, 1]),
    "3+4=": (["8", "7"], [0, 1]),
    "4+5=": (["9", "0"], [1, 0]),
}


@pytest.fixture
def scored_file(tmp_path):
    rows = []
    for prompt, (responses, scores) in GROUPS.items():
        pid = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        for i, (r, s) in enumerate(zip(responses, scores, strict=True)):
            rows.append({"prompt_id": pid, "prompt": prompt, "response": r, "sample_index": i,
                         "answer": str(eval(prompt[:-1])), "score": float(s)})
    rows.reverse()  # grouping must not depend on row order
    path = tmp_path / "scored.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_pair_stage_counts_and_trl_format(ray_local, scored_file, tmp_path):
    import datasets

    out = tmp_path / "pairs"
    assert main(["pair", "--scored", str(scored_file), "--out", str(out), "--mode",
                 "correct_incorrect", "--max-pairs-per-prompt", "0", "--round", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "pair"
    assert (m["rows_in"], m["rows_kept"], m["rows_out"]) == (5, 3, 4)
    assert m["dropped"] == {"no_correct": 1, "no_incorrect": 1}
    assert m["rows_in"] == m["rows_kept"] + sum(m["dropped"].values())
    assert m["stats"]["samples_in"] == 13
    for f in m["files"]:
        assert hashlib.sha256((out / f["name"]).read_bytes()).hexdigest() == f["sha256"]

    files = sorted(glob.glob(str(out / "*.parquet")))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    got = sorted((r["prompt"], r["chosen"], r["rejected"], r["chosen_score"],
                  r["rejected_score"], r["round"], r["answer"]) for r in ds)
    assert got == sorted([
        ("0+3=", "3", "4", 1.0, 0.0, 2, "3"), ("0+3=", "3", "5", 1.0, 0.0, 2, "3"),
        ("3+4=", "7", "8", 1.0, 0.0, 2, "7"), ("4+5=", "9", "0", 1.0, 0.0, 2, "9"),
    ])
    assert ds.features["chosen"].dtype == "string"
    assert ds.features["chosen_score"].dtype == "float64"
    ids = [r["prompt_id"] for r in ds]
    assert ids == sorted(ids)  # rows ordered by prompt

    # Unchanged input and config: skipped, files untouched.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(["pair", "--scored", str(scored_file), "--out", str(out), "--mode",
                 "correct_incorrect", "--max-pairs-per-prompt", "0", "--round", "2"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    # A changed config redoes it: best_worst gives one pair per prompt with distinct scores.
    assert main(["pair", "--scored", str(scored_file), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows_in"], m["rows_kept"], m["rows_out"]) == (5, 3, 3)
    assert m["dropped"] == {"tie": 2}


@pytest.mark.slow
def test_pair_refuses_bad_input(ray_local, scored_file, tmp_path, capsys):
    # A non-finite score names the row.
    t = pq.read_table(scored_file).to_pylist()
    t[3]["score"] = math.nan
    bad = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pylist(t), bad)
    assert main(["pair", "--scored", str(bad), "--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err
    assert f"prompt_id={t[3]['prompt_id']} sample_index={t[3]['sample_index']}" in err
    # Missing column.
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "response": "y"}]), tmp_path / "m.parquet")
    assert main(["pair", "--scored", str(tmp_path / "m.parquet"), "--out",
                 str(tmp_path / "p2")]) == 2
    assert "missing column" in capsys.readouterr().err
    # An output directory that holds another stage's data is left alone.
    other = tmp_path / "other"
    assert main(["pair", "--scored", str(scored_file), "--out", str(other)]) == 0
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["stage"] = "sample"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["pair", "--scored", str(scored_file), "--out", str(other)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert json.loads((other / "manifest.json").read_text())["stage"] == "sample"
    # A bad mode is a one-line error.
    assert main(["pair", "--scored", str(scored_file), "--out", str(tmp_path / "p3"),
                 "--mode", "random"]) == 2
    assert "argument --mode: invalid choice: 'random'" in capsys.readouterr().err


@pytest.mark.slow
def test_three_stages_on_real_vllm(score_run, tmp_path):
    """sample -> score -> pair on the shared real run; pair counts derived here from the
    scored shards independently of the stage."""
    import collections

    out = tmp_path / "pairs"
    assert main(["pair", "--scored", str(score_run), "--out", str(out), "--mode",
                 "correct_incorrect"]) == 0
    rows = pa.concat_tables(
        [pq.read_table(f) for f in sorted(glob.glob(str(score_run / "*.parquet")))]
    ).to_pylist()
    by_prompt = collections.defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    expect_drop = collections.Counter()
    expect_pairs = 0
    for group in by_prompt.values():
        right = {r["response"] for r in group if r["score"] == 1.0}
        wrong = {r["response"] for r in group if r["score"] == 0.0}
        if not right:
            expect_drop["no_correct"] += 1
        elif not wrong:
            expect_drop["no_incorrect"] += 1
        else:
            expect_pairs += min(4, len(right) * len(wrong))
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_in"] == len(by_prompt) == 16
    assert m["dropped"] == dict(expect_drop)
    assert m["rows_out"] == expect_pairs
    assert m["rows_kept"] + sum(m["dropped"].values()) == m["rows_in"]
