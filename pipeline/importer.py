"""`odpo import`: someone else's preference data -> this project's pairs shards + manifest.

Input: Parquet / JSONL / a `datasets` dir (`save_to_disk`) in one of TRL's preference forms,
told apart by the Arrow types of `chosen` / `rejected`:
  standard         `prompt`, `chosen`, `rejected` are strings; stored as they are.
  conversational   they are lists of `{role, content}` messages. The prompt is rendered with the
                   tokenizer's chat template and the generation prompt; a completion is what the
                   rendering of prompt + completion adds after it (TRL's `maybe_apply_chat_template`
                   rule). The rendering is what is stored, so the SFT, precompute and the
                   trainer all tokenize the same text and need no template of their own.
Without a prompt column (or with `prompt_column: ""`) the prompt is the longest common prefix of
chosen and rejected (TRL's implicit prompt: characters for strings, with a space before the split
left to the completions; whole messages for conversations). The rows where that fails (no common
prefix, or one side is a prefix of the other) are counted in the manifest and dropped.

The rendered text is made to tokenize exactly as `apply_chat_template(..., tokenize=True)`: every
stage encodes prompts with the tokenizer's BOS and appends EOS to completions that do not already
end with EOS or an end-of-turn token (`trainer.collate.tokenize_completions`), so a BOS the
template writes at the start of the prompt and an EOS it writes at the end of a completion (plus
whitespace after it) are removed from the text, and counted; a completion that ends with the
template's end of turn (ChatML's `<|im_end|>\n`) is kept as it is and gets no EOS.

Bad rows are dropped and counted by reason (`bad_rows: drop`), or stop the import with one
clear error naming the first such row (`bad_rows: error`); see `REASONS`.

Output columns: `prompt_id`, `prompt`, `chosen`, `rejected`, `chosen_score`, `rejected_score`
(float64: the dataset's `chosen_score`/`rejected_score` or `score_chosen`/`score_rejected`, else
null), `round` (0), for conversational data `prompt_messages`, `chosen_messages`,
`rejected_messages` (the split messages as JSON), then the input's other columns unchanged.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa

from pipeline import storage
from pipeline.checkpoint import tokenizer_digest
from pipeline.errors import UserError
from pipeline.manifest import input_digest
from pipeline.records import prompt_id
from pipeline.stage import Shards, run_stage
from pipeline.storage import resolve_path
from pipeline.tables import read_table

STAGE = "import"
BAD_ROWS = ("drop", "error")
# Why a row is dropped (counted in the manifest under these names).
REASONS = {
    "empty_prompt": "the prompt is null or empty",
    "empty_chosen": "chosen is null or empty",
    "empty_rejected": "rejected is null or empty",
    "identical": "chosen == rejected",
    "malformed_message": "a message is not a {role, content} mapping with a string role",
    "non_string_content": "a message's content is not a string",
    "final_not_assistant": "the final message of chosen or rejected is not the assistant's",
    "mismatched_roles": "chosen and rejected completions have different roles, or a completion "
                        "does not start with an assistant turn after a non-assistant one",
    "no_common_prefix": "no prompt: chosen and rejected share no prefix, or one is a prefix of "
                        "the other",
    "template_mismatch": "the chat template's rendering of the prompt is not a prefix of its "
                         "rendering of prompt + completion",
}
SCORE_COLUMNS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"))
OUT_COLUMNS = ("prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
               "round", "prompt_messages", "chosen_messages", "rejected_messages")
# The run's summary: {its key: the manifest's key}.
SUMMARY = {"rows": "rows_in", "pairs": "rows_out", "dropped": "dropped", "form": "form",
           "prompt_source": "prompt_source", "prompt_extraction": "prompt_extraction"}


@dataclass(frozen=True)
class ImportConfig:
    data: str  # Parquet / JSONL / `datasets` dir in TRL's standard or conversational form
    out: str  # output stage directory: pairs shards + manifest.json
    # Tokenizer dir (usually the model you will SFT) whose chat template renders conversational
    # rows; not needed for the standard form
    tokenizer: str | None = None
    # Jinja file used instead of the tokenizer's own template (base and toy models have none)
    chat_template: str | None = None
    # Column holding the prompt; without it in the data the prompt is extracted (TRL's implicit
    # prompt). "" forces extraction, e.g. for a string prompt beside message-list completions.
    prompt_column: str = "prompt"
    bad_rows: str = "drop"  # drop: count by reason in the manifest | error: stop at the first


# ---------------------------------------------------------------- pure functions (tested bare)


def common_prefix_split(chosen, rejected):
    """TRL's implicit prompt: (prompt, chosen, rejected) split at the longest common prefix, or
    None when it fails (empty prefix, or an empty / blank completion).

    Works on strings (a space just before the split goes to the completions, as in TRL's
    `extract_prompt`) and on message lists (whole messages compared)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str):
        ok = prompt.strip() and c.strip() and r.strip()
    else:
        ok = prompt and c and r
    return (prompt, c, r) if ok else None


def _blank(x) -> bool:
    return x is None or (isinstance(x, str) and not x.strip()) or (isinstance(x, list) and not x)


def check_messages(prompt: list | None, chosen: list, rejected: list) -> str | None:
    """The drop reason of a conversational row (messages already split), or None if it is fine.
    `prompt` None means it is still to be extracted; only the message shapes are checked then."""
    for msgs in (prompt or [], chosen, rejected):
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
                return "malformed_message"
    for msgs in (prompt or [], chosen, rejected):
        if any(not isinstance(m.get("content"), str) for m in msgs):
            return "non_string_content"
    if prompt is None:
        return None
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "final_not_assistant"
    roles = [m["role"] for m in chosen]
    if (roles != [m["role"] for m in rejected] or roles[0] != "assistant"
            or prompt[-1]["role"] == "assistant"):
        return "mismatched_roles"
    if not chosen[-1]["content"].strip():
        return "empty_chosen"
    if not rejected[-1]["content"].strip():
        return "empty_rejected"
    return None


def render_conversation(
    render: Callable[[list, bool], str],
    prompt: list,
    chosen: list,
    rejected: list,
    *,
    bos_token: str | None,
    eos_token: str | None,
) -> tuple[str, str, str, dict] | str:
    """(prompt text, chosen text, rejected text, {"bos_stripped", "eos_stripped"}) or a drop
    reason. `render(messages, add_generation_prompt)` is the chat template as text.

    `bos_token`: the BOS text to remove from the start of the prompt (pass it only when the
    tokenizer adds BOS itself); `eos_token`: the EOS text to remove from the end of a completion
    (with whitespace after it), since EOS is appended at tokenization."""
    prompt_text = render(prompt, True)
    counts = {"bos_stripped": 0, "eos_stripped": 0}
    completions = []
    for completion in (chosen, rejected):
        full = render(prompt + completion, False)
        if not full.startswith(prompt_text):
            return "template_mismatch"
        text = full[len(prompt_text):]
        if eos_token and text.rstrip().endswith(eos_token):
            text = text.rstrip()[: -len(eos_token)]
            counts["eos_stripped"] += 1
        completions.append(text)
    if bos_token and prompt_text.startswith(bos_token):
        prompt_text = prompt_text[len(bos_token):]
        counts["bos_stripped"] += 1
    if not completions[0].strip():
        return "empty_chosen"
    if not completions[1].strip():
        return "empty_rejected"
    if completions[0] == completions[1]:
        return "identical"
    return prompt_text, completions[0], completions[1], counts


def convert_row(
    prompt, chosen, rejected, *, conversational: bool, extract: bool = False, render=None,
    bos_token=None, eos_token=None,
) -> tuple[dict, dict] | str:
    """One input row -> ({prompt, chosen, rejected[, *_messages]}, counts) or a drop reason.
    `extract`: the dataset has no prompt; it is the common prefix (TRL's implicit prompt)."""
    if _blank(chosen):
        return "empty_chosen"
    if _blank(rejected):
        return "empty_rejected"
    if not extract and _blank(prompt):
        return "empty_prompt"
    if conversational:
        reason = check_messages(None if extract else prompt, chosen, rejected)
        if reason:
            return reason
    if chosen == rejected:
        return "identical"
    counts = {"prompt_extracted": 0}
    if extract:
        split = common_prefix_split(chosen, rejected)
        if split is None:
            return "no_common_prefix"
        prompt, chosen, rejected = split
        counts["prompt_extracted"] = 1
        if conversational:
            reason = check_messages(prompt, chosen, rejected)
            if reason:
                return reason
    if not conversational:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, counts
    rendered = render_conversation(render, prompt, chosen, rejected, bos_token=bos_token,
                                   eos_token=eos_token)
    if isinstance(rendered, str):
        return rendered
    p, c, r, stripped = rendered
    row = {"prompt": p, "chosen": c, "rejected": r}
    for name, msgs in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        row[f"{name}_messages"] = json.dumps(msgs, ensure_ascii=False)
    return row, {**counts, **stripped}


# ---------------------------------------------------------------- the stage


def _form(table, prompt_column: str | None, source: str) -> bool:
    """True for the conversational form, False for the standard form; one error if mixed."""
    def kind(name: str) -> str:
        t = table.schema.field(name).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "text"
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_struct(t.value_type) or pa.types.is_null(t.value_type)
        ):
            return "messages"
        if pa.types.is_null(t):
            return "null"
        raise UserError(
            f"{source}: column `{name}` is {t}; expected strings (TRL's standard form) or lists "
            f"of {{role, content}} messages (conversational form)"
        )

    kinds = {c: kind(c) for c in ("chosen", "rejected") + ((prompt_column,) if prompt_column
                                                            else ())}
    found = set(kinds.values()) - {"null"}
    if len(found) > 1:
        hint = (" (set prompt_column to \"\" to take the prompt from the messages)"
                if kinds.get(prompt_column) == "text" else "")
        raise UserError(f"{source}: mixed forms {kinds}: all must be strings or all message "
                        f"lists{hint}")
    if not found:
        raise UserError(f"{source}: chosen and rejected are null in every row")
    return found == {"messages"}


def _scores(table, n: int) -> tuple[list, list, list[str]]:
    for c, r in SCORE_COLUMNS:
        if c in table.column_names and r in table.column_names:
            try:
                return (table[c].cast(pa.float64()).to_pylist(),
                        table[r].cast(pa.float64()).to_pylist(), [c, r])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise UserError(f"score columns {c}, {r} are not numbers: "
                                f"{str(e).splitlines()[0]}") from e
    return [None] * n, [None] * n, []


def _tokenizer(cfg: ImportConfig):
    from transformers import AutoTokenizer

    if not cfg.tokenizer:
        raise UserError("conversational data needs --tokenizer (the dir of the model you will "
                        "train, whose chat template renders the messages)")
    if not storage.is_dir(cfg.tokenizer):
        raise UserError(f"{cfg.tokenizer}: tokenizer directory not found")
    path = Path(storage.local_copy(cfg.tokenizer, "tokenizer"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.tokenizer}: cannot load the tokenizer "
                        f"({str(e).splitlines()[0]})") from e
    if cfg.chat_template:
        tok.chat_template = Path(cfg.chat_template).read_text()
    if not tok.chat_template:
        raise UserError(f"{cfg.tokenizer}: the tokenizer has no chat template; pass "
                        f"--chat-template FILE.jinja or use the standard (string) form")
    return tok


def _renderer(tok, source: str):
    from jinja2 import TemplateError

    def render(messages: list, add_generation_prompt: bool) -> str:
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise UserError(f"{source}: chat template failed: {str(e).splitlines()[0]}") from e
        return text

    adds_bos = (tok.bos_token_id is not None
                and tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id])
    return render, (tok.bos_token if adds_bos else None), tok.eos_token


def _validate(cfg: ImportConfig) -> None:
    if cfg.bad_rows not in BAD_ROWS:
        raise UserError(f"bad_rows must be one of {BAD_ROWS}, got {cfg.bad_rows!r}")
    if cfg.chat_template and not Path(cfg.chat_template).is_file():
        raise UserError(f"{cfg.chat_template}: chat template file not found")


def run_import(cfg: ImportConfig) -> dict:
    """Convert `cfg.data` into pairs shards in `cfg.out` (skipped when already current), in this
    process: no Ray (but a named cluster is joined, for its storage check). Returns a summary:
    rows in / pairs out, dropped by reason, form, prompt extraction."""
    t0 = time.perf_counter()
    _validate(cfg)
    source = cfg.data  # as the user named it, in errors
    cfg = replace(cfg, data=resolve_path(cfg.data), out=storage.absolute(cfg.out),
                  tokenizer=resolve_path(cfg.tokenizer),
                  chat_template=resolve_path(cfg.chat_template))
    if not storage.exists(cfg.data):
        raise UserError(f"{source}: no such file or directory")
    table = read_table(cfg.data, required=("chosen", "rejected"))
    if cfg.prompt_column not in ("", "prompt", *table.column_names):
        raise UserError(f"{source}: no column `{cfg.prompt_column}` (prompt_column); found "
                        f"{table.column_names}")
    prompt_column = cfg.prompt_column if cfg.prompt_column in table.column_names else None
    conversational = _form(table, prompt_column, source)
    inputs = {"data": input_digest(cfg.data)}
    renderer = (None, None, None)  # (render, BOS to strip, EOS to strip) for conversations
    if conversational:
        renderer = _renderer(_tokenizer(cfg), source)
        inputs["tokenizer"] = tokenizer_digest(Path(storage.local_copy(cfg.tokenizer, "tokenizer")))
        if cfg.chat_template:
            inputs["chat_template"] = storage.sha256(cfg.chat_template)

    def build() -> Shards:
        scores = _scores(table, table.num_rows)
        rows, kept, dropped, counts = _convert(table, prompt_column, conversational, renderer,
                                               cfg.bad_rows, source)
        pairs = _pairs_table(table, rows, kept, scores, prompt_column, conversational)
        return Shards(pairs, table.num_rows, dict(dropped), extra={
            "form": "conversational" if conversational else "standard",
            "prompt_source": "column" if prompt_column else "extracted",
            "prompt_extraction": _extraction(prompt_column, counts, dropped),
            "score_columns": scores[2],
            "rendering": {k: counts[k] for k in ("bos_stripped", "eos_stripped")}
            if conversational else None,
            "stats": {"import_s": time.perf_counter() - t0},
        })

    return run_stage(cfg.out, STAGE, asdict(cfg), inputs, build, summary=SUMMARY, started=t0,
                     sources={"--data": cfg.data}, reads={}, ray=False)


def _convert(table, prompt_column: str | None, conversational: bool, renderer: tuple,
             bad_rows: str, source: str) -> tuple[list[dict], list[int], Counter, Counter]:
    """`convert_row` over the input rows: (converted rows, their input row indices, dropped
    rows by reason, rendering counts); with `bad_rows="error"` the first bad row stops it."""
    render, bos, eos = renderer
    rows, kept, dropped, counts = [], [], Counter(), Counter()
    for i, (prompt, chosen, rejected) in enumerate(zip(
            table[prompt_column].to_pylist() if prompt_column else [None] * table.num_rows,
            table["chosen"].to_pylist(), table["rejected"].to_pylist(), strict=True)):
        result = convert_row(prompt, chosen, rejected, conversational=conversational,
                             extract=prompt_column is None, render=render, bos_token=bos,
                             eos_token=eos)
        if isinstance(result, str):
            if bad_rows == "error":
                raise UserError(f"{source}: row {i}: {REASONS[result]} ({result}); "
                                f"--bad-rows drop drops and counts such rows instead")
            dropped[result] += 1
            continue
        rows.append(result[0])
        counts.update(result[1])
        kept.append(i)
    return rows, kept, dropped, counts


def _pairs_table(table, rows: list[dict], kept: list[int], scores: tuple[list, list, list[str]],
                 prompt_column: str | None, conversational: bool):
    """The output table: the converted `rows` (of input rows `kept`) with their ids, `scores`
    (`_scores`) and round, then the input's other columns."""
    chosen_scores, rejected_scores, score_columns = scores
    for row, i in zip(rows, kept, strict=True):
        row["prompt_id"] = prompt_id(row["prompt"])
        row["chosen_score"], row["rejected_score"] = chosen_scores[i], rejected_scores[i]
        row["round"] = 0
    used = {prompt_column, "chosen", "rejected", *score_columns, *OUT_COLUMNS}
    names = OUT_COLUMNS if conversational else OUT_COLUMNS[:7]
    types = {"chosen_score": pa.float64(), "rejected_score": pa.float64(), "round": pa.int64()}
    result = pa.table({name: pa.array([r[name] for r in rows], type=types.get(name, pa.string()))
                       for name in names})
    rest = table.select([c for c in table.column_names if c not in used])
    rest = rest.take(pa.array(kept, type=pa.int64()))
    for name in rest.column_names:
        result = result.append_column(name, rest[name])
    return result


def _extraction(prompt_column, counts, dropped) -> dict | None:
    """Rows whose prompt was extracted and rows where TRL's rule found none."""
    if prompt_column is not None:
        return None
    return {"extracted": counts["prompt_extracted"], "failed": dropped["no_common_prefix"]}
