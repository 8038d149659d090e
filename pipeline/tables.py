"""Datasets in: Parquet / JSONL files or directories, a `datasets` dir saved to disk, local or
by URI; one-line errors for bad files."""

from __future__ import annotations

import os
import re

from pipeline import storage
from pipeline.errors import UserError


def dataset_format(path: str | os.PathLike) -> str:
    """'parquet', 'json' or 'hf' (a `datasets` dataset saved with `save_to_disk`). `path` may be
    a local path or a URI (see `pipeline.storage`)."""
    p = str(path)
    if storage.is_dir(p):
        files = [storage.relative(f, p) for f in storage.list_files(p)]
        if "dataset_info.json" in files or "state.json" in files:
            if storage.is_uri(p):
                raise UserError(f"{p}: a saved `datasets` dataset is read from a local path only; "
                                f"give its Parquet files instead")
            return "hf"
        if any(f.endswith(".parquet") for f in files):
            return "parquet"
        if any(f.endswith((".jsonl", ".json")) for f in files):
            return "json"
        raise UserError(f"{p}: directory holds no .parquet, .jsonl or saved `datasets` dataset")
    if not storage.exists(p):
        raise UserError(f"{p}: no such file or directory")
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith((".jsonl", ".json")):
        return "json"
    raise UserError(f"{p}: unknown format (expected .parquet, .jsonl or a `datasets` dir)")


def _check_not_empty(path: str | os.PathLike) -> None:
    """A 0-byte file is no dataset: say so (readers would say "no files found" or worse)."""
    if storage.is_file(path) and storage.size(path) == 0:
        raise UserError(f"{path}: empty file (0 bytes)")


def check_utf8(table, source: str):
    """`table`, or a one-line `UserError` naming the first text value that is not UTF-8 (its
    row and first bytes).

    pyarrow's JSON reader keeps invalid bytes in string columns; they would surface later as a
    `UnicodeDecodeError` deep inside a stage."""
    import pyarrow as pa

    for name in table.column_names:
        start = 0
        for chunk in table[name].chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                where, match = "", re.search(r"string index (\d+)", str(e))
                if match and (pa.types.is_string(chunk.type)
                              or pa.types.is_large_string(chunk.type)):
                    i = int(match.group(1))
                    raw = chunk.view(pa.binary() if pa.types.is_string(chunk.type)
                                     else pa.large_binary())[i].as_py()
                    where = f" (row {start + i}: {raw[:40]!r})"
                raise UserError(
                    f"{source}: column `{name}` holds text that is not valid UTF-8{where}"
                ) from e
            start += len(chunk)
    return table


def _json_files(path: str | os.PathLike) -> list[str]:
    """The non-empty JSON / JSONL files of a file or directory dataset."""
    p = str(path)
    files = [p] if storage.is_file(p) else storage.list_files(p, (".json", ".jsonl"))
    return [f for f in files if storage.size(f) > 0]


def _read_json(path: str):
    import pyarrow.json as pajson

    with storage.open_input(path) as f:
        return pajson.read_json(f)


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ()):
    """Read a whole dataset into a `pyarrow.Table`, with one-line errors for bad files."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    fmt = dataset_format(path)
    _check_not_empty(path)
    try:
        if fmt == "parquet":
            fs, inner = storage.filesystem(path)
            table = pads.dataset(inner, format="parquet", filesystem=fs).to_table()
        elif fmt == "json":
            tables = [_read_json(f) for f in _json_files(path)]
            if not tables:
                raise UserError(f"{path}: empty file")
            table = check_utf8(pa.concat_tables(tables, promote_options="default"), str(path))
        else:
            import datasets

            table = datasets.load_from_disk(str(path)).data.table
    except UserError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from e
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; found {table.column_names}"
        )
    return table


def read_ray_dataset(path: str | os.PathLike, required: tuple[str, ...] = ()):
    """The same dataset as a `ray.data.Dataset` (Ray's own readers, which take URIs too; HF via
    `from_huggingface`)."""
    import pyarrow as pa
    import ray

    fmt = dataset_format(path)
    _check_not_empty(path)
    try:
        if fmt == "parquet":
            ds = ray.data.read_parquet(str(path))
        elif fmt == "json":
            ds = ray.data.read_json(str(path))
            # Checked here, a file at a time, before any Ray task: a task failing on it would
            # have Ray cancel its siblings, and one cancelled while importing torch was seen to
            # leave its worker unable to import torch again.
            for f in _json_files(path):
                check_utf8(_read_json(f), str(f))
        else:
            import datasets

            ds = ray.data.from_huggingface(datasets.load_from_disk(str(path)))
        schema = ds.schema()
    except UserError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # Ray wraps reader errors raised in its tasks
        if isinstance(e.__cause__, (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError)):
            msg = str(e.__cause__).splitlines()[0]
            raise UserError(f"{path}: cannot read as {fmt}: {msg}") from e
        raise
    if schema is None:
        raise UserError(f"{path}: empty dataset (no rows, no schema)")
    names = schema.names
    missing = [c for c in required if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {names}")
    return ds
