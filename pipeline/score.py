"""Scorers: (prompts, responses, rows) -> list[float]."""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import check_checkpoint, config_context_length
from pipeline.errors import UserError

BUILTIN_SCORERS = {
    "addition": "pipeline.tasks.addition:verify",
    "exact": "pipeline.score:exact_answer",
}


def load_scorer(spec: str) -> Callable:
    """A scorer from `module:function`, `path/to/file.py:function`, or a built-in task name."""
    if spec.rsplit(":", 1)[0].endswith(".py"):
        return load_scorer_file(spec)
    target = BUILTIN_SCORERS.get(spec, spec)
    if ":" not in target:
        raise UserError(
            f"scorer {spec!r}: expected `module:function` or one of {sorted(BUILTIN_SCORERS)}"
        )
    module_name, fn_name = target.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"scorer {spec!r}: cannot import: {e}") from e
    if not callable(fn):
        raise UserError(f"scorer {spec!r} is not callable")
    return fn


# ---------------------------------------------------------------- the `odpo score` stage
#
# Scorers run as a Ray Data stage over the samples: an actor pool whose actors load the scorer
# once (a reward model's weights, a user module) and call it on batches of rows. Output: the
# samples' columns, unchanged (`response_token_ids` included), plus `score` (float64).
# A response cut at max_tokens (`finish_reason` "length") is dropped before scoring, counted as
# `truncated`: it is no complete answer, and an EOS after it would teach the model to stop there
# (`keep_truncated` keeps it; it is then trained on without an EOS, as it was sampled).

STAGE = "score"
SAMPLE_STAGE = "sample"
# Each row's own columns; every other column (e.g. `answer`) is the row's metadata.
ROW_ID_COLUMNS = ("prompt_id", "sample_index")
NONFINITE_MODES = ("error", "drop")
TRUNCATED = "length"  # vLLM's finish_reason for a response cut at max_tokens
RM_DTYPES = ("float32", "bfloat16", "float16")


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
    replicas: int = 1  # scorer copies (Ray Data actors) running in parallel
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per actor (torch threads for a model)
    use_gpu: bool = False  # one GPU per replica (reward model)
    # Score (and so pair and train on) responses cut at max_tokens; off: they are dropped and
    # counted as `truncated` (an unfinished response is neither a good chosen nor a fair rejected)
    keep_truncated: bool = False


def exact_answer(prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]) -> list:
    """Exact-answer verifier (Iterative RPO's correct / incorrect): 1.0 when the response,
    stripped of surrounding whitespace, equals the row's `answer`, else 0.0."""
    return [
        1.0 if str(resp).strip() == str(row["answer"]).strip() else 0.0
        for resp, row in zip(responses, rows, strict=True)
    ]


def load_scorer_file(spec: str) -> Callable:
    """A scorer from `path/to/file.py:function` (the file need not be on sys.path)."""
    import importlib.util

    path, fn_name = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"scorer {spec!r}: {path}: no such file")
    module_name = "odpo_scorer_" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, p)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: any error is theirs to fix
            raise UserError(f"scorer {spec!r}: importing {path} failed: {e!r}") from e
        sys.modules[module_name] = module
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"scorer {spec!r}: {path} has no callable {fn_name!r}")
    return fn


class RewardModelScorer:
    """A scorer (prompts, responses, rows) -> rewards from a local
    `AutoModelForSequenceClassification` with one label: the logit the model reads at the last
    non-padding token of prompt + response (the tokenizer's chat template when it has one)."""

    def __init__(self, path: str, *, dtype: str = "float32", max_length: int = 0,
                 batch_size: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.storage import local_copy

        try:
            files = local_copy(path, "reward model")  # a URI: this node's copy
            self.tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                files, dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise UserError(f"reward model {path}: cannot load ({str(e).splitlines()[0]})") from e
        if self.model.config.num_labels != 1:
            raise UserError(
                f"reward model {path}: has {self.model.config.num_labels} labels; a reward model "
                f"has exactly one (num_labels=1)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds the last real token through pad_token_id: it must agree.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        context = config_context_length(self.model.config.to_dict()) or 2048
        self.max_length = min(max_length or context, context)
        self.batch_size = batch_size
        self.device = device
        self.model.to(device).eval()

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        if self.tokenizer.chat_template:
            return [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
        return [p + r for p, r in zip(prompts, responses, strict=True)]

    def __call__(self, prompts, responses, rows) -> list[float]:
        import torch

        texts = self.texts(prompts, responses)
        special = not self.tokenizer.chat_template  # a template writes its own BOS
        scores: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size], padding=True, truncation=True,
                    max_length=self.max_length, add_special_tokens=special, return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


def make_scorer(cfg: ScoreConfig) -> Callable:
    """The callable `cfg.scorer` names (a reward model is loaded here: call it in the actor)."""
    if cfg.scorer == "reward_model":
        import torch

        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        return RewardModelScorer(
            cfg.reward_model, dtype=cfg.rm_dtype, max_length=cfg.rm_max_length,
            batch_size=cfg.rm_batch_size, device="cuda" if cfg.use_gpu else "cpu",
        )
    module = cfg.scorer.rsplit(":", 1)[0]
    if module.endswith(".py"):
        return load_scorer_file(cfg.scorer)
    return load_scorer(cfg.scorer)


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


class ScoreBatch:
    """Ray Data actor: loads the scorer once; each call appends `score` to a batch of rows."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.name = cfg.reward_model if cfg.scorer == "reward_model" else cfg.scorer
        self.fn = make_scorer(cfg)

    def __call__(self, table):
        import pyarrow as pa

        scores = score_rows(self.fn, self.name, table.to_pylist(), self.cfg.nonfinite)
        return table.append_column("score", pa.array(scores, type=pa.float64()))


def _drop_truncated(table):
    import pyarrow.compute as pc

    return table.filter(pc.fill_null(pc.not_equal(table["finish_reason"], TRUNCATED), True))


def _keep_finite(table):
    import pyarrow.compute as pc

    return table.filter(pc.is_finite(table["score"]))


def _validate(cfg: ScoreConfig) -> None:
    if cfg.nonfinite not in NONFINITE_MODES:
        raise UserError(f"nonfinite must be one of {NONFINITE_MODES}, got {cfg.nonfinite!r}")
    if cfg.rm_dtype not in RM_DTYPES:
        raise UserError(f"rm_dtype must be one of {RM_DTYPES}, got {cfg.rm_dtype!r}")
    for name in ("batch_size", "rm_batch_size", "replicas"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.scorer == "reward_model":
        if not cfg.reward_model:
            raise UserError("scorer reward_model needs --reward-model PATH (an HF dir or URI)")
        from pipeline import storage

        if not storage.is_dir(cfg.reward_model):
            raise UserError(f"reward model {cfg.reward_model}: no such directory")
        check_checkpoint(cfg.reward_model, "reward model")
    elif cfg.reward_model:
        raise UserError(f"--reward-model is set but scorer is {cfg.scorer!r}; use "
                        f"--scorer reward_model")


def _scorer_digest(cfg: ScoreConfig, fn: Callable | None) -> str:
    """What the scores depend on besides the samples: the reward model's files, or the source
    file of the scoring function (an edited scorer re-scores)."""
    import inspect

    from pipeline.manifest import input_digest

    if cfg.scorer == "reward_model":
        from pipeline.checkpoint import checkpoint_digest
        from pipeline.storage import local_copy

        return checkpoint_digest(local_copy(cfg.reward_model, "reward model"))
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        source = None
    return input_digest(source) if source else cfg.scorer


def _sample_files(samples: str) -> list[str] | None:
    """Shard files of a sample stage dir (checked against its manifest), or None for plain
    data without a manifest."""
    from pipeline import storage
    from pipeline.manifest import read_manifest, verify_shards

    manifest = read_manifest(samples) if storage.is_dir(samples) else None
    if manifest is None:
        return None
    if manifest.get("stage") != SAMPLE_STAGE:
        raise UserError(
            f"{samples} holds '{manifest.get('stage')}' output; --samples needs the output of "
            f"`odpo sample`"
        )
    verify_shards(samples, SAMPLE_STAGE)
    return [storage.join(samples, f["name"]) for f in manifest["files"]]


def run_score(cfg: ScoreConfig, start_ray: Callable[[], None] | None = None) -> dict:
    """Score every sample into `cfg.out` (skipped when already current). Needs Ray:
    `start_ray` is called once the stage knows it has work."""
    import dataclasses
    import time

    import numpy as np
    import ray

    from pipeline import storage
    from pipeline.errors import user_errors
    from pipeline.manifest import input_digest, is_current, read_manifest, write_stage
    from pipeline.sample import write_shards
    from pipeline.storage import resolve_path
    from pipeline.tables import read_ray_dataset

    t0 = time.perf_counter()
    cfg = dataclasses.replace(
        cfg, samples=resolve_path(cfg.samples), out=storage.absolute(cfg.out),
        reward_model=resolve_path(cfg.reward_model),
        scorer=_resolve_scorer_path(cfg.scorer),
    )
    _validate(cfg)
    samples = cfg.samples
    if not storage.exists(samples):
        raise UserError(f"{cfg.samples}: no such file or directory")
    if storage.same(samples, cfg.out):
        raise UserError(f"--out {cfg.out} is the --samples directory; choose another directory")
    fn = None if cfg.scorer == "reward_model" else make_scorer(cfg)  # import errors fail here
    files = _sample_files(samples)
    inputs = {"samples": input_digest(samples), "scorer": _scorer_digest(cfg, fn)}
    config = dataclasses.asdict(cfg)
    if is_current(cfg.out, STAGE, config, inputs):
        return _score_summary(read_manifest(cfg.out), cfg.out, t0, skipped=True)
    if start_ray is not None:
        start_ray()

    required = ("prompt", "response") + (("answer",) if cfg.scorer in ("exact", "addition")
                                         else ())
    if files is None:
        ds = read_ray_dataset(cfg.samples, required=required)
    else:
        if not files:
            ds = None
        else:
            ds = ray.data.read_parquet(files)
            missing = [c for c in required if c not in ds.schema().names]
            if missing:
                raise UserError(f"{cfg.samples}: missing column(s) {missing} (scorer "
                                f"{cfg.scorer!r} reads them)")
    if ds is not None and "score" in ds.schema().names:
        raise UserError(f"{cfg.samples}: already has a `score` column; score the samples")

    stats: dict = {}
    # The sampling tokenizer's vocabulary, passed on for the reference stage's check.
    vocab = (read_manifest(samples) or {}).get("tokenizer_vocab") if files is not None else None

    def write(tmp: str) -> None:
        if ds is None:
            return
        kept = ds
        if not cfg.keep_truncated and "finish_reason" in ds.schema().names:
            # Finish reasons come to the driver (a short string a row) to count the cut ones.
            reasons = [b["finish_reason"] for b in ds.select_columns(["finish_reason"])
                       .iter_batches(batch_format="numpy", batch_size=None)]
            cut = int(sum((r == TRUNCATED).sum() for r in reasons))
            if cut:
                dropped["truncated"] = cut
                kept = ds.map_batches(_drop_truncated, batch_format="pyarrow")
        scored = kept.map_batches(
            ScoreBatch,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
            fn_constructor_kwargs={"cfg": cfg},
            num_cpus=cfg.cpus_per_replica,
            num_gpus=1 if cfg.use_gpu else None,
        )
        if cfg.nonfinite == "drop":
            # Scores come to the driver (8 bytes a row) to count what is dropped.
            scored = scored.materialize()
            values = np.concatenate([
                b["score"] for b in scored.select_columns(["score"]).iter_batches(
                    batch_format="numpy", batch_size=None)
            ]) if scored.count() else np.zeros(0)
            bad = int((~np.isfinite(values)).sum())
            if bad:
                dropped["nonfinite_score"] = bad
                scored = scored.map_batches(_keep_finite, batch_format="pyarrow")
        write_shards(scored, tmp)
        stats.update(_score_stats(tmp, time.perf_counter() - t_score))

    dropped: dict[str, int] = {}
    t_score = time.perf_counter()
    with user_errors():
        rows_in = ds.count() if ds is not None else 0  # reads the input: its errors are named
        manifest = write_stage(cfg.out, STAGE, config, inputs, write, rows_in=rows_in,
                               dropped=dropped, extra={"stats": stats, **(
                                   {"tokenizer_vocab": vocab} if vocab else {})})
    return _score_summary(manifest, cfg.out, t0, skipped=False)


def _resolve_scorer_path(spec: str) -> str:
    """`path/to/file.py:function` made absolute (Ray workers run elsewhere)."""
    from pipeline.storage import resolve_path

    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, fn = spec.rsplit(":", 1)
        return f"{resolve_path(path)}:{fn}"
    return spec


def _score_stats(directory: str, seconds: float) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage

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


def _score_summary(manifest: dict, out: str, t0: float, skipped: bool) -> dict:
    import time

    return {
        "out": out,
        "skipped": skipped,
        "samples": manifest["rows_in"],
        "scored": manifest["rows_out"],
        "dropped": manifest["dropped"],
        "stats": manifest.get("stats", {}),
        "seconds": time.perf_counter() - t0,
    }
