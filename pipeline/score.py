"""`odpo score`: the samples scored as a Ray Data stage.

Ray Data tasks call a function scorer (`pipeline.scorers`: a verifier, a user's function) on
batches of rows; a reward model is loaded once per actor of an actor pool. Output: the samples'
columns, unchanged (`response_token_ids` included), plus `score` (float64). A response cut at
max_tokens (`finish_reason` "length") is dropped before scoring, counted as `truncated`: it is no
complete answer, and an EOS after it would teach the model to stop there (`keep_truncated` keeps
it; it is then trained on without an EOS, as it was sampled).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import check_checkpoint, checkpoint_digest
from pipeline.cluster import check_copies, copy_count, copy_threads
from pipeline.errors import UserError
from pipeline.manifest import input_digest
from pipeline.scorers import RewardModelScorer, is_file_scorer, load_scorer, resolve_scorer
from pipeline.stage import Shards, read_rows, read_stage, run_stage
from pipeline.storage import local_copy, resolve_path

STAGE = "score"
# Each row's own columns; every other column (e.g. `answer`) is the row's metadata.
ROW_ID_COLUMNS = ("prompt_id", "sample_index")
NONFINITE_MODES = ("error", "drop")
TRUNCATED = "length"  # vLLM's finish_reason for a response cut at max_tokens
RM_DTYPES = ("float32", "bfloat16", "float16")
# The run's summary: {its key: the manifest's key}.
SUMMARY = {"samples": "rows_in", "scored": "rows_out", "dropped": "dropped", "stats": "stats"}


@dataclass(frozen=True)
class ScoreConfig:
    samples: str  # `odpo sample` output dir, or Parquet/JSONL with `prompt`, `response` (+ meta)
    out: str  # output stage directory: Parquet shards + manifest.json
    # exact (verifier on the row's `answer`) | addition | reward_model | `module:function` |
    # `path/to/file.py:function`; no default: what counts as better is the user's choice
    scorer: str
    reward_model: str | None = None  # local AutoModelForSequenceClassification dir (num_labels 1)
    rm_dtype: str = "float32"  # reward model weights: float32 | bfloat16 | float16
    rm_max_length: int = 0  # tokens of prompt + response; 0 = the model's context. Longer texts
    # lose their start (left truncation): the reward is read at the last token
    nonfinite: str = "error"  # a NaN/inf score: error (names the row) | drop (counted)
    batch_size: int = 256  # rows per scorer call (a reward model forwards rm_batch_size at once)
    rm_batch_size: int = 32  # sequences per reward-model forward: bounds activation memory
    # scorer copies running in parallel (reward-model actors, function-scorer tasks); 0 = auto:
    # with no cluster named, one per local GPU under use_gpu, else 1 (pipeline.cluster.copy_count)
    replicas: int = 0
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per copy
    # a reward model's intra-op threads per actor; 0 = auto: with no cluster named, this
    # machine's CPUs shared out among the replicas, on a named one cpus_per_replica
    # (pipeline.cluster.copy_threads)
    torch_threads: int = 0
    use_gpu: bool = False  # one GPU per replica (reward model)
    # Score (and so pair and train on) responses cut at max_tokens; off: they are dropped and
    # counted as `truncated` (an unfinished response is neither a good chosen nor a fair rejected)
    keep_truncated: bool = False


def make_scorer(cfg: ScoreConfig) -> Callable:
    """The callable `cfg.scorer` names (a reward model is loaded here: call it in the actor)."""
    if cfg.scorer != "reward_model":
        return load_scorer(cfg.scorer)
    import torch

    if not cfg.use_gpu:  # sized on the driver (`sized`), where the cluster is known
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_replica)))
    return RewardModelScorer(
        cfg.reward_model, dtype=cfg.rm_dtype, max_length=cfg.rm_max_length,
        batch_size=cfg.rm_batch_size, device="cuda" if cfg.use_gpu else "cpu",
    )


def sized(cfg: ScoreConfig) -> ScoreConfig:
    """`cfg` with `replicas` and `torch_threads` as the actors run them: the set ones kept, auto
    (0) sized to the machine (`pipeline.cluster.copy_count`, `copy_threads`). Call it once Ray
    is up."""
    replicas = copy_count(cfg.replicas, cfg.use_gpu)
    return dataclasses.replace(cfg, replicas=replicas, torch_threads=copy_threads(
        cfg.torch_threads, replicas, cfg.cpus_per_replica))


def _row_name(row: dict, i: int) -> str:
    if all(c in row for c in ROW_ID_COLUMNS):
        return f"prompt_id={row['prompt_id']} sample_index={row['sample_index']}"
    return f"row {i} of its batch (prompt {str(row.get('prompt'))[:40]!r})"


def score_rows(fn: Callable, name: str, rows: list[dict], nonfinite: str) -> list[float]:
    """Call scorer `fn` on rows (dicts with `prompt`, `response` + metadata); check its answer.

    A scorer that raises is called again one row at a time to name the row that fails. Returns
    one float per row; non-finite values are kept for `nonfinite="drop"` (the stage counts and
    drops them) and are an error naming the row for `nonfinite="error"`."""
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    try:
        values = fn(prompts, responses, rows)
    except UserError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - the user's scorer: name it and the row
        for i, row in enumerate(rows):
            try:
                fn([row["prompt"]], [row["response"]], [row])
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"scorer {name!r} raised on {_row_name(row, i)}: {type(e).__name__}: {e}"
                ) from e
        raise UserError(
            f"scorer {name!r} raised on a batch of {len(rows)} rows (on none alone): "
            f"{type(batch_error).__name__}: {batch_error}"
        ) from batch_error
    try:
        values = list(values)
    except TypeError as e:
        raise UserError(f"scorer {name!r} returned {type(values).__name__}, not a list") from e
    if len(values) != len(rows):
        raise UserError(f"scorer {name!r} returned {len(values)} scores for {len(rows)} rows")
    scores = []
    for i, (v, row) in enumerate(zip(values, rows, strict=True)):
        try:
            x = float(v)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"scorer {name!r} returned {v!r} (not a number) for {_row_name(row, i)}"
            ) from e
        if not math.isfinite(x) and nonfinite == "error":
            raise UserError(
                f"scorer {name!r} returned {x} for {_row_name(row, i)}; fix the scorer or pass "
                f"--nonfinite drop to drop and count such rows"
            )
        scores.append(x)
    return scores


def _with_scores(table: pa.Table, fn: Callable, name: str, nonfinite: str) -> pa.Table:
    scores = score_rows(fn, name, table.to_pylist(), nonfinite)
    return table.append_column("score", pa.array(scores, type=pa.float64()))


class ScoreBatch:
    """Ray Data actor for a reward model: loads its weights once; each call appends `score` to
    a batch of rows."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.fn = make_scorer(cfg)

    def __call__(self, table):
        return _with_scores(table, self.fn, self.cfg.reward_model, self.cfg.nonfinite)


# What this process loaded: {scorer spec: (its source digest then, the function)}.
_LOADED: dict[str, tuple[str, Callable]] = {}


def _function_scorer(scorer: str, digest: str) -> Callable:
    """The function `scorer` names, as of source `digest`. A pooled worker keeps what it
    imported: a file scorer is loaded by its contents (`load_scorer`); a module that changed
    since this process imported it is reloaded."""
    loaded = _LOADED.get(scorer)
    if loaded is None or loaded[0] != digest:
        fn = load_scorer(scorer)
        if loaded is not None and not is_file_scorer(scorer):
            importlib.reload(sys.modules[fn.__module__])
            fn = load_scorer(scorer)
        _LOADED[scorer] = (digest, fn)
    return _LOADED[scorer][1]


def score_batch(table: pa.Table, scorer: str, nonfinite: str, digest: str) -> pa.Table:
    """Ray Data task for a function scorer (a verifier, `module:function`, `file.py:function`):
    `table` with `score` appended. A task, not an actor: nothing heavy to hold, and a pooled
    worker starts no process. `digest`: the scorer's source as the stage was keyed on
    (`_scorer_digest`)."""
    return _with_scores(table, _function_scorer(scorer, digest), scorer, nonfinite)


def _drop_truncated(ds):
    """(`ds` without the responses cut at max_tokens, how many there were)."""
    if "finish_reason" not in ds.schema().names:
        return ds, 0
    # Finish reasons come to the driver (a short string a row) to count the cut ones.
    reasons = ds.select_columns(["finish_reason"]).iter_batches(batch_format="numpy",
                                                                batch_size=None)
    cut = int(sum((b["finish_reason"] == TRUNCATED).sum() for b in reasons))
    return (ds.map_batches(_finished, batch_format="pyarrow"), cut) if cut else (ds, 0)


def _finished(table):
    return table.filter(pc.fill_null(pc.not_equal(table["finish_reason"], TRUNCATED), True))


def _drop_nonfinite(scored):
    """(`scored` computed, without its NaN / inf scores; how many there were)."""
    scored = scored.materialize()
    # Scores come to the driver (8 bytes a row) to count what is dropped.
    values = [b["score"] for b in scored.select_columns(["score"]).iter_batches(
        batch_format="numpy", batch_size=None)]
    bad = int((~np.isfinite(np.concatenate(values or [np.zeros(0)]))).sum())
    return (scored.map_batches(_finite, batch_format="pyarrow"), bad) if bad else (scored, 0)


def _finite(table):
    return table.filter(pc.is_finite(table["score"]))


def _validate(cfg: ScoreConfig) -> None:
    if cfg.nonfinite not in NONFINITE_MODES:
        raise UserError(f"nonfinite must be one of {NONFINITE_MODES}, got {cfg.nonfinite!r}")
    if cfg.rm_dtype not in RM_DTYPES:
        raise UserError(f"rm_dtype must be one of {RM_DTYPES}, got {cfg.rm_dtype!r}")
    for name in ("batch_size", "rm_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    check_copies(cfg.replicas, cfg.torch_threads, cfg.cpus_per_replica)
    if cfg.scorer == "reward_model":
        if not cfg.reward_model:
            raise UserError("scorer reward_model needs --reward-model PATH (an HF dir or URI)")
        if not storage.is_dir(cfg.reward_model):
            raise UserError(f"reward model {cfg.reward_model}: no such directory")
        check_checkpoint(cfg.reward_model, "reward model")
    elif cfg.reward_model:
        raise UserError(f"--reward-model is set but scorer is {cfg.scorer!r}; use "
                        f"--scorer reward_model")


def _scorer_digest(scorer: str, fn: Callable) -> str:
    """What a function scorer's scores depend on besides the samples: its source file (an
    edited scorer re-scores)."""
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        source = None
    return input_digest(source) if source else scorer


def run_score(cfg: ScoreConfig) -> dict:
    """Score every sample into `cfg.out` (skipped when already current)."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(
        cfg, samples=resolve_path(cfg.samples), out=storage.absolute(cfg.out),
        reward_model=resolve_path(cfg.reward_model), scorer=resolve_scorer(cfg.scorer),
    )
    _validate(cfg)
    fn = None if cfg.scorer == "reward_model" else make_scorer(cfg)  # import errors fail here
    verifier = ("answer",) if cfg.scorer in ("exact", "addition") else ()
    up = read_stage(cfg.samples, ("sample",), ("prompt", "response") + verifier, flag="--samples")
    digest = (checkpoint_digest(local_copy(cfg.reward_model, "reward model")) if fn is None
              else _scorer_digest(cfg.scorer, fn))
    inputs = {"samples": input_digest(cfg.samples), "scorer": digest}
    # The sampling tokenizer's vocabulary, passed on for the precompute stage's check.
    vocab = (up.manifest or {}).get("tokenizer_vocab")
    extra = {"tokenizer_vocab": vocab} if vocab else {}

    def build() -> Shards:
        import ray

        ds = read_rows(up)
        if ds is None:
            return Shards(None, 0, extra={**extra, "stats": {}})
        if "score" in ds.schema().names:
            raise UserError(f"{cfg.samples}: already has a `score` column; score the samples")
        t = time.perf_counter()
        rows_in = ds.count()  # reads the input: its errors are named
        ds, cut = (ds, 0) if cfg.keep_truncated else _drop_truncated(ds)
        copies = sized(cfg)
        each = {"batch_size": cfg.batch_size, "batch_format": "pyarrow",
                "num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.use_gpu else None}
        if cfg.scorer == "reward_model":
            scored = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"cfg": copies}, **each,
                                    compute=ray.data.ActorPoolStrategy(size=copies.replicas))
        else:
            scored = ds.map_batches(score_batch, concurrency=copies.replicas, **each, fn_kwargs={
                "scorer": cfg.scorer, "nonfinite": cfg.nonfinite, "digest": digest})
        scored, bad = _drop_nonfinite(scored) if cfg.nonfinite == "drop" else (scored, 0)
        dropped = {k: n for k, n in (("truncated", cut), ("nonfinite_score", bad)) if n}
        return Shards(scored, rows_in, dropped, extra=extra,
                      after=lambda tmp: {"stats": _stats(tmp, time.perf_counter() - t)})

    return run_stage(cfg.out, STAGE, dataclasses.asdict(cfg), inputs, build, summary=SUMMARY,
                     started=t0, sources={"--samples": cfg.samples},
                     reads={"--samples": cfg.samples, "--reward-model": cfg.reward_model})


def _stats(directory: str, seconds: float) -> dict:
    tables = [pq.read_table(f, columns=["score"])
              for f in storage.list_files(directory, (".parquet",))]
    if not tables:
        return {"score_s": seconds}
    s = pa.concat_tables(tables)["score"]
    stats = {
        "score_s": seconds,
        "rows_per_s": len(s) / seconds if seconds > 0 else 0.0,
        "mean_score": pc.mean(s).as_py(),
        "min_score": pc.min(s).as_py(),
        "max_score": pc.max(s).as_py(),
    }
    if pc.all(pc.is_in(s, pa.array([0.0, 1.0]))).as_py():
        stats["share_correct"] = stats["mean_score"]  # a verifier's 0/1 scores
    return stats
