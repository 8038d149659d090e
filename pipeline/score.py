"""Scorers: (prompts, responses, rows) -> list[float]."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pipeline.io import UserError

BUILTIN_SCORERS = {"addition": "pipeline.tasks.addition:verify"}


def load_scorer(spec: str) -> Callable:
    """A scorer from `module:function`, or a built-in task name (`addition`)."""
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
