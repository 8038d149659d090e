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


def end_token_ids(tokenizer) -> set[int]:
    """The special tokens a completion may already end with: EOS and the tokenizer's other special
    tokens but BOS, PAD and UNK, i.e. a chat template's end of turn (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`), where generation stops (generation_config lists it beside EOS)."""
    skip = {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    return set(tokenizer.all_special_ids) - skip


def ends_turn(tokenizer, ids: Sequence[int], end_ids: set[int]) -> bool:
    """True when `ids` end with one of `end_ids`, trailing whitespace tokens aside (ChatML writes
    "<|im_end|>\n")."""
    i = len(ids)
    while i and ids[i - 1] not in end_ids and tokenizer.decode(ids[i - 1:i]).isspace():
        i -= 1
    return i > 0 and ids[i - 1] in end_ids


def tokenize_completions(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (with the tokenizer's BOS) and completion ids (no BOS, EOS appended).

    Prompt and completion are tokenized separately, as TRL does, so the boundary between them is
    exact and the same for every stage that calls this. EOS is not appended to a completion that
    already ends (trailing whitespace aside) with EOS or an end-of-turn token (`ends_turn`): a
    chat response such as "579<|im_end|>" ends where vLLM stops sampling, and the model never
    emits EOS after it. TRL's rule: EOS for standard text unless it already ends with one, none
    for conversations, whose chat template writes the end of turn.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos, end_ids = tokenizer.eos_token_id, end_token_ids(tokenizer)
    return [list(p) for p in prompt_ids], [
        list(c) + ([] if ends_turn(tokenizer, c, end_ids) else [eos]) for c in completion_ids]
