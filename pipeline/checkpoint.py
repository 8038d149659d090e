"""Facts about a model checkpoint, computed one way for every stage: is it safe to load, what its
content digest is (weights, config, tokenizer, vocabulary), its context length; and dropout off.

A checkpoint is a Hugging Face directory, local or by URI (read through this node's copy), or a
hub id on users' machines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from pipeline import storage
from pipeline.cluster import uninterruptible
from pipeline.errors import UserError

WEIGHT_SUFFIXES = (".safetensors",)  # the only weights loaded (check_checkpoint)
TOKENIZER_PREFIXES = (
    "tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


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
    check_model_name(path, what)
    p = Path(storage.local_copy(str(path), what))
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
        # a cache hit of the precompute stage must not import transformers' modeling code.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UserError(
                f"{what} {p}: its config.json needs the checkpoint's own Python code (auto_map, "
                f"model_type {config.get('model_type')!r}); custom code is never run "
                f"(trust_remote_code off)"
            )


def _files_digest(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root)}:{storage.sha256(f)}\n".encode())
    return h.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """sha256 over config.json and every weight file (and shard index) of an HF checkpoint."""
    model_dir = Path(model_dir)
    files = sorted(
        f for f in model_dir.iterdir()
        if f.is_file() and not f.name.startswith("training_args")
        and (f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES
             or f.name.endswith(".index.json"))
    )
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise UserError(f"{model_dir}: no *.safetensors weights in this directory")
    return _files_digest(model_dir, files)


def tokenizer_digest(tokenizer_dir: Path) -> str:
    """sha256 over the tokenizer's files (tokenizer*.json, vocab, merges, sentencepiece model)."""
    tokenizer_dir = Path(tokenizer_dir)
    files = sorted(
        f for f in tokenizer_dir.iterdir()
        if f.is_file() and (f.name.startswith(TOKENIZER_PREFIXES) or f.suffix == ".model")
    )
    if not files:
        raise UserError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json, vocab, ...)")
    return _files_digest(tokenizer_dir, files)


def vocab_digest(tokenizer) -> str:
    """sha256 over a tokenizer's vocabulary (token -> id, added tokens included): what stored
    token ids mean, whatever else its files say (model_max_length, chat template, ...)."""
    return hashlib.sha256(
        json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    ).hexdigest()


def checkpoint_digest(model: str) -> str:
    """Content digest of a model a step starts from: its weights, config and tokenizer files for
    a checkpoint directory (local or a URI, through this node's copy); a hub id stands for
    itself (the revision it resolves to is not pinned)."""
    if not storage.is_uri(model) and not Path(model).is_dir():
        return f"hub:{model}"
    d = Path(storage.local_copy(model))
    return hashlib.sha256(f"{weights_digest(d)}:{tokenizer_digest(d)}".encode()).hexdigest()


def config_context_length(config: dict) -> int | None:
    """The context length a model config (as a dict) names, looking inside `text_config` too
    (multimodal checkpoints keep the language model's there); None when it names none."""
    for c in (config, config.get("text_config") or {}):
        for k in CONTEXT_KEYS:
            if isinstance(c.get(k), int):
                return c[k]
    return None


def context_length(model: str) -> int:
    """The model's context length in tokens, read from its config.json (local, by URI, or a hub
    id through transformers' config loader); a one-line error when it names none."""
    local = storage.local_copy(model, "model") if storage.is_uri(model) else model
    path = Path(local) / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the model config ({e})") from e
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(local, trust_remote_code=False).to_dict()
        except (OSError, ValueError) as e:
            raise UserError(
                f"model {model}: cannot load its config ({str(e).splitlines()[0]})") from e
    n = config_context_length(config)
    if n is None:
        raise UserError(f"model {model}: config names no context length "
                        f"({', '.join(CONTEXT_KEYS)}); set the length explicitly")
    return n


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer of the checkpoint at `path` (local, or this node's copy of a URI), loaded
    once per process; in a Ray task, loaded `uninterruptible` (its first call imports
    transformers and torch). Its model_max_length is lifted: the stages check lengths
    themselves, with messages naming the row, and transformers' own warning would only add
    noise."""
    def load():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(path),
                                                  trust_remote_code=False)
        tokenizer.model_max_length = int(1e30)
        return tokenizer

    return uninterruptible(load)


def disable_dropout(model) -> None:
    """Dropout off (docs/design.md, Numerics): the log-probs DPO compares must be deterministic, or
    policy and reference differ at step 0 by noise alone."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # HF attention modules apply a float `attention_dropout` functionally in train mode.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
