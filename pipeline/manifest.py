"""Stage directories: Parquet shards + `manifest.json`, written atomically, skipped when current.

A manifest records the stage, its config, its inputs and their content digests, the code version,
rows in / out / dropped by reason (which must add up), and each shard's row count and sha256.
A stage whose manifest is complete and whose config and input digests are unchanged is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import atomic_dir, write_json

MANIFEST = "manifest.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("offline-dpo")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = storage.join(stage_dir, MANIFEST)
    if not storage.is_file(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt manifest ({e}); remove the directory to redo it") from e


def input_digest(path: str | Path) -> str:
    """Content digest of an input: a stage directory's manifest file digests, a plain file's
    bytes, or every data file under a directory."""
    p = str(path)
    manifest = read_manifest(p) if storage.is_dir(p) else None
    h = hashlib.sha256()
    if manifest is not None:
        for f in manifest["files"]:
            h.update(f"{f['name']}:{f['sha256']}\n".encode())
    elif storage.is_file(p):
        h.update(storage.sha256(p).encode())
    elif storage.is_dir(p):
        for f in storage.list_files(p):
            h.update(f"{storage.relative(f, p)}:{storage.sha256(f)}\n".encode())
    else:
        raise UserError(f"{p}: no such file or directory")
    return h.hexdigest()


def verify_shards(stage_dir: str | Path, stage: str | None = None) -> dict:
    """Check every shard against its manifest checksum before use; return the manifest."""
    manifest = read_manifest(stage_dir)
    if manifest is None or not manifest.get("complete"):
        raise UserError(f"{stage_dir}: no complete {MANIFEST}; (re)run the stage that writes it")
    if stage is not None and manifest["stage"] != stage:
        raise UserError(f"{stage_dir} holds '{manifest['stage']}' data, expected '{stage}'")
    for f in manifest["files"]:
        path = storage.join(stage_dir, f["name"])
        if not storage.is_file(path):
            raise UserError(f"{path}: listed in {MANIFEST} but missing")
        if storage.sha256(path) != f["sha256"]:
            raise UserError(f"{path}: sha256 differs from {MANIFEST} (truncated or corrupted)")
    return manifest


def is_current(out_dir: str | Path, stage: str, config: dict, inputs: dict[str, str]) -> bool:
    """True when `out_dir` holds a complete run of `stage` with this config and these input
    digests and its shards are intact. Refuses a directory that holds another stage's data."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        if storage.list_files(out_dir):
            raise UserError(f"{out_dir} exists and holds no {MANIFEST}; refusing to overwrite it")
        return False
    if manifest["stage"] != stage:
        raise UserError(
            f"{out_dir} holds '{manifest['stage']}' output; refusing to overwrite it with "
            f"'{stage}' (choose another directory)"
        )
    if not manifest.get("complete") or not _same_run(manifest, config, inputs):
        return False
    try:
        verify_shards(out_dir, stage)
    except UserError:
        return False
    return True


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _same_run(manifest: dict, config: dict, inputs: dict[str, str]) -> bool:
    """The manifest records this config, these input digests and this code version."""
    return (manifest.get("config") == _jsonable(config) and manifest.get("inputs") == inputs
            and manifest.get("code_version") == code_version())


# ---------------------------------------------------------------- steps that resume (training)
#
# A training run cannot be published at once like a stage's shards: its directory holds Ray
# Train's checkpoints to resume from while it runs. So its manifest is written twice: when the
# training starts, `{"complete": false}` with the config, input digests and code version (a
# re-run of the same run resumes its checkpoints), and at the end complete, with the published
# files' sha256. A run is skipped (`current_run`) only when that last manifest is current.


def current_run(out: str, stage: str, config: dict, inputs: dict[str, str]) -> dict | None:
    """The complete manifest when `out` holds a finished run of `stage` with this config, these
    input digests and this code version, its files intact: the caller skips. None otherwise;
    a directory that holds anything but a run of `stage` is refused. Changes nothing."""
    manifest = read_manifest(out)
    if manifest is None:
        if storage.exists(out) and storage.list_files(out):
            raise UserError(f"{out} exists and holds no {MANIFEST}; refusing to overwrite it "
                            f"(choose another directory or remove it)")
        return None
    if manifest.get("stage") != stage:
        raise UserError(
            f"{out} holds '{manifest.get('stage')}' output; refusing to overwrite it with "
            f"'{stage}' (choose another directory)"
        )
    if manifest.get("complete") and _same_run(manifest, config, inputs):
        try:
            return verify_shards(out, stage)
        except UserError:
            return None  # a damaged output: the run's last checkpoint publishes it again
    return None


def start_run(out: str, stage: str, config: dict, inputs: dict[str, str]) -> None:
    """Make `out` ready for a run that `current_run` did not find finished, once its inputs have
    been read and checked: a run with the same config, inputs and code is kept (its checkpoints
    are resumed); any other run of `stage` is removed, so that nothing of it is resumed or left
    to describe the directory. Then `{"complete": false}` is recorded until `finish_run`."""
    manifest = read_manifest(out)
    if manifest is not None and not _same_run(manifest, config, inputs):
        changed = [k for k, v in (("config", _jsonable(config)), ("inputs", inputs),
                                  ("code_version", code_version())) if manifest.get(k) != v]
        print(f"{stage}: {out} holds a run with another {', '.join(changed)}; starting over",
              flush=True)
        storage.remove(out)
    storage.makedirs(out)
    write_json(storage.join(out, MANIFEST), {
        "stage": stage, "config": _jsonable(config), "inputs": inputs,
        "code_version": code_version(), "complete": False})


def finish_run(out: str, stage: str, config: dict, inputs: dict[str, str], published: str,
               extra: dict) -> dict:
    """Write the complete manifest of a run begun with `start_run`: the files under `published`
    (a directory relative to `out`, e.g. "model") with their sha256, and `extra` (the run's
    summary)."""
    files = [storage.relative(f, out) for f in storage.list_files(storage.join(out, published))]
    manifest = {
        "stage": stage,
        "config": _jsonable(config),
        "inputs": inputs,
        "code_version": code_version(),
        "files": [{"name": f, "bytes": storage.size(storage.join(out, f)),
                   "sha256": storage.sha256(storage.join(out, f))} for f in files],
        **_jsonable(extra),
        "complete": True,
    }
    write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def read_result(path: str, stage: str) -> dict | None:
    """A one-file result (`odpo eval --out`) that carries its own manifest keys, or None when
    absent; a file that is not such a result is refused."""
    if not storage.is_file(path):
        return None
    try:
        result = json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict) or result.get("stage", stage) != stage:
        raise UserError(f"{path} exists and is not an `{stage}` result; refusing to overwrite it")
    return result


def current_result(path: str, stage: str, config: dict, inputs: dict[str, str]) -> dict | None:
    """The result at `path` when it records this config, these inputs and this code version."""
    result = read_result(path, stage)
    if result is not None and result.get("complete") and _same_run(result, config, inputs):
        return result
    return None


def write_result(path: str, stage: str, config: dict, inputs: dict[str, str],
                 result: dict) -> dict:
    """Write a one-file result with its manifest keys (stage, config, inputs, code version)."""
    out = {**_jsonable(result), "stage": stage, "config": _jsonable(config), "inputs": inputs,
           "code_version": code_version(), "complete": True}
    write_json(path, out)
    return out


def write_stage(
    out_dir: str | Path,
    stage: str,
    config: dict,
    inputs: dict[str, str],
    write_shards,
    rows_in: int,
    dropped: dict[str, int],
    extra: dict | None = None,
    rows_kept: int | None = None,
) -> dict:
    """Run `write_shards(tmp_dir)` into a temporary directory, then write the manifest and rename
    (a URI `out_dir`: publish it, manifest last; see `storage`).

    `write_shards` writes Parquet files into the directory it is given (a path or URI string:
    name files with `storage.join`). Raises if
    rows_in != rows_out + sum(dropped): no stage loses rows silently.

    A stage whose output rows are not one per kept input row (`sample` writes k samples per
    prompt, `pair` any number of pairs per prompt) passes `rows_kept`, the input rows that
    produced output; the check is then rows_in == rows_kept + sum(dropped).
    """
    with _stage_tmp(out_dir, stage) as tmp:
        write_shards(tmp)
        files = []
        for f in storage.list_files(tmp, (".parquet",)):
            files.append(
                {
                    "name": storage.relative(f, tmp),
                    "rows": storage.parquet_rows(f),
                    "sha256": storage.sha256(f),
                }
            )
        rows_out = sum(f["rows"] for f in files)
        kept = rows_out if rows_kept is None else rows_kept
        if rows_in != kept + sum(dropped.values()):
            what = "rows out" if rows_kept is None else "rows kept"
            raise RuntimeError(f"{stage}: rows in {rows_in} != {what} {kept} + dropped {dropped}")
        manifest = {
            "stage": stage,
            "config": _jsonable(config),
            "inputs": inputs,
            "code_version": code_version(),
            "rows_in": rows_in,
            "rows_out": rows_out,
            **({} if rows_kept is None else {"rows_kept": rows_kept}),
            "dropped": dict(sorted(dropped.items())),
            "files": files,
            **(extra or {}),
            "complete": True,
        }
        write_json(storage.join(tmp, MANIFEST), manifest)
    return manifest


@contextlib.contextmanager
def _stage_tmp(out_dir, stage: str) -> Iterator[str | Path]:
    """A temporary stage directory that becomes `out_dir` only if the block succeeds: locally
    `atomic_dir` (rename); for a URI a sibling prefix `.NAME.tmp-PID` on the same store (Ray Data
    writes there from any node), then `storage.publish` (copies within the store, manifest last,
    an incomplete manifest of this stage in place meanwhile)."""
    if not storage.is_uri(out_dir):
        with atomic_dir(out_dir, overwrite=True) as tmp:
            yield tmp
        return
    tmp = storage.join(storage.parent(out_dir), f".{storage.name(out_dir)}.tmp-{os.getpid()}")
    storage.remove(tmp)
    try:
        yield tmp
        pending = json.dumps({"stage": stage, "complete": False}).encode()
        storage.publish(tmp, str(out_dir), pending=pending)
    finally:
        storage.remove(tmp)
