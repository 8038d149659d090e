"""`odpo pair`: group scored samples by prompt and build (chosen, rejected) preference pairs.

Modes (a keyword and one `if`):
  best_worst         the highest- and the lowest-scored response of each prompt (ties on score
                     go to the lower `sample_index`).
  correct_incorrect  pairs of a correct (score >= correct_threshold) and an incorrect response,
                     up to `max_pairs_per_prompt` of them, as in Iterative RPO (Pang et al. 2024).
Within a prompt, responses with the same text count once (the lowest `sample_index` stands for
them): a repeated pair would only re-weight the data. A pair needs chosen_score - rejected_score
>= min_margin, and > 0.

  unpaired           no pairs: every distinct response is a row of its own with a `label`,
                     desirable (true) when score >= `threshold` and undesirable (false) when
                     score < threshold (a score equal to the threshold is desirable), for KTO
                     (`odpo train --loss-type kto`). A prompt whose responses are all
                     undesirable (or all desirable) is kept: KTO learns from it too.

Every prompt either yields pairs or is dropped with one reason, counted in the manifest:
  tie            best_worst: the best and the worst score are equal (all responses scored alike)
  no_correct     correct_incorrect: no response reaches correct_threshold
  no_incorrect   correct_incorrect: every response does
  below_margin   no pair reaches min_margin
The manifest counts prompts in / kept / dropped (rows_in == rows_kept + dropped) and pairs out.
Mode unpaired counts samples instead: samples in == rows out + dropped, a response repeated
within its prompt dropped as `duplicate`; its stats give the desirable and undesirable rows
(n_D, n_U: KTO's class weights should make λ_D·n_D / (λ_U·n_U) about 1 to 4/3) and the prompts
with no desirable response, which the paired modes drop.

Output columns (TRL's preference format plus provenance): `prompt_id`, `prompt`, `chosen`,
`rejected`, `chosen_score`, `rejected_score`, `round`, `chosen_sample_index`,
`rejected_sample_index`, `chosen_token_ids`, `rejected_token_ids` (list<int32>: the samples'
`response_token_ids`, when the scored data has them; `odpo precompute` trains on exactly these),
then the prompt's metadata columns (e.g. `answer`, taken from its first sample). Rows are ordered
by (prompt_id, chosen_sample_index, rejected_sample_index). Responses cut at max_tokens were
dropped by `odpo score` (counted as `truncated`) unless it ran with `keep_truncated`.

Unpaired rows (TRL's unpaired preference format plus provenance): `prompt_id`, `prompt`,
`completion`, `label` (bool), `score`, `round`, `sample_index`, `completion_token_ids` (when the
scored data has the sampled ids), then the prompt's metadata; ordered by (prompt_id,
sample_index).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.engine import request_seed
from pipeline.errors import UserError
from pipeline.manifest import input_digest
from pipeline.records import SAMPLE_COLUMNS
from pipeline.stage import Shards, Upstream, read_rows, read_stage, run_stage
from pipeline.storage import resolve_path

STAGE = "pair"
MODES = ("best_worst", "correct_incorrect", "unpaired")
REQUIRED = ("prompt_id", "prompt", "response", "sample_index", "score")
# A sample's own columns; the others are the prompt's and are carried into its pairs.
SAMPLE_ONLY = SAMPLE_COLUMNS + ("score",)
TOKEN_IDS = "response_token_ids"  # the sampled ids; pairs carry them as chosen_/rejected_token_ids
ROWS_PER_PARTITION = 10_000  # samples per groupby partition: few reduce tasks on small inputs
# The run's summary: {its key: the manifest's key}.
SUMMARY = {"prompts": "rows_in", "prompts_paired": "rows_kept", "pairs": "rows_out",
           "dropped": "dropped", "stats": "stats"}
UNPAIRED_SUMMARY = {"samples": "rows_in", "rows": "rows_out", "dropped": "dropped",
                    "stats": "stats"}


@dataclass(frozen=True)
class PairConfig:
    scored: str  # `odpo score` output dir (or Parquet/JSONL with prompt_id, prompt, response,
    # sample_index, score)
    out: str  # output stage directory: Parquet shards + manifest.json
    # best_worst (any scorer) | correct_incorrect (a verifier's 0/1) | unpaired: one labelled
    # row per response, for kto
    mode: str = "best_worst"
    # correct_incorrect: pairs per prompt, 0 = all; a cap keeps prompts with many distinct
    # wrong answers from dominating the data
    max_pairs_per_prompt: int = 4
    min_margin: float = 0.0  # chosen_score - rejected_score must reach this (and exceed 0)
    correct_threshold: float = 0.5  # correct_incorrect: score >= this is correct (0/1 verifier)
    # unpaired: score >= this is desirable (label true), below it undesirable; 0.5 splits a
    # 0/1 verifier's scores, a reward model's need a threshold of their own
    threshold: float = 0.5
    round: int = 0  # iteration number written to every pair (the `round` column)
    seed: int = 0  # which pairs a capped prompt keeps (per prompt, see engine.request_seed)


# ---------------------------------------------------------------- pure function (tested bare)


def make_pairs(
    rows: list[dict],
    *,
    mode: str,
    max_pairs_per_prompt: int = 0,
    min_margin: float = 0.0,
    correct_threshold: float = 0.5,
    seed: int = 0,
) -> tuple[list[tuple[dict, dict]], str]:
    """Preference pairs from one prompt's scored samples.

    rows: dicts with `response`, `sample_index`, `score` (finite), all of one prompt.
    Returns ([(chosen_row, rejected_row), ...] ordered by sample indices, "") or ([], reason).
    """
    distinct: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        distinct.setdefault(r["response"], r)
    responses = list(distinct.values())
    if mode == "best_worst":
        best = min(responses, key=lambda r: (-r["score"], r["sample_index"]))
        worst = min(responses, key=lambda r: (r["score"], r["sample_index"]))
        if best["score"] == worst["score"]:
            return [], "tie"
        if best["score"] - worst["score"] < min_margin:
            return [], "below_margin"
        return [(best, worst)], ""
    if mode != "correct_incorrect":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    correct = [r for r in responses if r["score"] >= correct_threshold]
    incorrect = [r for r in responses if r["score"] < correct_threshold]
    if not correct:
        return [], "no_correct"
    if not incorrect:
        return [], "no_incorrect"
    pairs = [(c, i) for c in correct for i in incorrect if c["score"] - i["score"] >= min_margin]
    if not pairs:
        return [], "below_margin"
    if 0 < max_pairs_per_prompt < len(pairs):
        key = str(rows[0].get("prompt_id", rows[0].get("prompt")))
        pairs = random.Random(request_seed(seed, key)).sample(pairs, max_pairs_per_prompt)
    return sorted(pairs, key=lambda p: (p[0]["sample_index"], p[1]["sample_index"])), ""


def unpaired_rows(rows: list[dict], *, threshold: float) -> tuple[list[tuple[dict, bool]], int]:
    """One prompt's scored samples as unpaired rows for KTO.

    rows: dicts with `response`, `sample_index`, `score` (finite), all of one prompt. Each
    distinct response (the lowest `sample_index` stands for its repeats) is labelled desirable
    when score >= threshold, else undesirable. Returns ([(row, desirable), ...] by sample index,
    number of repeats left out).
    """
    distinct: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        distinct.setdefault(r["response"], r)
    kept = [(r, r["score"] >= threshold) for r in distinct.values()]
    return kept, len(rows) - len(kept)


# ---------------------------------------------------------------- Ray Data stage


def output_schema(input_schema):
    """The pair rows' schema (plus `drop_reason`, removed before writing)."""
    text = input_schema.field("response").type
    fields = [
        pa.field("prompt_id", input_schema.field("prompt_id").type),
        pa.field("prompt", input_schema.field("prompt").type),
        pa.field("chosen", text),
        pa.field("rejected", text),
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("round", pa.int64()),
        pa.field("chosen_sample_index", pa.int64()),
        pa.field("rejected_sample_index", pa.int64()),
    ]
    if TOKEN_IDS in input_schema.names:
        fields += [pa.field(f"{side}_token_ids", pa.list_(pa.int32()))
                   for side in ("chosen", "rejected")]
    taken = {f.name for f in fields}
    fields += [f for f in input_schema if f.name not in taken and f.name not in SAMPLE_ONLY]
    return pa.schema(fields + [pa.field("drop_reason", pa.string())])


def unpaired_schema(input_schema):
    """The unpaired rows' schema (plus `drop_reason`, removed before writing)."""
    fields = [
        pa.field("prompt_id", input_schema.field("prompt_id").type),
        pa.field("prompt", input_schema.field("prompt").type),
        pa.field("completion", input_schema.field("response").type),
        pa.field("label", pa.bool_()),
        pa.field("score", pa.float64()),
        pa.field("round", pa.int64()),
        pa.field("sample_index", pa.int64()),
    ]
    if TOKEN_IDS in input_schema.names:
        fields.append(pa.field("completion_token_ids", pa.list_(pa.int32())))
    taken = {f.name for f in fields}
    fields += [f for f in input_schema if f.name not in taken and f.name not in SAMPLE_ONLY]
    return pa.schema(fields + [pa.field("drop_reason", pa.string())])


def unpaired_group(table, *, cfg: PairConfig, schema):
    """Ray Data `map_groups`: one prompt's samples -> its unpaired rows, and one row carrying
    only `drop_reason` "duplicate" per repeated response left out."""
    rows = table.to_pylist()
    kept, repeats = unpaired_rows(rows, threshold=cfg.threshold)
    first = rows[0]
    meta = {f.name: first.get(f.name) for f in schema if f.name in first}
    ids = schema.get_field_index("completion_token_ids") >= 0
    out = [{**meta, "completion": r["response"], "label": desirable, "score": r["score"],
            "round": cfg.round, "sample_index": r["sample_index"],
            **({"completion_token_ids": r[TOKEN_IDS]} if ids else {}), "drop_reason": ""}
           for r, desirable in kept]
    out += [{"prompt_id": first["prompt_id"], "drop_reason": "duplicate"}] * repeats
    return pa.Table.from_pylist(out, schema=schema)


def pair_group(table, *, cfg: PairConfig, schema):
    """Ray Data `map_groups`: one prompt's samples -> its pair rows, or one row that carries
    only its `drop_reason`."""
    rows = table.to_pylist()
    pairs, reason = make_pairs(
        rows, mode=cfg.mode, max_pairs_per_prompt=cfg.max_pairs_per_prompt,
        min_margin=cfg.min_margin, correct_threshold=cfg.correct_threshold, seed=cfg.seed,
    )
    first = rows[0]
    meta = {f.name: first.get(f.name) for f in schema if f.name in first}
    out = []
    ids = schema.get_field_index("chosen_token_ids") >= 0
    for chosen, rejected in pairs:
        out.append({
            **meta,
            "chosen": chosen["response"],
            "rejected": rejected["response"],
            "chosen_score": chosen["score"],
            "rejected_score": rejected["score"],
            "round": cfg.round,
            "chosen_sample_index": chosen["sample_index"],
            "rejected_sample_index": rejected["sample_index"],
            **({"chosen_token_ids": chosen[TOKEN_IDS], "rejected_token_ids": rejected[TOKEN_IDS]}
               if ids else {}),
            "drop_reason": "",
        })
    if not out:
        out.append({"prompt_id": first["prompt_id"], "drop_reason": reason})
    return pa.Table.from_pylist(out, schema=schema)


def _kept_pairs(table):
    return table.filter(pc.equal(table["drop_reason"], "")).drop_columns(["drop_reason"])


def _validate(cfg: PairConfig) -> None:
    if cfg.mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if not math.isfinite(cfg.threshold):
        raise UserError(f"threshold must be a finite number, got {cfg.threshold}")
    if cfg.mode == "unpaired" and cfg.min_margin:
        raise UserError("min_margin is a pair's score gap; mode unpaired makes no pairs "
                        "(its rows are split by threshold)")
    if cfg.max_pairs_per_prompt < 0:
        raise UserError(f"max_pairs_per_prompt must be >= 0 (0 = all), got "
                        f"{cfg.max_pairs_per_prompt}")
    if not math.isfinite(cfg.min_margin) or cfg.min_margin < 0:
        raise UserError(f"min_margin must be a finite number >= 0, got {cfg.min_margin}")


def _check_scores(table):
    """Ray Data task: a non-finite score cannot be ranked; `odpo score` never writes one."""
    bad = pc.invert(pc.is_finite(table["score"]))
    if pc.any(bad).as_py():
        row = table.filter(bad).slice(0, 1).to_pylist()[0]
        raise UserError(
            f"score {row['score']} for prompt_id={row['prompt_id']} "
            f"sample_index={row['sample_index']}: pair needs finite scores (score with "
            f"--nonfinite drop)"
        )
    return table


def _pair_dataset(cfg: PairConfig, up: Upstream):
    """(pairs dataset or None, samples in, prompts in, prompts kept, dropped by reason, further
    stats)."""
    ds = read_rows(up)
    if ds is None:
        return None, 0, 0, 0, {}, {}
    # Read and checked once; the counts, the schema and the grouping reuse it.
    ds = ds.map_batches(_check_scores, batch_format="pyarrow").materialize()
    samples_in = ds.count()
    if not samples_in:
        return None, 0, 0, 0, {}, {}
    prompts_in = len(ds.unique("prompt_id"))  # counted apart from the grouping
    partitions = max(1, min(200, -(-samples_in // ROWS_PER_PARTITION)))
    ray_schema = ds.schema()
    input_schema = pa.schema(list(zip(ray_schema.names, ray_schema.types, strict=True)))
    if cfg.mode == "unpaired":
        return _unpaired_dataset(cfg, ds, samples_in, prompts_in, partitions, input_schema)
    schema = output_schema(input_schema)
    grouped = ds.groupby("prompt_id", num_partitions=partitions).map_groups(
        pair_group, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "schema": schema},
    ).materialize()
    # One short row per dropped prompt and two columns per pair come to the driver.
    meta = pa.concat_tables(
        grouped.select_columns(["prompt_id", "drop_reason"])
        .iter_batches(batch_format="pyarrow", batch_size=None)
    )
    reasons = meta["drop_reason"].to_pylist()
    dropped = dict(Counter(r for r in reasons if r))
    ids = meta["prompt_id"].to_pylist()
    kept = len({i for i, r in zip(ids, reasons, strict=True) if not r})
    if not kept:
        return None, samples_in, prompts_in, 0, dropped, {}
    pairs = grouped.map_batches(_kept_pairs, batch_format="pyarrow").sort(
        ["prompt_id", "chosen_sample_index", "rejected_sample_index"]
    )
    return pairs, samples_in, prompts_in, kept, dropped, {}


def _unpaired_dataset(cfg: PairConfig, ds, samples_in, prompts_in, partitions, input_schema):
    """`_pair_dataset` for mode unpaired: (rows dataset or None, samples in, prompts in, None,
    dropped by reason, stats with n_D, n_U and the prompts without a desirable response)."""
    schema = unpaired_schema(input_schema)
    grouped = ds.groupby("prompt_id", num_partitions=partitions).map_groups(
        unpaired_group, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "schema": schema},
    ).materialize()
    meta = pa.concat_tables(
        grouped.select_columns(["prompt_id", "label", "drop_reason"])
        .iter_batches(batch_format="pyarrow", batch_size=None)
    )
    rows = meta.filter(pc.equal(meta["drop_reason"], ""))
    dropped = dict(Counter(r for r in meta["drop_reason"].to_pylist() if r))
    labels, ids = rows["label"].to_pylist(), rows["prompt_id"].to_pylist()
    # the prompts a paired mode drops (no_correct, no_incorrect) still give KTO rows
    prompts_with = {side: {i for i, d in zip(ids, labels, strict=True) if d == side}
                    for side in (True, False)}
    stats = {"prompts": prompts_in, "desirable": sum(labels),
             "undesirable": len(labels) - sum(labels),
             "prompts_without_desirable": prompts_in - len(prompts_with[True]),
             "prompts_without_undesirable": prompts_in - len(prompts_with[False])}
    if not rows.num_rows:
        return None, samples_in, prompts_in, None, dropped, stats
    out = grouped.map_batches(_kept_pairs, batch_format="pyarrow").sort(
        ["prompt_id", "sample_index"])
    return out, samples_in, prompts_in, None, dropped, stats


def run_pair(cfg: PairConfig) -> dict:
    """Pair the scored samples into `cfg.out` (skipped when already current)."""
    t0 = time.perf_counter()
    _validate(cfg)
    cfg = dataclasses.replace(cfg, scored=resolve_path(cfg.scored),
                              out=storage.absolute(cfg.out))
    up = read_stage(cfg.scored, ("score",), REQUIRED, flag="--scored")
    # The sampling tokenizer's vocabulary, passed on for the precompute stage's check.
    vocab = (up.manifest or {}).get("tokenizer_vocab")

    def build() -> Shards:
        rows, samples_in, prompts_in, kept, dropped, stats = _pair_dataset(cfg, up)
        if cfg.mode == "unpaired":
            units, rows_in = {"in": "samples", "out": "rows"}, samples_in
        else:
            units, rows_in = {"in": "prompts", "out": "pairs"}, prompts_in
        return Shards(rows, rows_in, dropped, rows_kept=kept,
                      extra={"units": units, **({"tokenizer_vocab": vocab} if vocab else {})},
                      after=lambda tmp: {"stats": {"samples_in": samples_in, **stats,
                                                   "pair_s": time.perf_counter() - t0}})

    summary = UNPAIRED_SUMMARY if cfg.mode == "unpaired" else SUMMARY
    return run_stage(cfg.out, STAGE, dataclasses.asdict(cfg), {"scored": input_digest(cfg.scored)},
                     build, summary=summary, started=t0, sources={"--scored": cfg.scored},
                     reads={"--scored": cfg.scored})
