"""What the stages' rows share: the prompt's id and the columns that belong to one sample."""

from __future__ import annotations

import hashlib

# Columns `odpo sample` writes for each sample (beside the prompt's own columns, which every
# sample of a prompt repeats); `odpo score` adds `score`.
SAMPLE_COLUMNS = ("response", "sample_index", "finish_reason", "num_response_tokens",
                  "response_token_ids")


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256 over its UTF-8 text."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]
