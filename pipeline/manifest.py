"""Stage directories: Parquet shards + `manifest.json`, written atomically, skipped when current.

A manifest records the stage, its config, its inputs and their content digests, the code version,
rows in / out / dropped by reason (which must add up), and each shard's row count and sha256.
A stage whose manifest is complete and whose config and input digests are unchanged is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pipeline import storage
from pipeline.io import UserError, atomic_dir, write_json

MANIFEST = "manifest.json"


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
    if not manifest.get("complete") or manifest["config"] != _jsonable(config):
        return False
    if manifest["inputs"] != inputs:
        return False
    try:
        verify_shards(out_dir, stage)
    except UserError:
        return False
    return True


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


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
