"""`odpo score`: verifier, user function and reward model as Ray Data stages, each checked
against a computation written here."""

import glob
import json
import math
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.errors import UserError
from pipeline.score import score_rows
from pipeline.scorers import exact_answer


def _by_key(rows):
    """Rows by (prompt_id, sample_index): Ray Data does not promise row order."""
    return {(r["prompt_id"], r["sample_index"]): r for r in rows}


def _table(stage_dir):
    return pa.concat_tables(
        [pq.read_table(f) for f in sorted(glob.glob(str(stage_dir / "*.parquet")))]
    )


ROWS = [
    {"prompt_id": "a", "sample_index": 0, "prompt": "1+1=", "response": "2", "answer": "2"},
    {"prompt_id": "a", "sample_index": 1, "prompt": "1+1=", "response": " 2 ", "answer": "2"},
    {"prompt_id": "a", "sample_index": 2, "prompt": "1+1=", "response": "3", "answer": "2"},
]


def test_exact_answer():
    assert exact_answer(["p"] * 3, [r["response"] for r in ROWS], ROWS) == [1.0, 1.0, 0.0]


def test_score_rows_names_the_failing_row_and_checks_the_answer():
    def picky(prompts, responses, rows):
        return [1.0 / (r != "3") for r in responses]  # ZeroDivisionError on "3"

    with pytest.raises(UserError, match=r"scorer 'picky' raised on prompt_id=a sample_index=2: "
                                        r"ZeroDivisionError"):
        score_rows(picky, "picky", ROWS, "error")
    with pytest.raises(UserError, match="returned 2 scores for 3 rows"):
        score_rows(lambda p, r, rows: [1.0, 2.0], "short", ROWS, "error")
    with pytest.raises(UserError, match=r"returned 'x' \(not a number\) for prompt_id=a "
                                        r"sample_index=0"):
        score_rows(lambda p, r, rows: ["x", 1, 2], "text", ROWS, "error")
    nan = lambda p, r, rows: [0.0, math.nan, 1.0]  # noqa: E731
    with pytest.raises(UserError, match=r"returned nan for prompt_id=a sample_index=1.*"
                                        r"--nonfinite drop"):
        score_rows(nan, "nan", ROWS, "error")
    got = score_rows(nan, "nan", ROWS, "drop")
    assert got[0] == 0.0 and math.isnan(got[1]) and got[2] == 1.0


@pytest.mark.slow
def test_verifier_scores(score_run, sample_run):
    m = json.loads((score_run / "manifest.json").read_text())
    assert m["stage"] == "score" and (m["rows_in"], m["rows_out"], m["dropped"]) == (64, 64, {})
    rows = _by_key(_table(score_run).to_pylist())
    samples = _by_key(_table(sample_run).to_pylist())
    assert {k: {c: v for c, v in r.items() if c != "score"} for k, r in rows.items()} == samples
    expect = {k: 1.0 if r["response"].strip() == r["answer"] else 0.0 for k, r in samples.items()}
    assert {k: r["score"] for k, r in rows.items()} == expect
    expect = list(expect.values())
    assert pq.read_schema(sorted(glob.glob(str(score_run / "*.parquet")))[0]).field(
        "score").type == pa.float64()
    assert m["stats"]["mean_score"] == pytest.approx(sum(expect) / len(expect))


SCORER = '''
import math

def length(prompts, responses, rows):
    return [float(len(r)) for r in responses]

def nan_on_one(prompts, responses, rows):
    return [math.nan if row["sample_index"] == 1 else 1.0 for row in rows]

def fails_on(prompts, responses, rows):
    for row in rows:
        if row["prompt"] == TARGET and row["sample_index"] == 2:
            raise KeyError("no such thing")
    return [0.0] * len(rows)
'''


@pytest.mark.slow
def test_user_function_scorers(sample_run, tmp_path, capsys):
    samples = _table(sample_run).to_pylist()
    target = samples[0]
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text(SCORER + f"\nTARGET = {target['prompt']!r}\n")

    out = tmp_path / "len"
    assert main(["score", "--samples", str(sample_run), "--out", str(out),
                 "--scorer", f"{scorer}:length"]) == 0
    assert {k: r["score"] for k, r in _by_key(_table(out).to_pylist()).items()} == {
        k: float(len(r["response"])) for k, r in _by_key(samples).items()}

    # Non-finite: an error naming the row by default, dropped and counted on request.
    assert main(["score", "--samples", str(sample_run), "--out", str(tmp_path / "nan"),
                 "--scorer", f"{scorer}:nan_on_one"]) == 2
    err = capsys.readouterr().err
    assert "returned nan for prompt_id=" in err and "sample_index=1" in err
    assert not (tmp_path / "nan").exists()
    out = tmp_path / "nan_dropped"
    assert main(["score", "--samples", str(sample_run), "--out", str(out),
                 "--scorer", f"{scorer}:nan_on_one", "--nonfinite", "drop"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["dropped"]) == (64, 48, {"nonfinite_score": 16})
    assert all(r["sample_index"] != 1 for r in _table(out).to_pylist())

    # A scorer that raises: the error names the scorer and the row.
    assert main(["score", "--samples", str(sample_run), "--out", str(tmp_path / "raise"),
                 "--scorer", f"{scorer}:fails_on"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"my_scorer.py:fails_on' raised on prompt_id={target['prompt_id']} sample_index=2" \
        in err and "KeyError" in err

    # Import problems are caught before any work.
    assert main(["score", "--samples", str(sample_run), "--out", str(tmp_path / "x"),
                 "--scorer", "no_such_module:fn"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main(["score", "--samples", str(sample_run), "--out", str(tmp_path / "x"),
                 "--scorer", f"{scorer}:nope"]) == 2
    assert "has no callable 'nope'" in capsys.readouterr().err
    # The verifier needs each row's answer.
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "response": "2"}]),
                   tmp_path / "noanswer.parquet")
    assert main(["score", "--samples", str(tmp_path / "noanswer.parquet"), "--out",
                 str(tmp_path / "y"), "--scorer", "exact"]) == 2
    assert "missing column(s) ['answer']" in capsys.readouterr().err


def test_edited_scorer_scores_with_its_new_code(ray_local, tmp_path):
    """Function scorers run as Ray Data tasks in the session's pooled workers, which keep what
    they imported: a scorer file edited between two stages of one driver (a notebook, `odpo
    iterate`) scores the second with its new code, in a worker that loaded the old one."""
    from pipeline.score import ScoreConfig, run_score

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "samples.parquet")
    scorer = tmp_path / "edited.py"
    for i, value in enumerate((1.0, 2.0, 3.0)):
        scorer.write_text(f"def score(prompts, responses, rows):\n"
                          f"    return [{value}] * len(rows)\n")
        out = tmp_path / f"scored{i}"
        run_score(ScoreConfig(samples=str(tmp_path / "samples.parquet"), out=str(out),
                              scorer=f"{scorer}:score"))
        assert _table(out)["score"].to_pylist() == [value] * 3


def test_edited_scorer_module_is_reloaded(tmp_path, monkeypatch):
    """A `module:function` scorer whose module a worker imported before it was edited: the task
    reloads it when its source is not the one the stage was keyed on (the task's function,
    called here in this process as in a worker)."""
    from pipeline.manifest import input_digest
    from pipeline.score import score_batch

    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "odpo_test_edited_scorer.py"
    table = pa.Table.from_pylist(ROWS)
    try:
        # (sizes differ: an edit in the same second at the same size keeps Python's .pyc)
        for value in (1.0, 22.0):
            module.write_text(f"def score(prompts, responses, rows):\n"
                              f"    return [{value}] * len(rows)\n")
            got = score_batch(table, "odpo_test_edited_scorer:score", "error",
                              input_digest(str(module)))
            assert got["score"].to_pylist() == [value] * 3
    finally:
        sys.modules.pop("odpo_test_edited_scorer", None)


@pytest.mark.slow
def test_score_refuses_other_stage_dirs(score_run, sample_run, tmp_path, capsys):
    # Scored data is not samples; an --out holding samples is refused and left intact.
    before = (sample_run / "manifest.json").read_text()
    assert main(["score", "--samples", str(score_run), "--out", str(tmp_path / "z"),
                 "--scorer", "exact"]) == 2
    assert "--samples needs the output of `odpo sample`" in capsys.readouterr().err
    other = tmp_path / "copy_of_samples"
    other.mkdir()
    (other / "manifest.json").write_text(before)
    assert main(["score", "--samples", str(sample_run), "--out", str(other),
                 "--scorer", "exact"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (other / "manifest.json").read_text() == before
    # Unchanged inputs and config: skipped.
    mtime = (score_run / "manifest.json").stat().st_mtime_ns
    assert main(["score", "--samples", str(sample_run), "--out", str(score_run),
                 "--scorer", "exact"]) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert (score_run / "manifest.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def tiny_reward_model(sft_run, tmp_path_factory):
    """A randomly initialised one-label Llama classifier sharing the toy tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(sft_run / "model")
    config.num_labels = 1
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards spread well beyond float noise
    out = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft_run / "model").save_pretrained(out)
    return out


def _reference_rewards(path, texts, keep_last=None):
    """One unpadded sequence at a time: the head applied to the last token's hidden state."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if keep_last is not None:
                ids = ids[-keep_last:]
            ids = [tok.bos_token_id] + ids
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(float(hidden @ model.score.weight[0]))
    return out


@pytest.mark.slow
def test_reward_model_scorer(sample_run, tiny_reward_model, tmp_path, capsys):
    samples = _by_key(_table(sample_run).to_pylist())
    keys = sorted(samples)
    texts = [samples[k]["prompt"] + samples[k]["response"] for k in keys]
    out = tmp_path / "rm"
    # Small batches: padding and batching must not change a score.
    assert main(["score", "--samples", str(sample_run), "--out", str(out), "--scorer",
                 "reward_model", "--reward-model", str(tiny_reward_model), "--batch-size", "24",
                 "--rm-batch-size", "5"]) == 0
    got = [_by_key(_table(out).to_pylist())[k]["score"] for k in keys]
    want = _reference_rewards(tiny_reward_model, texts)
    assert got == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 0.1  # a test that could fail

    # Longer than rm_max_length: the start goes, the end (where the reward is read) stays.
    out = tmp_path / "rm_cut"
    assert main(["score", "--samples", str(sample_run), "--out", str(out), "--scorer",
                 "reward_model", "--reward-model", str(tiny_reward_model),
                 "--rm-max-length", "6"]) == 0
    got = [_by_key(_table(out).to_pylist())[k]["score"] for k in keys]
    assert got == pytest.approx(_reference_rewards(tiny_reward_model, texts, keep_last=5),
                                abs=1e-4)

    assert main(["score", "--samples", str(sample_run), "--out", str(tmp_path / "no"),
                 "--scorer", "reward_model"]) == 2
    assert "needs --reward-model" in capsys.readouterr().err
