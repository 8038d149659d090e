"""The one shape of a stage, as plain functions: what every stage does around its pipeline.

    up = read_stage(cfg.samples, accept=("sample",), required=("prompt", "response"),
                    flag="--samples")               # the upstream checked; no Ray yet
    inputs = {"samples": input_digest(cfg.samples), ...}

    def build() -> Shards:                          # runs only when there is work, Ray up
        ds = read_rows(up)
        ...                                         # the stage's Ray Data pipeline
        return Shards(ds, rows_in=..., dropped=...)

    return run_stage(cfg.out, STAGE, asdict(cfg), inputs, build, started=t0,
                     sources={"--samples": cfg.samples}, reads={...}, summary=SUMMARY)

`run_stage` refuses an `out` that is one of its inputs or holds anything but this stage's
output, skips when `out`'s manifest is current (config, input digests, code version), starts or
joins Ray once there is work (`ensure_ray`; a cluster named by RAY_ADDRESS first of all, so that
its storage check comes before anything is written), publishes what `build` returns atomically
with its manifest (`write_output`), and returns the summary. A stage with a skip rule of its own
(the reference cache) uses the parts: `check_out`, `join_named_cluster`, `ensure_ray`,
`write_output`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cluster import cluster_named, ensure_ray
from pipeline.errors import UserError, user_errors
from pipeline.manifest import is_current, read_manifest, verify_shards, write_stage
from pipeline.tables import read_ray_dataset, read_table

ROWS_PER_SHARD = 50_000  # rows per output file: few, large files that Ray still reads in parallel


# ---------------------------------------------------------------- reading an upstream


@dataclass(frozen=True)
class Upstream:
    """A stage's input after `read_stage`'s checks; its rows are read by `read_rows`."""

    path: str
    manifest: dict | None  # None: plain data (Parquet / JSONL / `datasets` dir, no manifest)
    files: tuple[str, ...]  # the manifest's shards, each checked against its sha256
    required: tuple[str, ...]  # columns the rows must have


def read_stage(path: str, accept: Sequence[str], required: Sequence[str] = (), *, flag: str,
               plain: bool = True) -> Upstream:
    """Check the input at `path` before any work (no Ray): a stage directory of one of the
    stages `accept` (shards checked against their manifest, `required` columns in its schema),
    or, when `plain`, data without a manifest (its columns are checked when read). `flag` names
    the input in errors, e.g. "--samples"."""
    if not storage.exists(path):
        raise UserError(f"{path}: no such file or directory")
    manifest = read_manifest(path) if storage.is_dir(path) else None
    needs = " or ".join(f"`odpo {s}`" for s in accept)
    if manifest is None:
        if not plain:
            raise UserError(f"{path} holds no manifest.json; {flag} needs the output of {needs}")
        return Upstream(path, None, (), tuple(required))
    if manifest.get("stage") not in accept:
        raise UserError(f"{path} holds '{manifest.get('stage')}' output; {flag} needs the "
                        f"output of {needs}")
    verify_shards(path)
    files = tuple(storage.join(path, f["name"]) for f in manifest["files"])
    if files:
        with storage.open_input(files[0]) as f:
            names = pq.read_schema(f).names
        missing = [c for c in required if c not in names]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; found {names}")
    return Upstream(path, manifest, files, tuple(required))


def read_rows(up: Upstream, table: bool = False):
    """The rows of `up`: a `ray.data.Dataset` (Ray must be up: `run_stage`'s `build`), or with
    `table` one `pyarrow.Table` read here. None when a stage directory lists no shards."""
    if up.manifest is None:
        return (read_table if table else read_ray_dataset)(up.path, required=up.required)
    if not up.files:
        return None
    if table:
        return pa.concat_tables([pq.read_table(f) for f in up.files], promote_options="default")
    import ray

    return ray.data.read_parquet(list(up.files))


# ---------------------------------------------------------------- writing and publishing


@dataclass(frozen=True)
class Shards:
    """What a stage's `build` hands to `write_output`: the rows to write and the counts its
    manifest records (rows_in == rows out, or `rows_kept`, + sum(dropped): nothing is lost)."""

    data: Any  # ray.data.Dataset | pyarrow.Table | None (nothing to write)
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out, by reason
    rows_kept: int | None = None  # input rows that gave output, when not one row each
    extra: dict = field(default_factory=dict)  # further manifest keys
    # Called on the written directory before the manifest: checks and stats read back from
    # the shards; returns further manifest keys.
    after: Callable[[str], dict] | None = None


def write_shards(data, directory: str) -> None:
    """Write a `ray.data.Dataset` (from its tasks, `part-NNNNN-*.parquet`) or a
    `pyarrow.Table` (here, `part-NNNNN.parquet`, at least one file) into an empty temporary
    stage directory, in files of about ROWS_PER_SHARD rows."""
    if isinstance(data, pa.Table):
        for s, start in enumerate(range(0, max(data.num_rows, 1), ROWS_PER_SHARD)):
            pq.write_table(data.slice(start, ROWS_PER_SHARD),
                           storage.join(directory, f"part-{s:05d}.parquet"))
        return
    import ray
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):  # not Ray's uuids: the file list reads the same each run
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    # OVERWRITE is what lets Ray accept names without the write's uuid.
    data.write_parquet(str(directory), filename_provider=PartNames(),
                       min_rows_per_file=ROWS_PER_SHARD, mode=ray.data.SaveMode.OVERWRITE)


def write_output(out: str, stage: str, config: dict, inputs: dict[str, str],
                 build: Callable[[], Shards]) -> dict:
    """Call `build()` and publish its shards into `out` with their manifest, atomically
    (`write_stage`); a `UserError` raised inside Ray comes out as itself. The manifest."""
    with user_errors():
        shards = build()
        extra = dict(shards.extra)

        def write(tmp: str) -> None:
            if shards.data is not None:
                write_shards(shards.data, tmp)
            if shards.after is not None:
                extra.update(shards.after(tmp))

        return write_stage(out, stage, config, inputs, write, rows_in=shards.rows_in,
                           dropped=dict(shards.dropped), extra=extra, rows_kept=shards.rows_kept)


# ---------------------------------------------------------------- the skeleton


def check_out(out: str, stage: str, sources: dict[str, str | None]) -> None:
    """Refuse an `out` that is one of the stage's inputs (`sources`, {flag: path}) or that
    holds anything but a run of `stage` (files without a manifest, another stage's output)."""
    for flag, path in sources.items():
        if path and storage.exists(path) and storage.same(path, out):
            raise UserError(f"--out {out} is the {flag} path; choose another directory")
    if not storage.list_files(out):
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} exists and holds no manifest.json; refusing to overwrite it")
    if manifest.get("stage") != stage:
        raise UserError(f"{out} holds '{manifest.get('stage')}' output; refusing to overwrite "
                        f"it with '{stage}' (choose another directory)")


def join_named_cluster(out: str | None, reads: dict[str, str | None]) -> None:
    """Before a stage knows whether it has work: a cluster named by RAY_ADDRESS is joined and
    its storage checked now (a skip or a cache hit may write too); the embedded local Ray is one
    node and starts only with work (`ensure_ray`)."""
    if cluster_named():
        ensure_ray(out, reads)


def run_stage(out: str, stage: str, config: dict, inputs: dict[str, str],
              build: Callable[[], Shards], *, summary: dict[str, str], started: float,
              sources: dict[str, str | None], reads: dict[str, str | None],
              ray: bool = True) -> dict:
    """Run a stage into `out`, or skip it when its manifest is current.

    config: the stage's settings as recorded; inputs: {name: content digest}; build: the rows
    to write (called with Ray up, only when there is work); summary: {summary key: manifest
    key}; started: `time.perf_counter()` when the stage began; sources: {flag: path} that `out`
    must not be; reads: {flag: path} that Ray tasks read on any node (checked on a multi-node
    cluster); ray: False for a stage that works in this process (Ray only to join a named
    cluster). Returns {"out", "skipped", summary's keys..., "seconds"}."""
    check_out(out, stage, sources)
    join_named_cluster(out, reads)
    skipped = is_current(out, stage, config, inputs)
    if skipped:
        manifest = read_manifest(out)
    else:
        if ray:
            ensure_ray(out, reads)
        manifest = write_output(out, stage, config, inputs, build)
    return {"out": out, "skipped": skipped, **{k: manifest.get(v) for k, v in summary.items()},
            "seconds": time.perf_counter() - started}
