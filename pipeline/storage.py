"""Paths that are local paths or fsspec/pyarrow URIs (s3://bucket/run, gs://..., hdfs://...).

Everything goes through `pyarrow.fs` (credentials and endpoints from the usual environment, e.g.
AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL for S3). A local path keeps the local behaviour (atomic
renames, `atomic_dir`). An object store has no rename, so a directory on it is published
"manifest last": its files are copied into place and the file that marks it complete
(`manifest.json` for a stage, `config.json` for a model) is written after all the others;
readers check that file (and a stage's checksums), so a half-published directory is never taken
for a complete one.

Models named by URI are loaded from a node-local copy (`local_copy`): vLLM and transformers read
local directories. Each actor or worker calls it on its own node.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError

# The files that mark a directory complete, published after every other file.
MARKERS = ("manifest.json", "config.json")


def temp_name(name: str, kind: str = "tmp") -> str:
    """The hidden sibling name a writer of `name` uses while it works: `.NAME.tmp-PID` (being
    written) or `.NAME.old-PID` (the previous version, between the two renames of `atomic_dir`).
    `parse_temp_name` reads it back; nothing else builds or parses these names."""
    return f".{name}.{kind}-{os.getpid()}"


def parse_temp_name(candidate: str, name: str) -> tuple[str | None, int]:
    """(kind, pid) when `candidate` is a `temp_name` of `name`, else (None, 0)."""
    prefix = f".{name}."
    if not candidate.startswith(prefix):
        return None, 0
    kind, _, pid = candidate[len(prefix):].rpartition("-")
    if kind not in ("tmp", "old") or not pid.isdigit():
        return None, 0
    return kind, int(pid)


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
    tmp = out.parent / temp_name(out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / temp_name(out.name, "old")
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
        kind, pid = parse_temp_name(p.name, out.name)
        if kind is None or _pid_alive(pid):
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
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def resolve_path(p: str | None) -> str | None:
    """An existing local path made absolute (Ray workers run in other directories); anything
    else (a hub id, a URI) is returned unchanged."""
    if p is None or "://" in p:
        return p
    path = Path(p)
    return str(path.resolve()) if path.exists() else p


def is_uri(path) -> bool:
    """True for an fsspec/pyarrow URI such as s3://bucket/x or gs://b/x (not file://)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() not in ("", "file")


def local(path) -> str:
    """A local path as a plain path (file:///x -> /x); anything else unchanged."""
    s = str(path)
    return s[len("file://"):] if s.lower().startswith("file://") else s


def absolute(path) -> str | None:
    """A local path made absolute (Ray workers run in other directories); a URI unchanged."""
    if path is None:
        return None
    return str(path) if is_uri(path) else str(Path(local(path)).absolute())


def join(base, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local(base), *parts))


def name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path) -> str:
    if is_uri(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(local(path)).parent)


def same(a, b) -> bool:
    """Whether two paths name the same place."""
    if is_uri(a) or is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(local(a)).resolve() == Path(local(b)).resolve()


def filesystem(path):
    """`(pyarrow FileSystem, path inside it)`; a one-line error for an unusable URI."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(local(path)).absolute())
    try:
        return pafs.FileSystem.from_uri(str(path).rstrip("/"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot open this URI ({str(e).splitlines()[0]})") from e


def _info(path):
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p)
    except OSError as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from e


def exists(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_dir(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


def is_file(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def size(path) -> int:
    return int(_info(path).size or 0)


def _listing(path) -> list:
    """FileInfo of every file under directory `path` (recursive), sorted by path."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from e
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_files(path, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Every file under directory `path` (recursive), as paths or URIs like `path`, sorted;
    only names ending in one of `suffixes` when given."""
    _, root = filesystem(path)
    out = []
    for i in _listing(path):
        rel = i.path[len(root.rstrip("/")) + 1:]
        if not suffixes or rel.endswith(suffixes):
            out.append(join(path, rel))
    return out


def children(path) -> list[str]:
    """Names of the files and directories directly under directory `path`, sorted."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from e
    return sorted(i.base_name for i in infos)


def relative(path, root) -> str:
    """`path` relative to directory `root` ("/"-separated)."""
    return str(path)[len(str(root).rstrip("/")) + 1:]


def open_input(path):
    """A seekable binary file (what pyarrow's readers take)."""
    fs, p = filesystem(path)
    try:
        return fs.open_input_file(p)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from e


def read_bytes(path) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode()


def parquet_rows(path) -> int:
    """Rows of one Parquet file, from its footer."""
    import pyarrow.parquet as pq

    with open_input(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_bytes(path, data: bytes) -> None:
    """Write a whole file: locally through a temporary and a rename (a killed writer's
    temporary is removed by the next write, `clear_stale`); on an object store one PUT (an
    object appears whole or not at all)."""
    if not is_uri(path):
        p = Path(local(path))
        p.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(p)
        tmp = p.parent / temp_name(p.name)
        tmp.write_bytes(data)
        tmp.replace(p)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_input(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove(path) -> None:
    """Delete a file or a directory tree; nothing if absent."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def makedirs(path) -> None:
    """Create a local directory; object stores have none to create."""
    if not is_uri(path):
        Path(local(path)).mkdir(parents=True, exist_ok=True)


def copy(src: str, dst: str) -> None:
    """Copy one file between any two filesystems (server-side within one object store)."""
    import pyarrow.fs as pafs

    sfs, sp = filesystem(src)
    dfs, dp = filesystem(dst)
    if not is_uri(dst):
        Path(dp).parent.mkdir(parents=True, exist_ok=True)
    if sfs.equals(dfs):
        sfs.copy_file(sp, dp)
    else:
        pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)


def publish(src_dir, out: str, pending: bytes | None = None) -> None:
    """Make URI directory `out` hold exactly the files of `src_dir` (local or a URI on the same
    store), marker last: `out`'s markers go first (replaced by `pending` under `manifest.json`
    when given: an incomplete manifest of the same stage, so a re-run knows to redo it), then its
    other old files, then the new files, then the new markers."""
    new = list_files(src_dir)
    old = list_files(out)
    old_markers = [f for f in old if name(f) in MARKERS]
    for f in old_markers:
        remove(f)
    if pending is not None:
        write_bytes(join(out, "manifest.json"), pending)
    for f in old:
        if f not in old_markers:
            remove(f)
    ordered = sorted(new, key=lambda f: (relative(f, src_dir) in MARKERS, f))
    for f in ordered:
        copy(f, join(out, relative(f, src_dir)))


@contextlib.contextmanager
def output_dir(out, overwrite: bool = False) -> Iterator[str]:
    """Yield a directory to fill; it becomes `out` only if the block succeeds.

    Local `out`: `atomic_dir` (a temporary sibling, then a rename). URI `out`: a local
    temporary directory, then `publish` (markers last)."""
    if not is_uri(out):
        with atomic_dir(local(out), overwrite=overwrite) as tmp:
            yield str(tmp)
        return
    if not overwrite and list_files(out):
        raise UserError(f"{out} already exists and is not empty; choose another path or "
                           f"remove it")
    with tempfile.TemporaryDirectory(prefix="odpo-publish-", dir=_staging_root()) as tmp:
        yield tmp
        publish(tmp, out)


def cache_root() -> Path:
    """ODPO_CACHE_DIR, else $XDG_CACHE_HOME/offline-dpo (~/.cache/offline-dpo)."""
    if os.environ.get("ODPO_CACHE_DIR"):
        return Path(os.environ["ODPO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "offline-dpo"


def _staging_root() -> str:
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def local_copy(path, what: str = "model") -> str | None:
    """A local directory with the files of `path`: `path` itself when local; for a URI a copy in
    this node's cache (`cache_root()/uri/<digest of the URI and its listing>`), downloaded once
    and re-downloaded when the files under the URI change. Safe for several processes at once.
    """
    if path is None or not is_uri(path):
        return None if path is None else local(path)
    infos = _listing(path)
    if not infos:
        raise UserError(f"{what} {path}: no such file or directory")
    _, root = filesystem(path)
    h = hashlib.sha256(str(path).rstrip("/").encode())
    for i in infos:
        h.update(f"\n{i.path}:{i.size}:{i.mtime_ns}".encode())
    dest = cache_root() / "uri" / h.hexdigest()[:32]
    if dest.is_dir():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / temp_name(dest.name)
    shutil.rmtree(tmp, ignore_errors=True)
    from tqdm import tqdm

    total = sum(i.size or 0 for i in infos)
    try:
        # A bar for real checkpoints (GBs); the toy's few MB copy silently.
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"copying {path}",
                  disable=total < (64 << 20)) as bar:
            for i in infos:
                rel = i.path[len(root.rstrip("/")) + 1:]
                copy(join(path, rel), str(tmp / rel))
                bar.update(i.size or 0)
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node finished the same copy first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
