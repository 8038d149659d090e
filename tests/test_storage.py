"""Issue 8, storage: every path may be a local path or a URI. S3 here is moto's server on
127.0.0.1 (a real S3 HTTP API; `s3_server` in conftest), read and written through pyarrow's
S3FileSystem exactly as a real bucket would be. The stage chain on S3 is checked against the same
stages run on local paths. (Training with everything on S3: the two-node test of
tests/test_cluster.py.)"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import storage
from pipeline.errors import UserError
from pipeline.manifest import input_digest, is_current, read_manifest, verify_shards, write_stage
from pipeline.tables import read_table


def _upload(local_path, uri: str) -> str:
    """Copy a local file or directory to `uri` (the way `aws s3 cp --recursive` would)."""
    from pathlib import Path

    p = Path(local_path)
    for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
        storage.copy(str(f), uri if p.is_file() else storage.join(uri, str(f.relative_to(p))))
    return uri


def _rows(stage_dir, sort: list[str], drop: tuple[str, ...] = ()) -> list[dict]:
    """A stage's rows from its shards (local or URI), in a fixed order."""
    m = verify_shards(stage_dir)
    t = pa.concat_tables([pq.read_table(storage.join(stage_dir, f["name"]))
                          for f in m["files"]])
    t = t.drop_columns([c for c in drop if c in t.column_names])
    return t.sort_by([(c, "ascending") for c in sort]).to_pylist()


def _table(n: int) -> pa.Table:
    return pa.table({"prompt": [f"{i}+1=" for i in range(n)], "chosen": ["a"] * n,
                     "rejected": ["b"] * n})


def test_paths_and_files_on_s3(s3_server, tmp_path):
    b = s3_server()
    storage.write_text(f"{b}/a/x.json", '{"k": 1}')
    assert storage.read_text(f"{b}/a/x.json") == '{"k": 1}'
    assert storage.is_dir(f"{b}/a") and storage.is_file(f"{b}/a/x.json")
    assert not storage.exists(f"{b}/nothing") and storage.list_files(f"{b}/nothing") == []
    assert storage.list_files(b) == [f"{b}/a/x.json"] and storage.children(b) == ["a"]
    assert storage.absolute(f"{b}/run") == f"{b}/run"
    assert storage.absolute("rel/run") == str(tmp_path.cwd() / "rel" / "run")
    assert storage.join(f"{b}/run/", "round_1", "samples") == f"{b}/run/round_1/samples"
    assert storage.same(f"{b}/run/", f"{b}/run") and not storage.same(f"{b}/run", f"{b}/ru")
    assert storage.is_uri("s3://b/x") and not storage.is_uri("file:///tmp/x")
    assert storage.local("file:///tmp/x") == "/tmp/x"
    with pytest.raises(UserError, match="no-such-bucket"):
        storage.read_text("s3://no-such-bucket/x.json")
    # Readers: Parquet and JSONL datasets on S3, with the same one-line errors as on disk.
    pq.write_table(_table(3), f"{b.removeprefix('s3://')}/d/part-0.parquet",
                   filesystem=storage.filesystem(b)[0])
    assert read_table(f"{b}/d", required=("prompt",)).num_rows == 3
    storage.write_text(f"{b}/j/x.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    assert read_table(f"{b}/j/x.jsonl").to_pylist() == [{"prompt": "1+1=", "answer": "2"}]
    storage.write_text(f"{b}/empty.jsonl", "")
    with pytest.raises(UserError, match=r"empty.jsonl: empty file \(0 bytes\)"):
        read_table(f"{b}/empty.jsonl")
    with pytest.raises(UserError, match="missing column"):
        read_table(f"{b}/d", required=("answer",))


def test_stage_dir_on_s3_is_published_manifest_last(s3_server, monkeypatch):
    b = s3_server()
    out = f"{b}/run/pairs"

    def shards(n):
        def write(tmp):
            for i in range(n):
                pq.write_table(_table(2), storage.join(tmp, f"part-{i:05d}.parquet"))
        return write

    m = write_stage(out, "pair", {"v": 1}, {"x": "1"}, shards(3), rows_in=6, dropped={})
    assert m["complete"] and [f["rows"] for f in m["files"]] == [2, 2, 2]
    assert verify_shards(out, "pair") == read_manifest(out)
    assert is_current(out, "pair", {"v": 1}, {"x": "1"})
    assert storage.children(f"{b}/run") == ["pairs"]  # no temporary prefix left beside it
    digest = input_digest(out)

    # A failing writer leaves the previous complete version as it was.
    def fails(tmp):
        shards(1)(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_stage(out, "pair", {"v": 2}, {"x": "2"}, fails, rows_in=2, dropped={})
    assert input_digest(out) == digest and storage.children(f"{b}/run") == ["pairs"]

    # Killed while publishing (after the first new file): the manifest says incomplete, so the
    # directory is never taken for a complete one, and the same stage redoes it.
    real_copy, copies = storage.copy, []

    def dies(src, dst):
        if copies:
            raise KeyboardInterrupt
        copies.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy", dies)
    with pytest.raises(KeyboardInterrupt):
        write_stage(out, "pair", {"v": 2}, {"x": "2"}, shards(2), rows_in=4, dropped={})
    monkeypatch.setattr(storage, "copy", real_copy)
    assert read_manifest(out) == {"stage": "pair", "complete": False}
    with pytest.raises(UserError, match="no complete manifest.json"):
        verify_shards(out)
    assert not is_current(out, "pair", {"v": 2}, {"x": "2"})
    m = write_stage(out, "pair", {"v": 2}, {"x": "2"}, shards(2), rows_in=4, dropped={})
    assert [f["name"] for f in m["files"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.list_files(out) == [storage.join(out, f) for f in
                                       ("manifest.json", "part-00000.parquet",
                                        "part-00001.parquet")]  # the third old shard is gone

    # A damaged object is named, as a damaged file is.
    storage.write_bytes(storage.join(out, "part-00001.parquet"), b"PAR1 not really")
    with pytest.raises(UserError, match=r"part-00001.parquet: sha256 differs from manifest"):
        verify_shards(out)


def test_model_by_uri_is_copied_once_per_node(s3_server, toy_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ODPO_CACHE_DIR", str(tmp_path / "cache"))
    b = s3_server()
    uri = _upload(toy_model_dir, f"{b}/models/toy")
    local = storage.local_copy(uri)
    assert local.startswith(str(tmp_path / "cache"))
    from pathlib import Path

    names = sorted(p.name for p in Path(toy_model_dir).iterdir())
    assert sorted(p.name for p in Path(local).iterdir()) == names
    assert storage.local_copy(uri) == local  # cached: same files, same copy
    storage.write_text(storage.join(uri, "extra.txt"), "changed")
    assert storage.local_copy(uri) != local  # the files under the URI changed: a new copy
    assert storage.local_copy(toy_model_dir) == toy_model_dir  # local paths are used in place
    with pytest.raises(UserError, match="no such file or directory"):
        storage.local_copy(f"{b}/models/missing")


def test_eval_result_on_s3_is_current_until_config_or_model_changes(s3_server, toy_model_dir,
                                                                   tmp_path, monkeypatch):
    """What `odpo eval --out s3://...` keeps beside the numbers (the result file with its
    manifest keys, the model digested through this node's copy of the URI): current for the
    same config and model, not for another config or other weights; a file that is no result
    is never overwritten. (The engine part of eval is the same for every path.)"""
    from pipeline.checkpoint import checkpoint_digest
    from pipeline.manifest import current_result, read_result, write_result

    monkeypatch.setenv("ODPO_CACHE_DIR", str(tmp_path / "cache"))
    b = s3_server()
    model = _upload(toy_model_dir, f"{b}/models/toy")
    out, config = f"{b}/run/round_1/eval.json", {"samples": 2}
    inputs = {"model": checkpoint_digest(model)}
    assert inputs["model"] == checkpoint_digest(toy_model_dir)  # the same files, by URI or not
    assert current_result(out, "eval", config, inputs) is None  # nothing there yet
    written = write_result(out, "eval", config, inputs, {"greedy_reward": 0.25})
    assert json.loads(storage.read_text(out)) == written and written["greedy_reward"] == 0.25
    assert current_result(out, "eval", config, inputs) == written
    assert current_result(out, "eval", {"samples": 4}, inputs) is None
    storage.write_text(storage.join(model, "model.safetensors"), "other weights")
    assert current_result(out, "eval", config, {"model": checkpoint_digest(model)}) is None
    storage.write_text(f"{b}/run/notes.json", "[1, 2]")
    with pytest.raises(UserError, match="is not an `eval` result; refusing to overwrite"):
        read_result(f"{b}/run/notes.json", "eval")


@pytest.fixture(scope="module")
def s3_chain(s3_server, e2e_run, sample_prompts, tmp_path_factory):
    """The stage chain sample -> score -> pair -> precompute with every path on S3 (model,
    prompts, outputs, reference cache), as the end-to-end run's round 1 ran them on local paths
    (its SFT model, seed, scorer, pair mode): that round is the local run to compare with."""
    b = s3_server("chain")
    cfg, e2e = e2e_run["cfg"], e2e_run["run"]
    model = _upload(e2e / "sft" / "model", f"{b}/models/sft")
    prompts = _upload(sample_prompts, f"{b}/data/prompts.parquet")
    run = f"{b}/run"
    cmds = {
        "sample": ["sample", "--model", model, "--prompts", prompts, "--out", f"{run}/samples",
                   "--k", str(cfg.sample["k"]), "--max-tokens", str(cfg.sample["max_tokens"]),
                   "--seed", str(cfg.seed + 1)],
        "score": ["score", "--samples", f"{run}/samples", "--out", f"{run}/scored",
                  "--scorer", cfg.scorer],
        "pair": ["pair", "--scored", f"{run}/scored", "--out", f"{run}/pairs", "--mode",
                 cfg.pair["mode"], "--round", "1"],
        "precompute": ["precompute", "--pairs", f"{run}/pairs", "--model", model, "--out",
                       f"{run}/precompute", "--cache-dir", f"{b}/cache"],
    }
    for name, argv in cmds.items():
        assert main(argv) == 0, name
    return {"bucket": b, "run": run, "model": model, "cmds": cmds,
            "local": e2e / "round_1"}


@pytest.mark.slow
def test_stages_on_s3_equal_the_local_run(s3_chain):
    run, local = s3_chain["run"], s3_chain["local"]
    key = ["prompt_id", "sample_index"]
    # vLLM read the model from S3
    assert _rows(f"{run}/samples", key) == _rows(local / "samples", key)
    assert _rows(f"{run}/scored", key) == _rows(local / "scored", key)
    pair_key = ["prompt", "chosen", "rejected"]
    assert _rows(f"{run}/pairs", pair_key) == _rows(local / "pairs", pair_key)
    s3_ref, local_ref = _rows(f"{run}/precompute", pair_key), _rows(local / "precompute", pair_key)
    assert len(s3_ref) == len(local_ref) > 0
    logps = ("ref_chosen_logps", "ref_rejected_logps")
    for a, c in zip(s3_ref, local_ref, strict=True):
        assert {k: v for k, v in a.items() if k not in logps} == {
            k: v for k, v in c.items() if k not in logps}
        for k in logps:
            assert a[k] == pytest.approx(c[k], abs=1e-9)
    # Each stage's manifest records the URIs it read and wrote.
    assert read_manifest(f"{run}/samples")["config"]["model"] == s3_chain["model"]
    assert read_manifest(f"{run}/precompute")["config"]["out"] == f"{run}/precompute"


@pytest.mark.slow
def test_s3_reruns_skip_and_reuse_the_precompute_cache(s3_chain, capsys):
    run, cmds = s3_chain["run"], s3_chain["cmds"]
    before = storage.read_text(f"{run}/samples/manifest.json")
    capsys.readouterr()
    assert main(cmds["sample"]) == 0
    assert "skipped: up to date" in capsys.readouterr().out  # current on S3: no engine started
    assert storage.read_text(f"{run}/samples/manifest.json") == before
    # A second precompute output (a beta sweep's) comes from the S3 cache store, no forward.
    argv = list(cmds["precompute"])
    argv[argv.index("--out") + 1] = f"{run}/precompute_again"
    assert main(argv + ["--cache", "require"]) == 0
    out = capsys.readouterr().out
    assert "hit" in out, out
    assert (_rows(f"{run}/precompute_again", ["prompt", "chosen", "rejected"])
            == _rows(f"{run}/precompute", ["prompt", "chosen", "rejected"]))
