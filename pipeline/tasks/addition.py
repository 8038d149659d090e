"""The built-in `addition` task: "123+456=" -> "579", checked by exact answer.

As a chat task (`odpo toy data --chat`, pipeline/toy.py) the prompt is the user turn rendered
with the chat template; the verifier reads the answer before an end-of-turn or EOS text a
response may carry (vLLM leaves the stop token out of the text, a decoding with special tokens
keeps it).

Operands are uniform integers in [0, 10**digits). A fixed, seed-independent 2% of all operand pairs
(chosen by a hash of the prompt text) is the held-out split: training prompts and SFT data are
drawn only from the other 98%, so an evaluation prompt is never seen in training whatever the
seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

HELDOUT_MODULUS = 50  # 1 in 50 operand pairs is held out
# Texts that end a response rather than belong to it: the bpe toy's (ChatML's) end of turn and
# its EOS.
END_TEXTS = ("<|im_end|>", "<|endoftext|>")


def make_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def is_heldout(prompt: str) -> bool:
    """True for the fixed held-out split (a digest of the prompt, independent of any seed)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def _draw(n: int, seed: int, heldout: bool, digits: int, unique: bool) -> list[dict]:
    rng = random.Random(seed)
    high = 10**digits - 1
    rows, seen = [], set()
    if unique and n > (high + 1) ** 2 // HELDOUT_MODULUS // 2 and heldout:
        raise ValueError(f"cannot draw {n} distinct held-out prompts with {digits} digits")
    while len(rows) < n:
        a, b = rng.randint(0, high), rng.randint(0, high)
        prompt = make_prompt(a, b)
        if is_heldout(prompt) != heldout or (unique and prompt in seen):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


def prompts(n: int, seed: int, digits: int = 3) -> list[dict]:
    """`n` distinct training prompts with their `answer` (for sampling rounds)."""
    return _draw(n, seed, heldout=False, digits=digits, unique=True)


def sft_data(n: int, seed: int, digits: int = 3) -> list[dict]:
    """`n` (prompt, response) SFT examples from the training split (repeats allowed)."""
    rows = _draw(n, seed, heldout=False, digits=digits, unique=False)
    return [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]} for r in rows]


def heldout(n: int, seed: int = 0, digits: int = 3) -> list[dict]:
    """`n` distinct held-out evaluation prompts with their `answer`."""
    return _draw(n, seed, heldout=True, digits=digits, unique=True)


def answer_text(response: str) -> str:
    """The answer a response gives: the text before its first end-of-turn / EOS text
    (`END_TEXTS`), spaces stripped."""
    for end in END_TEXTS:
        response = response.split(end, 1)[0]
    return response.strip()


def verify(prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]) -> list[float]:
    """Exact-answer verifier: 1.0 if the response's answer (`answer_text`) equals the row's
    `answer`."""
    return [
        1.0 if answer_text(str(resp)) == str(row["answer"]).strip() else 0.0
        for resp, row in zip(responses, rows, strict=True)
    ]
