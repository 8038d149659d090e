"""What `odpo` prints: each command's summary (`summary_lines`, one formatter for every stage), on a
terminal a progress bar per Ray Data pass or training run, and nothing else. The rest (Ray's and
vLLM's logs, the Ray workers' output, warnings) goes to the command's log: `odpo.log` in its output
directory (`RUN_DIR/odpo.log` for iterate and byod), `NAME.log` beside a file output (eval's
`--out NAME.json`). A run appends its part, so a skipped re-run keeps the log of the run that did
the work. `-v` shows all of it live instead, as Ray and vLLM print it, and writes no log.

How `quiet` does it, for the command's duration:
- file descriptors 1 and 2 point at the log: that takes what C++ (Ray's core worker), child
  processes and handlers made before the command write;
- `sys.stdout` passes the main thread's writes (odpo's own lines) to the terminal and other
  threads' (Ray's printer of what the workers print) to the log;
- `sys.stderr` passes tqdm's drawing of progress bars (writes that start with a carriage return or
  a cursor move) to the terminal, when it is one, and all else (logging, warnings, the workers'
  stderr) to the log.
Until the command knows where its output is, the log is a temporary file; a failed command keeps
it there and names it in its error line.
"""

from __future__ import annotations

import contextlib
import io
import os
import string
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from pipeline import storage

# ---------------------------------------------------------------- the one summary formatter

# Each command's summary line as parts formatted with its summary dict. A part whose fields are
# missing or None is left out; a part given as (condition, text) is shown only when the condition
# holds: "key" (truthy), "!key" (falsy) or "key=value". `dropped` ({reason: rows}) reads as
# "reason n, ..." or "none". Stage lines end alike (`_END`): a skip says so, then the time and
# where the output went.
_END = (("skipped", ", skipped: up to date"), ", in {seconds:.1f}s", " -> {out}")
SUMMARIES: dict[str, tuple] = {
    "toy init": ("toy model written to {out}",),
    "toy data": ("addition data in {out}: sft.parquet ({sft_rows} rows), prompts.parquet "
                 "({prompts}), heldout.parquet ({heldout}; disjoint from the others)",),
    "sample": ("sample: {prompts} prompts -> {samples} samples ({prompts_sampled} prompts x k={k}; "
               "dropped prompts: {dropped})",
               ("!skipped", ", {stats[samples_per_s]:.1f} samples/s, "
                            "{stats[response_tokens_per_s]:.0f} tokens/s"), *_END),
    "score": ("score: {samples} samples -> {scored} scored (dropped: {dropped})",
              ", mean score {stats[mean_score]:.4f}", " (share correct {stats[share_correct]:.4f})",
              *_END),
    "pair": ("pair ({mode}): {prompts} prompts -> {pairs} pairs from {prompts_paired} prompts "
             "(dropped prompts: {dropped})", *_END),
    "precompute": ("precompute: {pairs} pairs (dropped: {dropped}), cache {cache}",
                   ("cache=hit", " from {source}"),
                   ("cache=computed", ": {stats[tokens]} tokens at {stats[tokens_per_s]:.0f} "
                    "tokens/s, padding {stats[padding_fraction]:.1%}, {stats[truncated_pairs]} "
                    "pairs truncated"),
                   ("cache=computed", ", {stats[layout]} layout on {stats[replicas]} x "
                    "{stats[torch_threads]} threads"),
                   " (key {key:.16})", *_END),
    "import": ("import ({form}, prompt from {prompt_source}): {rows} rows -> {pairs} pairs "
               "(dropped: {dropped})",
               "; common-prefix prompt found in {prompt_extraction[extracted]} rows, failed in "
               "{prompt_extraction[failed]}", *_END),
    "sft": ("sft: {steps} steps on {rows} rows in {train_s:.0f}s",
            ("dropped", " (dropped rows: {dropped})"), ("skipped", ", skipped: up to date"),
            "; held-out reward greedy {eval[greedy_reward]:.3f}, sampled "
            "{eval[sampled_reward]:.3f} ({eval[num_prompts]} prompts)", " -> {model}"),
    "train": ("train: {steps} steps on {pairs} pairs ({ref_logps} ref_logps",
              ("pairs_left_over_per_epoch", "; {pairs_left_over_per_epoch} pairs past the last "
                                            "full batch of each epoch"),
              ") in {train_s:.0f}s", ("skipped", ", skipped: up to date"), " -> {model}"),
    "eval": ("eval {model}: greedy {greedy_reward:.3f}, sampled {sampled_reward:.3f} on "
             "{num_prompts} prompts", ("skipped", ", skipped: up to date"), " -> {out}"),
    "round": ("round {round}: greedy {greedy_reward:.3f}, sampled {sampled_reward:.3f}  "
              "({policy})",),
    "iterate": ("iterate: {rounds_run} rounds in {wall_s:.0f}s; report: {report}",),  # + EACH
    "byod": ("byod: {import[pairs]} pairs, SFT-on-chosen {sft[steps]} steps, precompute "
             "{precompute[cache]}, DPO {train[steps]} steps in {wall_s:.0f}s -> {train[model]}",),
    "sweep": ("{table}sweep: {n_variants} variants in {wall_s:.0f}s; report: {report}",),
    "report": ("report: {path}",),
}
# Commands whose summary holds a list to print a line each of first: {command: (key, spec)}.
EACH = {"iterate": ("rounds", "round")}
_FORMAT = string.Formatter()


def _holds(condition: str, summary: dict) -> bool:
    key, eq, value = condition.lstrip("!").partition("=")
    got = summary.get(key)
    held = str(got) == value if eq else bool(got)
    return held != condition.startswith("!")


def _part(text: str, summary: dict) -> str:
    """`text` formatted with `summary`, or "" when a field it names is missing or None."""
    try:
        for _, field, _, _ in _FORMAT.parse(text):
            if field is not None and _FORMAT.get_field(field, (), summary)[0] is None:
                return ""
        return _FORMAT.vformat(text, (), summary)
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


def summary_lines(command: str, summary: dict) -> list[str]:
    """The lines the CLI prints for `command`'s summary dict: its `SUMMARIES` parts, after a line
    for each item of a list it holds (`EACH`: iterate's rounds)."""
    lines = []
    if command in EACH:
        key, item = EACH[command]
        lines += [line for x in summary.get(key, []) for line in summary_lines(item, x)]
    view = dict(summary)
    if isinstance(summary.get("dropped"), dict):
        view["dropped"] = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    line = ""
    for part in SUMMARIES[command]:
        condition, text = part if isinstance(part, tuple) else ("", part)
        if not condition or _holds(condition, summary):
            line += _part(text, view)
    return lines + [line]


def show(command: str, summary: dict, log: str | None = None) -> None:
    """Print `command`'s summary; the command's log goes in (a directory) or beside (a file) `log`,
    usually the output path."""
    for line in summary_lines(command, summary):
        print(line, flush=True)
    if log and _session is not None:
        _session.dest = log


# ---------------------------------------------------------------- quiet by default

_session: _Log | None = None  # the quiet command running now


class _Log:
    """A command's log: a temporary file while it runs, then appended to `odpo.log` in (or
    beside) `dest`."""

    def __init__(self, command: str):
        fd, self.path = tempfile.mkstemp(prefix=f"odpo-{command.replace(' ', '-')}-",
                                         suffix=".log")
        os.close(fd)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.file.write(f"==== odpo {command} ({time.strftime('%Y-%m-%d %H:%M:%S')}, "
                        f"pid {os.getpid()})\n")
        self.header = self.file.tell()
        self.dest: str | None = None  # where the output went (`show`)
        self.kept: str | None = None  # where the log is after the command, when not moved

    def finish(self) -> None:
        """Append the log to `dest`'s; a log without a `dest` stays where it is (when it holds
        anything)."""
        self.file.close()
        with open(self.path, "rb") as f:
            body = f.read()
        if self.dest:
            try:
                target = (storage.join(self.dest, "odpo.log") if storage.is_dir(self.dest)
                          else os.path.splitext(self.dest)[0] + ".log")
                if storage.is_uri(target):
                    old = storage.read_bytes(target) if storage.exists(target) else b""
                    storage.write_bytes(target, old + body)
                else:
                    with open(target, "ab") as f:
                        f.write(body)
                os.unlink(self.path)
                self.kept = target
                return
            except Exception:  # noqa: BLE001 - the command's work is done: keep the log here
                pass
        if len(body) > self.header:
            self.kept = self.path
        else:
            os.unlink(self.path)

    def note(self) -> str:
        """` (log: PATH)` for an error line, when a failed command left a log to read."""
        return f" (log: {self.kept})" if self.kept else ""


class _MainThreadOut(io.TextIOBase):
    """`sys.stdout` of a quiet command: the main thread's writes go to the terminal, other
    threads' (Ray's printer of the workers' output) to the log."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, s: str) -> int:
        main = threading.current_thread() is threading.main_thread()
        return (self.terminal if main else self.log).write(s)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def release(self, stream) -> None:
        """After the command: whatever still holds this stream (a progress bar closed late, a
        thread) writes to `stream`, the one it replaced."""
        self.terminal = self.log = stream

    def isatty(self) -> bool:  # Ray Data draws bars on a terminal, else logs its progress
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self):
        return getattr(self.terminal, "encoding", "utf-8")


class _BarsOut(_MainThreadOut):
    """`sys.stderr` of a quiet command: tqdm's drawing of progress bars goes to the terminal when
    it is one, everything else to the log."""

    def __init__(self, terminal, log):
        super().__init__(terminal, log)
        self.bars = terminal.isatty()
        self.last_bar = False  # the newlines tqdm writes between bars go where the bar went
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            bar = self.bars and (s.startswith(("\r", "\x1b[A", "\x1b[K"))
                                 or (self.last_bar and not s.strip("\n")))
            self.last_bar = bar
            return (self.terminal if bar else self.log).write(s)


def _terminal(stream, fd: int, saved: int):
    """What reaches the user: `stream` itself, or, when it writes to `fd` (about to point at the
    log), a stream on `saved` (a copy of `fd`)."""
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream  # e.g. pytest's capsys
    return open(saved, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace", closefd=False)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


def _name_ray_logs(log: _Log) -> None:
    """Say in the log where Ray keeps its own: every worker's output (also what the driver was
    not sent: `log_to_driver=False`, or a line still on its way at the end), raylet, Ray Data."""
    log.file.flush()
    if not _ray_up() or os.fstat(log.file.fileno()).st_size <= log.header:  # nothing to add to
        return
    try:
        node = sys.modules["ray"]._private.worker._global_node  # no public API names it
        log.file.write(f"==== Ray's own logs (workers, raylet, Ray Data) of this session: "
                       f"{node.get_logs_dir_path()} (on the head node)\n")
    except Exception:  # a Ray without that attribute: the log just does not say
        pass


@contextlib.contextmanager
def quiet(command: str, enabled: bool = True, stop_ray: bool = False) -> Iterator[_Log | None]:
    """Run a command's body with everything but its own lines (and, on a terminal, tqdm's progress
    bars) going to its log (module docstring). Yields the `_Log` (None when not `enabled`): after
    the block, `kept` says where the log is.

    `stop_ray` (the command is the process's, about to exit): a Ray that the block started or
    joined is shut down before the block ends, so that what Ray and the workers print on the way
    out (vLLM's "engine core exited") goes to the log, not after the summary."""
    global _session
    if not enabled or _session is not None:  # -v, or inside a quiet command already
        yield None
        return
    log = _Log(command)
    sys.stdout.flush()
    sys.stderr.flush()
    entry = (sys.stdout, sys.stderr)
    saved = (os.dup(1), os.dup(2))
    terminals = (_terminal(entry[0], 1, saved[0]), _terminal(entry[1], 2, saved[1]))
    color = os.environ.get("RAY_COLOR_PREFIX")
    os.environ["RAY_COLOR_PREFIX"] = "0"  # no colour codes in the log
    ray_was_up = _ray_up()
    os.dup2(log.file.fileno(), 1)
    os.dup2(log.file.fileno(), 2)
    ours = (_MainThreadOut(terminals[0], log.file), _BarsOut(terminals[1], log.file))
    sys.stdout, sys.stderr = ours
    _session = log
    try:
        yield log
    finally:
        try:
            _name_ray_logs(log)
            if stop_ray and not ray_was_up and _ray_up():
                sys.modules["ray"].shutdown()
        finally:
            _session = None
            for stream in (*ours, *terminals):
                with contextlib.suppress(Exception):
                    stream.flush()
            for stream, replaced in zip(ours, entry, strict=True):
                stream.release(replaced)
            sys.stdout, sys.stderr = entry
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            if color is None:
                os.environ.pop("RAY_COLOR_PREFIX", None)
            else:
                os.environ["RAY_COLOR_PREFIX"] = color
            log.finish()
