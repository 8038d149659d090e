"""Token lists -> padded tensors. Prompts are masked out of the labels; padding is on the right."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.logps import IGNORE_INDEX


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Concatenate prompt + completion per row and right-pad to the longest.

    Returns input_ids (B, T) long, attention_mask (B, T) long, labels (B, T) long with
    `IGNORE_INDEX` on prompt and padding positions (labels aligned with input_ids; the shift
    happens in `trainer.logps`), and completion_lengths (B,) long.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    batch, width = len(lengths), max(lengths)
    input_ids = np.full((batch, width), pad_token_id, dtype=np.int64)
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        n_p, n = len(p), len(p) + len(c)
        input_ids[i, :n_p] = p
        input_ids[i, n_p:n] = c
        labels[i, n_p:n] = c
        attention_mask[i, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "completion_lengths": torch.tensor([len(c) for c in completion_ids], dtype=torch.long),
    }


def tokenize_completions(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (with the tokenizer's BOS) and completion ids (no BOS, EOS appended).

    Prompt and completion are tokenized separately, as TRL does, so the boundary between them is
    exact and the same for every stage that calls this.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [list(p) for p in prompt_ids], [list(c) + [eos] for c in completion_ids]
