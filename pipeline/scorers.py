"""Scorers: (prompts, responses, rows) -> list[float], by name. Built in: an exact-answer
verifier, the addition task's verifier and a reward model; any other is `module:function` or
`path/to/file.py:function`. `odpo score` and `odpo eval` both load them from here."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.checkpoint import config_context_length
from pipeline.errors import UserError
from pipeline.storage import local_copy, resolve_path

BUILTIN_SCORERS = {
    "addition": "pipeline.tasks.addition:verify",
    "exact": "pipeline.scorers:exact_answer",
}


def exact_answer(prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]) -> list:
    """Exact-answer verifier (Iterative RPO's correct / incorrect): 1.0 when the response,
    stripped of surrounding whitespace, equals the row's `answer`, else 0.0."""
    return [
        1.0 if str(resp).strip() == str(row["answer"]).strip() else 0.0
        for resp, row in zip(responses, rows, strict=True)
    ]


def is_file_scorer(spec: str) -> bool:
    """Whether `spec` names a function in a file (`path/to/file.py:function`)."""
    return spec.rsplit(":", 1)[0].endswith(".py")


def resolve_scorer(spec: str) -> str:
    """`path/to/file.py:function` made absolute (Ray workers run elsewhere); others unchanged."""
    if ":" in spec and is_file_scorer(spec):
        path, fn = spec.rsplit(":", 1)
        return f"{resolve_path(path)}:{fn}"
    return spec


def load_scorer(spec: str) -> Callable:
    """A scorer from `module:function`, `path/to/file.py:function`, or a built-in task name."""
    if is_file_scorer(spec):
        return _load_file(spec)
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


def _load_file(spec: str) -> Callable:
    """A scorer from `path/to/file.py:function` (the file need not be on sys.path)."""
    path, fn_name = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"scorer {spec!r}: {path}: no such file")
    # Named by path and contents: a process that loaded the file before (a pooled Ray worker)
    # loads an edited file anew.
    key = hashlib.sha256(str(p.resolve()).encode() + b"\0" + p.read_bytes())
    module_name = "odpo_scorer_" + key.hexdigest()[:16]
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
