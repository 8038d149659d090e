"""`odpo sample`: K responses per prompt from vLLM engines held by a Ray Data actor pool.

Pipeline: read prompts (Parquet / JSONL / `datasets` dir) -> check each prompt with the model's
tokenizer (Ray Data tasks) -> drop and count empty, unencodable, too long and duplicate prompts ->
actor pool
(`map_batches` over a callable class; each actor creates one `vllm.LLM` once) -> Parquet shards.

One request per prompt with `SamplingParams(n=k, seed=request_seed(seed, prompt))`: vLLM returns
the k samples together (Ray's `ray.data.llm` keeps only the first of n), and a per-prompt seed
makes the samples independent of batching, replica count and row order. The seed key is the
prompt text, as in `odpo eval`, so `odpo eval` with the same seed draws the very same samples.

Output rows (one per sample): `prompt_id` (sha256 of the prompt text, 16 hex digits), `prompt`,
`response`, `sample_index` (0..k-1), `finish_reason` (vLLM's: stop | length),
`num_prompt_tokens`, `num_response_tokens` (generated tokens, EOS included),
`response_token_ids` (list<int32>: the ids vLLM generated, ending in the EOS / stop token it
stopped on; a response cut at max_tokens has none), then the input's other columns unchanged
(e.g. `answer` for a verifier). Training uses `response_token_ids`, never a re-tokenization of
`response`: the decoded text loses special tokens and need not tokenize back to the same ids. The
manifest's `tokenizer_vocab` (a digest of the sampling tokenizer's vocabulary) travels to the
score and pair manifests, so the precompute stage can refuse a tokenizer the ids do not belong to.
Rows keep the prompts' order as Ray Data delivers it (with `preserve_order`, as
`pipeline.cluster.init_ray` sets); readers should key rows by (prompt_id, sample_index), not by
position.
"""

from __future__ import annotations

import dataclasses
import json
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import (
    check_checkpoint,
    checkpoint_digest,
    context_length,
    load_tokenizer,
    vocab_digest,
)
from pipeline.cluster import copy_count
from pipeline.engine import (
    EngineConfig,
    actor_options,
    check_engine,
    make_llm,
    sampling_params_for,
)
from pipeline.errors import UserError
from pipeline.manifest import input_digest
from pipeline.records import SAMPLE_COLUMNS, prompt_id
from pipeline.stage import Shards, run_stage
from pipeline.storage import local_copy, resolve_path
from pipeline.tables import read_ray_dataset

STAGE = "sample"
# unencodable_prompt: the tokenizer cannot represent the text (an unk token, or decoding does not
# give it back): vLLM would sample silently for some other prompt.
DROP_REASONS = ("empty_prompt", "unencodable_prompt", "prompt_too_long", "duplicate_prompt")
# The run's summary: {its key: the manifest's key}.
SUMMARY = {"prompts": "rows_in", "prompts_sampled": "rows_kept", "samples": "rows_out",
           "dropped": "dropped", "stats": "stats"}


@dataclass(frozen=True)
class SampleConfig:
    model: str  # policy checkpoint (HF dir: local or a URI) to sample from; no default: a choice
    prompts: str  # Parquet / JSONL / `datasets` dir with `prompt` (+ metadata, kept as is)
    out: str  # output stage directory: Parquet shards + manifest.json
    k: int = 8  # samples per prompt: with 8, a 20-80% accurate model gives most prompts both
    # a correct and an incorrect response to pair
    temperature: float = 1.0  # 1.0 samples the policy's own distribution (on-policy pairs)
    top_p: float = 1.0  # nucleus mass; 1.0 keeps the whole distribution
    max_tokens: int = 256  # response budget in tokens (vLLM also stops at max_model_len)
    seed: int = 0  # run seed; each prompt's sampling seed derives from it and the prompt text
    # Prompts per vLLM call (each k sequences): enough to keep the engine's continuous batching
    # full, few enough that progress shows and a replica's share stays balanced.
    batch_size: int = 128
    engine: EngineConfig = field(default_factory=EngineConfig)


# ---------------------------------------------------------------- pure functions (tested bare)


def drop_reason(prompt: str | None, num_prompt_tokens: int, max_model_len: int,
                unencodable: bool = False) -> str:
    """Why a prompt cannot be sampled ("" when it can). vLLM rejects a prompt that leaves no
    room for one output token, so `num_prompt_tokens` (BOS included) must be < max_model_len."""
    if prompt is None or not prompt.strip():
        return "empty_prompt"
    if unencodable:
        return "unencodable_prompt"
    if num_prompt_tokens >= max_model_len:
        return "prompt_too_long"
    return ""


def unencodable(tokenizer, texts: list[str], ids: list[list[int]] | None = None) -> list[bool]:
    """Per text: True when the tokenizer cannot represent it, so that a model would see another
    text. With an unk token: its encoding `ids` (computed here when None) holds it. Without
    one (byte-level BPE encodes anything): the text does not decode back from its ids, compared
    after NFC normalisation (a tokenizer's NFC normaliser changes no meaning)."""
    if not texts:
        return []
    unk = tokenizer.unk_token_id
    if unk is not None:
        ids = tokenizer(texts)["input_ids"] if ids is None else ids
        return [unk in x for x in ids]
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    back = tokenizer.batch_decode(plain, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
    return [unicodedata.normalize("NFC", b) != unicodedata.normalize("NFC", t)
            for b, t in zip(back, texts, strict=True)]


def expand_samples(table, outputs, k: int, prompt_token_ids: list[list[int]] | None = None):
    """Prompt rows + vLLM `RequestOutput`s (same order) -> one row per sample.

    table: pyarrow Table of P prompt rows; outputs: P request outputs with k completions each;
    prompt_token_ids: the tokenizer's ids of the P prompts, when given checked against vLLM's
    (the precompute stage rebuilds the prompt ids from the text: they must be what was sampled).
    Returns a (P * k)-row table: the prompt row's columns repeated, plus the sample columns.
    """
    if len(outputs) != table.num_rows:
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {table.num_rows} prompts")
    responses, index, finish, ntok, ids = [], [], [], [], []
    for i, out in enumerate(outputs):
        if len(out.outputs) != k:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} samples, expected {k}")
        if prompt_token_ids is not None and list(out.prompt_token_ids) != list(
                prompt_token_ids[i]):
            raise UserError(
                f"vLLM tokenized the prompt {table['prompt'][i].as_py()[:60]!r} to other ids "
                f"than the model's tokenizer does; the sampled token ids could not be trained on"
            )
        for j, c in enumerate(out.outputs):
            responses.append(c.text)
            index.append(j)
            finish.append(str(c.finish_reason))
            ntok.append(len(c.token_ids))
            ids.append(list(c.token_ids))
    repeated = table.take(pa.array([i for i in range(table.num_rows) for _ in range(k)],
                                   type=pa.int64()))
    head = {
        "prompt_id": repeated["prompt_id"],
        "prompt": repeated["prompt"],
        "response": pa.array(responses, type=pa.string()),
        "sample_index": pa.array(index, type=pa.int32()),
        "finish_reason": pa.array(finish, type=pa.string()),
        "num_prompt_tokens": repeated["num_prompt_tokens"],
        "num_response_tokens": pa.array(ntok, type=pa.int32()),
        "response_token_ids": pa.array(ids, type=pa.list_(pa.int32())),
    }
    rest = {c: repeated[c] for c in repeated.column_names if c not in head}
    return pa.table({**head, **rest})


# ---------------------------------------------------------------- Ray Data stages


def check_prompts(table, *, model: str, max_model_len: int):
    """Ray Data task: add `prompt_id`, `num_prompt_tokens` and `drop_reason` to prompt rows.

    Tokenizes as vLLM does (the model's tokenizer, special tokens added)."""
    prompts = table["prompt"].to_pylist()
    texts = [p if p else "" for p in prompts]
    tokenizer = load_tokenizer(model)
    ids = tokenizer(texts)["input_ids"] if texts else []
    counts = [len(x) for x in ids]
    lost = unencodable(tokenizer, texts, ids)
    table = table.drop_columns([c for c in ("prompt_id",) if c in table.column_names])
    table = table.add_column(0, "prompt_id", pa.array([prompt_id(t) for t in texts], pa.string()))
    table = table.append_column("num_prompt_tokens", pa.array(counts, type=pa.int32()))
    reasons = [drop_reason(p, n, max_model_len, u)
               for p, n, u in zip(prompts, counts, lost, strict=True)]
    return table.append_column("drop_reason", pa.array(reasons, type=pa.string()))


def mark_duplicates(prompt_ids: list[str], reasons: list[str]) -> list[str]:
    """Drop reasons with all but one copy of a repeated prompt marked `duplicate_prompt`."""
    seen, out = set(), []
    for pid, reason in zip(prompt_ids, reasons, strict=True):
        if not reason and pid in seen:
            reason = "duplicate_prompt"
        elif not reason:
            seen.add(pid)
        out.append(reason)
    return out


def _select_ids(table, *, ids: list[str], keep: bool):
    """Ray Data task: the rows whose prompt_id is (keep=True) or is not (False) in `ids`."""
    mask = pc.is_in(table["prompt_id"], value_set=pa.array(ids, pa.string()))
    return table.filter(mask if keep else pc.invert(mask))


def one_copy_each(table: pa.Table) -> pa.Table:
    """One row per prompt_id of `table`, in the order the ids first appear: of a repeated
    prompt's copies (which may differ in their metadata) the one with the smallest sorted JSON,
    so the same row whatever the input order."""
    best: dict[str, tuple[str, int]] = {}  # id -> (key, row); a dict keeps first appearance
    for i, row in enumerate(table.to_pylist()):
        key = json.dumps(row, sort_keys=True, default=str)
        if row["prompt_id"] not in best or key < best[row["prompt_id"]][0]:
            best[row["prompt_id"]] = (key, i)
    return table.take([i for _, i in best.values()])


def _keep_valid(table):
    """Ray Data task: the rows without a drop reason, minus the `drop_reason` column."""
    return table.filter(pc.equal(table["drop_reason"], "")).drop_columns(["drop_reason"])


class VLLMSampler:
    """Ray Data actor: one `vllm.LLM` created once; each call samples k responses per prompt."""

    def __init__(self, model: str, engine: EngineConfig, sampling: dict):
        try:
            self.llm = make_llm(model, engine, seed=sampling["seed"])
        except Exception as e:  # noqa: BLE001 - any start-up failure ends the job, named
            # Raised as our one-line error: Ray Data does not restart an actor whose
            # constructor raised (max_consecutive_actor_init_deaths = 0), so the job fails now.
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise UserError(
                f"vLLM engine for {model} failed to start ({type(e).__name__}: {msg[:300]}); "
                f"the engine's log above has the cause; check --engine-gpu-memory-utilization, "
                f"--engine-max-model-len, --engine-dtype"
            ) from None
        self.model, self.sampling = model, sampling

    def __call__(self, table):
        prompts = table["prompt"].to_pylist()
        outputs = self.llm.generate(
            prompts, sampling_params_for(prompts, self.sampling), use_tqdm=False
        )
        expected = load_tokenizer(self.model)(prompts)["input_ids"]
        return expand_samples(table, outputs, self.sampling["k"], expected)


# ---------------------------------------------------------------- the stage


def _validate(cfg: SampleConfig) -> None:
    checks = (
        (cfg.k >= 1, f"k must be >= 1, got {cfg.k}"),
        (cfg.temperature >= 0, f"temperature must be >= 0, got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got {cfg.top_p}"),
        (cfg.max_tokens >= 1, f"max_tokens must be >= 1, got {cfg.max_tokens}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    check_engine(cfg.engine)


def _checked(cfg: SampleConfig) -> tuple[SampleConfig, str, int]:
    """(cfg with absolute paths, this node's copy of the model, the engine's max_model_len),
    after the config's and the model's checks."""
    _validate(cfg)
    model = resolve_path(cfg.model)
    if not storage.is_dir(model):
        raise UserError(f"model {cfg.model}: no such directory (an HF checkpoint directory, "
                        f"local or a URI, is needed)")
    local_model = local_copy(model)  # a URI: this node's copy, for the checks below
    check_checkpoint(local_model)
    context = context_length(local_model)
    if cfg.engine.max_model_len > context:
        raise UserError(
            f"engine.max_model_len {cfg.engine.max_model_len} exceeds the model's context of "
            f"{context}"
        )
    cfg = dataclasses.replace(cfg, model=model, prompts=resolve_path(cfg.prompts),
                              out=storage.absolute(cfg.out))
    return cfg, local_model, cfg.engine.max_model_len or context


def _read_prompts(path: str):
    """The prompts as a Ray Dataset; refused when `prompt` holds no text or the data already has
    columns this stage writes (it is probably not a prompts file)."""
    ds = read_ray_dataset(path, required=("prompt",))
    schema = ds.schema()
    prompt_type = schema.types[schema.names.index("prompt")]
    if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
        raise UserError(f"{path}: column `prompt` must hold strings, found {prompt_type}")
    clash = [c for c in SAMPLE_COLUMNS + ("num_prompt_tokens", "score") if c in schema.names]
    if clash:
        raise UserError(
            f"{path}: already has column(s) {clash}; is it a prompts file? (sample writes these "
            f"columns itself)"
        )
    return ds


def _valid_prompts(checked):
    """(the prompts to sample, one copy of each; prompts in; dropped prompts by reason) from
    the rows `check_prompts` marked."""
    # Two short columns per prompt come to the driver to count the drops and find the repeated
    # prompts (a second copy would draw the very same samples).
    meta = pa.concat_tables(
        checked.select_columns(["prompt_id", "drop_reason"])
        .iter_batches(batch_format="pyarrow", batch_size=None)
    ) if checked.count() else pa.table({"prompt_id": [], "drop_reason": []})
    ids = meta["prompt_id"].to_pylist()
    reasons = mark_duplicates(ids, meta["drop_reason"].to_pylist())
    valid = checked.map_batches(_keep_valid, batch_format="pyarrow")
    repeated = sorted({i for i, r in zip(ids, reasons, strict=True) if r == "duplicate_prompt"})
    if repeated:
        # One copy of each repeated prompt, chosen here from those prompts' rows only (a Ray Data
        # group-by hash-shuffles every row through aggregator actors: 25 s of a 28 s toy stage on
        # 2 cores); the other rows keep their order.
        import ray

        copies = pa.concat_tables(valid.map_batches(
            _select_ids, batch_format="pyarrow", fn_kwargs={"ids": repeated, "keep": True}
        ).iter_batches(batch_format="pyarrow", batch_size=None))
        valid = valid.map_batches(
            _select_ids, batch_format="pyarrow", fn_kwargs={"ids": repeated, "keep": False}
        ).union(ray.data.from_arrow(one_copy_each(copies)))
    return valid, len(reasons), dict(Counter(r for r in reasons if r))


def run_sample(cfg: SampleConfig) -> dict:
    """Sample `cfg.k` responses per prompt into `cfg.out` (skipped when already current).
    Returns a summary with the manifest's counts."""
    t0 = time.perf_counter()
    cfg, local_model, max_model_len = _checked(cfg)
    inputs = {"prompts": input_digest(cfg.prompts), "model": checkpoint_digest(local_model)}
    sampling = {k: getattr(cfg, k) for k in ("k", "temperature", "top_p", "max_tokens", "seed")}

    def build() -> Shards:
        import ray

        checked = _read_prompts(cfg.prompts).map_batches(
            check_prompts, batch_format="pyarrow",
            fn_kwargs={"model": cfg.model, "max_model_len": max_model_len},
        ).materialize()
        valid, rows_in, dropped = _valid_prompts(checked)
        kept = rows_in - sum(dropped.values())
        samples = valid.map_batches(
            VLLMSampler,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=copy_count(
                cfg.engine.replicas, cfg.engine.use_gpu, cfg.engine.tensor_parallel_size)),
            fn_constructor_kwargs={"model": cfg.model, "engine": cfg.engine,
                                   "sampling": sampling},
            **actor_options(cfg.engine),
        )
        t = time.perf_counter()
        return Shards(samples if kept else None, rows_in, dropped, rows_kept=kept,
                      extra={"k": cfg.k, "units": {"in": "prompts", "out": "samples"},
                             "tokenizer_vocab": vocab_digest(load_tokenizer(local_model))},
                      after=lambda tmp: _read_back(tmp, kept * cfg.k, time.perf_counter() - t))

    return run_stage(cfg.out, STAGE, asdict(cfg), inputs, build, summary=SUMMARY, started=t0,
                     sources={"--prompts": cfg.prompts},
                     reads={"--model": cfg.model, "--prompts": cfg.prompts})


def _read_back(directory: str, samples: int, seconds: float) -> dict:
    """The written shards hold `samples` rows: their stats (finish reasons, token counts)."""
    written = sum(storage.parquet_rows(f) for f in storage.list_files(directory, (".parquet",)))
    if written != samples:
        raise RuntimeError(f"sample: wrote {written} rows, expected {samples} (prompts x k)")
    return {"stats": _stats(directory, seconds)}


def _stats(directory: str, seconds: float) -> dict:
    """Finish reasons and token counts read back from the written shards."""
    tables = [pq.read_table(f, columns=["finish_reason", "num_response_tokens"])
              for f in storage.list_files(directory, (".parquet",))]
    if not tables:
        return {"sample_s": seconds, "samples_per_s": 0.0, "response_tokens": 0,
                "finish_reason": {}}
    t = pa.concat_tables(tables)
    tokens = int(pc.sum(t["num_response_tokens"]).as_py() or 0)
    finish = {r["values"]: r["counts"] for r in pc.value_counts(t["finish_reason"]).to_pylist()}
    return {
        "sample_s": seconds,
        "samples_per_s": t.num_rows / seconds if seconds > 0 else 0.0,
        "response_tokens": tokens,
        "response_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "mean_response_tokens": tokens / t.num_rows,
        "finish_reason": dict(sorted(finish.items())),
    }
