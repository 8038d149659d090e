"""Files in and out: datasets (Parquet / JSONL / `datasets` on disk), atomic writes, digests."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or configuration: printed as one line, no traceback."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The `UserError` that caused `exc`, following Ray's exception wrapping, or None."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # Ray may carry the remote exception only as traceback text.
    match = re.search(r"pipeline\.io\.UserError: (.+)", str(exc))
    return UserError(match.group(1).strip()) if match else None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a `UserError` that Ray wrapped (a stage's task, actor or train worker raised it)
    as itself, so the command prints its one line instead of Ray's traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise UserError(str(user)) from e
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds.

    A crash leaves `out` as it was (absent or the previous complete version), never half-written.
    """
    out = Path(out)
    clear_stale(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of `out` left beside it: `.NAME.tmp-PID` directories of dead
    processes. A `.NAME.old-PID` (killed between the two renames of `atomic_dir`) is the previous
    complete version: it is put back when `out` is missing, else removed. Returns what was removed.
    """
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            p.rename(out)
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON to a local path (atomically) or a URI (one PUT)."""
    from pipeline import storage

    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def dataset_format(path: str | os.PathLike) -> str:
    """'parquet', 'json' or 'hf' (a `datasets` dataset saved with `save_to_disk`). `path` may be
    a local path or a URI (see `pipeline.storage`)."""
    from pipeline import storage

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
    from pipeline import storage

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
    from pipeline import storage

    p = str(path)
    files = [p] if storage.is_file(p) else storage.list_files(p, (".json", ".jsonl"))
    return [f for f in files if storage.size(f) > 0]


def _read_json(path: str):
    import pyarrow.json as pajson

    from pipeline import storage

    with storage.open_input(path) as f:
        return pajson.read_json(f)


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ()):
    """Read a whole dataset into a `pyarrow.Table`, with one-line errors for bad files."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipeline import storage

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


def resolve_path(p: str | None) -> str | None:
    """An existing local path made absolute (Ray workers run in other directories); anything
    else (a hub id, a URI) is returned unchanged."""
    if p is None or "://" in p:
        return p
    path = Path(p)
    return str(path.resolve()) if path.exists() else p


def check_model_name(name: str | os.PathLike, what: str = "model") -> None:
    """A one-line error for a model named by a local path that does not exist, before any work:
    loaders would take it for a hub id and fail much later, inside a Ray worker. Path-like:
    absolute, `~`, `./` or `../`, more than one `/` (a hub id is `org/name`), or a parent
    directory that exists here (`runs/sft/modle`). A hub id or a URI passes."""
    s = str(name)
    if "://" in s or os.path.exists(os.path.expanduser(s)):
        return
    parent = os.path.dirname(s.rstrip("/"))
    path_like = (
        s.startswith(("/", "~", "./", "../")) or s in (".", "..") or s.count("/") > 1
        or (parent not in ("", ".") and os.path.isdir(parent))
    )
    if path_like:
        raise UserError(f"{what} {s}: no such directory (a local checkpoint path; a hub id "
                        f"is written org/name)")


def check_checkpoint(path: str | os.PathLike, what: str = "model") -> None:
    """One-line errors, before any work starts, for a local checkpoint that loading would have
    to run or unpickle: weights only as pickle (`*.bin`; unpickling runs code, so every load
    here passes `use_safetensors=True`), or a config that needs the checkpoint's own Python
    code (`auto_map`; every load passes `trust_remote_code=False`). Anything not a local
    directory is left to the loader. A URI is checked in this node's copy (`storage.local_copy`)."""
    from pipeline.storage import local_copy

    check_model_name(path, what)
    p = Path(local_copy(str(path), what))
    if not p.is_dir():
        return
    names = sorted(f.name for f in p.iterdir() if f.is_file())
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        found = f"only pickled weights {pickled}" if pickled else "no *.safetensors weights"
        raise UserError(
            f"{what} {p}: {found}; weights are loaded from safetensors only (re-save with "
            f"save_pretrained(..., safe_serialization=True))"
        )
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {p}: cannot read its config.json ({e})") from e
    if config.get("auto_map"):
        # transformers' own rule with remote code off: a model_type it knows loads with its own
        # classes (auto_map ignored); any other needs the checkpoint's code. Read from the JSON:
        # a cache hit of the reference stage must not import transformers' modeling code.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UserError(
                f"{what} {p}: its config.json needs the checkpoint's own Python code (auto_map, "
                f"model_type {config.get('model_type')!r}); custom code is never run "
                f"(trust_remote_code off)"
            )
