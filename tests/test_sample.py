"""`odpo sample`: real vLLM on CPU inside a Ray Data actor pool (the end-to-end run's sampling
step, `sample_run`), checked against the tokenizer and hand-derived counts."""

import _thread
import glob
import hashlib
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.engine import EngineConfig, check_engine, kv_bytes_per_token, kv_cache_bytes
from pipeline.errors import UserError
from pipeline.sample import drop_reason, mark_duplicates, one_copy_each


def _table(stage_dir):
    return pa.concat_tables(
        [pq.read_table(f) for f in sorted(glob.glob(str(stage_dir / "*.parquet")))]
    )


def test_drop_reason_rules():
    assert drop_reason(None, 1, 64) == "empty_prompt"
    assert drop_reason("  \n", 3, 64) == "empty_prompt"
    assert drop_reason("1+1=", 63, 64) == ""  # room for exactly one output token
    assert drop_reason("1+1=", 64, 64) == "prompt_too_long"
    assert drop_reason("1+1=\U0001F600", 6, 64, unencodable=True) == "unencodable_prompt"
    assert drop_reason("  ", 3, 64, unencodable=True) == "empty_prompt"


def test_mark_duplicates_marks_all_but_one_copy():
    assert mark_duplicates(["a", "b", "a", "c", "a", "c"], ["", "", "", "empty_prompt", "", ""]) \
        == ["", "", "duplicate_prompt", "empty_prompt", "duplicate_prompt", ""]


def test_one_copy_each_is_the_same_row_whatever_the_order():
    rows = [{"prompt_id": "a", "prompt": "1+1=", "answer": "2"},
            {"prompt_id": "b", "prompt": "2+2=", "answer": "4"},
            {"prompt_id": "a", "prompt": "1+1=", "answer": "02"},  # '"02"' < '"2"': this copy
            {"prompt_id": "c", "prompt": "3+3=", "answer": "6"},
            {"prompt_id": "b", "prompt": "2+2=", "answer": "4"}]  # identical: either, once
    assert one_copy_each(pa.Table.from_pylist(rows)).to_pylist() == [rows[2], rows[1], rows[3]]
    # reversed, the ids first appear as b, c, a; the same copies are chosen
    assert one_copy_each(pa.Table.from_pylist(rows[::-1])).to_pylist() == [rows[1], rows[3],
                                                                           rows[2]]


TOY = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
       "head_dim": 32, "hidden_size": 128, "max_position_embeddings": 64}
# Qwen2.5-0.5B-Instruct's sizes: GQA (2 KV heads of 14), no head_dim (896 / 14 = 64), 32k context
QWEN = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "hidden_size": 896, "max_position_embeddings": 32768}
GIB = 2**30


def test_kv_bytes_per_token_by_hand():
    assert kv_bytes_per_token(TOY, "float32") == 2 * 3 * 4 * 32 * 4 == 3072  # K and V
    assert kv_bytes_per_token(QWEN, "bfloat16") == 2 * 24 * 2 * 64 * 2
    assert kv_bytes_per_token(QWEN, "auto") == 2 * 24 * 2 * 64 * 4  # may stay float32
    assert kv_bytes_per_token({"text_config": QWEN}, "float16") == 2 * 24 * 2 * 64 * 2
    assert kv_bytes_per_token({"num_attention_heads": 4, "num_hidden_layers": 2,
                               "hidden_size": 64}, "float32") == 2 * 2 * 4 * 16 * 4  # MHA
    assert kv_bytes_per_token({"num_hidden_layers": 3}, "float32") is None  # sizes unknown


def test_kv_cache_auto_size_on_cpu():
    """256 sequences (vLLM's CPU `max_num_seqs`) at full context, in whole MiB, when below the
    memory share; otherwise left to the share (None), as under use_gpu."""
    auto = EngineConfig()
    assert kv_cache_bytes(auto, TOY, 24 * GIB) == 256 * 64 * 3072 == 48 * 2**20
    assert kv_cache_bytes(EngineConfig(max_model_len=33), TOY, 24 * GIB) == 25 * 2**20  # 24.75
    # 256 x 32k tokens x 24 KiB = 192 GiB: more than 10% of 24 GiB, so vLLM's share rule
    assert kv_cache_bytes(auto, QWEN, 24 * GIB) is None
    bf16 = {"dtype": "bfloat16"}  # 12 KiB a token
    assert kv_cache_bytes(EngineConfig(max_model_len=512, **bf16), QWEN, 24 * GIB) \
        == 256 * 512 * 12288 == 1.5 * GIB
    assert kv_cache_bytes(EngineConfig(max_model_len=1024, **bf16), QWEN, 24 * GIB) is None  # 3
    assert kv_cache_bytes(EngineConfig(use_gpu=True), TOY, 24 * GIB) is None
    assert kv_cache_bytes(EngineConfig(gpu_memory_utilization=1e-4), TOY, 24 * GIB) is None
    assert kv_cache_bytes(EngineConfig(kv_cache_gib=0.5, use_gpu=True), QWEN, GIB) == GIB // 2
    assert kv_cache_bytes(auto, {"num_hidden_layers": 3}, 24 * GIB) is None
    with pytest.raises(UserError, match="kv_cache_gib must be >= 0"):
        check_engine(EngineConfig(kv_cache_gib=-1))


@pytest.mark.slow
def test_sample_manifest_counts_and_columns(sample_run, sample_prompts, sft_run):
    from transformers import AutoTokenizer

    m = json.loads((sample_run / "manifest.json").read_text())
    assert m["stage"] == "sample" and m["complete"]
    # 19 prompt rows: 16 sampled, 1 empty, 1 too long for the 64-token context, 1 repeat.
    assert (m["rows_in"], m["rows_kept"], m["rows_out"]) == (19, 16, 64)
    assert m["dropped"] == {"empty_prompt": 1, "prompt_too_long": 1, "duplicate_prompt": 1}
    for f in m["files"]:
        assert hashlib.sha256((sample_run / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert sum(f["rows"] for f in m["files"]) == 64

    t = _table(sample_run)
    assert t.column_names[:7] == ["prompt_id", "prompt", "response", "sample_index",
                                  "finish_reason", "num_prompt_tokens", "num_response_tokens"]
    assert "answer" in t.column_names  # metadata passes through
    rows = t.to_pylist()
    given = pq.read_table(sample_prompts).to_pylist()[:16]
    answers = {r["prompt"]: r["answer"] for r in given}
    assert sorted({r["prompt"] for r in rows}) == sorted(answers)
    tok = AutoTokenizer.from_pretrained(sft_run / "model")
    for r in rows:
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()[:16]
        assert r["answer"] == answers[r["prompt"]]
        assert r["num_prompt_tokens"] == len(tok(r["prompt"])["input_ids"])
        # Character tokenizer: the text's tokens, plus the EOS that ended a "stop".
        n = len(tok(r["response"], add_special_tokens=False)["input_ids"])
        assert r["num_response_tokens"] == n + (r["finish_reason"] == "stop")
        assert r["finish_reason"] in ("stop", "length")
        assert r["num_response_tokens"] <= 8
    for prompt in answers:
        assert sorted(r["sample_index"] for r in rows if r["prompt"] == prompt) == [0, 1, 2, 3]
    assert len({r["response"] for r in rows}) > 16  # sampled, not greedy


# The same seed gives the same samples whatever the batching, row order and file format: the
# sampling-actor fault test of tests/test_faults.py (reversed JSONL in batches of 3 against
# Parquet in batches of 8).


def _engines(ray) -> int:
    """vLLM sampling actors this Ray session has had, live or dead."""
    return sum("VLLMSampler" in a["ActorClassName"] for a in ray._private.state.actors().values())


def test_rerun_is_skipped(ray_local, sample_run, sample_prompts, sft_run, capsys):
    """The end-to-end run's sampling step, asked again by the command line with the same
    settings: skipped (iterate and the CLI make one config), no engine started."""
    mtime = (sample_run / "manifest.json").stat().st_mtime_ns
    engines = _engines(ray_local)
    capsys.readouterr()
    assert main(["sample", "--model", str(sft_run / "model"), "--prompts", str(sample_prompts),
                 "--out", str(sample_run), "--k", "4", "--max-tokens", "8", "--seed", "3"]) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert (sample_run / "manifest.json").stat().st_mtime_ns == mtime
    assert _engines(ray_local) == engines > 0


@pytest.mark.slow
def test_bad_prompts_are_one_line_errors(ray_local, sft_run, toy_data_dir, sample_run, tmp_path,
                                         capsys):
    model = str(sft_run / "model")

    def run(prompts, out="out", *extra):
        return main(["sample", "--model", model, "--prompts", str(prompts), "--out",
                     str(tmp_path / out), "--k", "2", "--max-tokens", "4", *extra])

    pq.write_table(pa.Table.from_pylist([{"question": "1+1="}]), tmp_path / "noprompt.parquet")
    assert run(tmp_path / "noprompt.parquet") == 2
    assert "missing column(s) ['prompt']" in capsys.readouterr().err

    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    assert run(tmp_path / "garbage.parquet") == 2
    assert "cannot read" in capsys.readouterr().err

    pq.write_table(pa.Table.from_pylist([{"prompt": 5}]), tmp_path / "ints.parquet")
    assert run(tmp_path / "ints.parquet") == 2
    assert "must hold strings" in capsys.readouterr().err

    assert run(tmp_path / "missing.parquet") == 2
    assert "no such file" in capsys.readouterr().err

    # An output directory that holds another stage's data is refused and left intact.
    scored = tmp_path / "holds_score"
    scored.mkdir()
    (scored / "manifest.json").write_text(json.dumps({"stage": "score", "complete": True}))
    assert run(toy_data_dir / "prompts.parquet", "holds_score") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert json.loads((scored / "manifest.json").read_text())["stage"] == "score"

    assert run(toy_data_dir / "prompts.parquet", "x", "--engine-max-model-len", "65") == 2
    assert "exceeds the model's context of 64" in capsys.readouterr().err

    # Samples are not prompts: their sample columns give it away.
    assert run(sample_run, "y") == 2
    assert "already has column(s)" in capsys.readouterr().err


def test_engine_start_failure_fails_fast(ray_local, sft_run, toy_data_dir, tmp_path, capsys):
    """A vLLM constructor that raises inside the Ray Data actor (memory budget too small to hold
    a KV cache) ends the job with its error instead of restarting the actor forever. A watchdog
    interrupts the command after 5 minutes (exit 130, as on Ctrl-C), so that a hang would fail
    the test instead of blocking the suite."""
    watchdog = threading.Timer(300, _thread.interrupt_main)
    watchdog.start()
    try:
        rc = main(["sample", "--model", str(sft_run / "model"), "--prompts",
                   str(toy_data_dir / "prompts.parquet"), "--out", str(tmp_path / "out"),
                   "--k", "2", "--max-tokens", "4", "--engine-gpu-memory-utilization", "0.0001"])
    finally:
        watchdog.cancel()
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("odpo sample: error: vLLM engine for"), last
    assert "failed to start" in last
    assert not (tmp_path / "out").exists()  # nothing half-written
