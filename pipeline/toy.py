"""The toy world: a tiny Llama and a tokenizer, made locally.

Every test, benchmark and the demo get a real model from here without any download. The directory
written by `init_toy_model` is an ordinary Hugging Face checkpoint: `AutoTokenizer`,
`AutoModelForCausalLM` and `vllm.LLM` load it unchanged.

Two tokenizers:
- `char`: one token per printable ASCII character, BOS prepended, EOS appended by the pipeline.
  Simple, but it has none of a real tokenizer's habits.
- `bpe`: a byte-level BPE trained here (the `tokenizers` library) on the task's own text in chat
  form plus generated English-like text, with a ChatML chat template (`<|im_start|>role\n ...
  <|im_end|>\n`). Like a real chat model (Qwen2.5-Instruct's layout), its end-of-turn token
  `<|im_end|>` is not `eos_token` (`<|endoftext|>`), and generation_config.json lists both as stop
  tokens; it adds no BOS. It has merges with a leading space (`Ġthe`), multi-byte characters
  spread over several byte tokens, and text whose tokenization changes at a split point
  ("the peo" + "ple"), so prompt/completion boundaries and stop tokens are exercised for real.

`write_task_data(chat=TOKENIZER_DIR)` (`odpo toy data --chat`) writes the addition task as a
chat task for such a tokenizer (`as_chat`): prompts rendered with its chat template, SFT responses
ending with its end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII, space (32) through tilde (126): one token per character.
CHARS = tuple(chr(c) for c in range(32, 127))


# The bpe tokenizer's special tokens; ids 0..3 in this order.
BPE_PAD, BPE_EOS, BPE_TURN_START, BPE_TURN_END = (
    "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Generic words for the bpe corpus (with the task's text): common English, so merges with a
# leading space form as in real vocabularies.
_WORDS = (
    "the of and to in is that for it as with was on be by this are from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three model answer number sum add question reply prompt"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ga", "vu", "zen", "sha", "qua",
              "tor", "lin", "mar", "bel", "dro", "fi")


@dataclass(frozen=True)
class ToyConfig:
    out: str  # output directory of the HF checkpoint; no default: it is chosen on purpose
    # char: one token per printable ASCII character | bpe: byte-level BPE trained here, with a
    # ChatML chat template and an end-of-turn token (module docstring)
    tokenizer: str = "char"
    bpe_vocab_size: int = 2048  # bpe: vocabulary incl. 256 bytes + 4 specials (1,788 merges)
    hidden_size: int = 128  # width; 128 x 3 layers is ~0.66M parameters, SFT-able in minutes
    num_layers: int = 3  # depth; three layers learn 3-digit addition, slowly enough to stop early
    num_heads: int = 4  # head_dim 32, a size vLLM's CPU attention supports
    intermediate_size: int = 384  # MLP width, 3x hidden like the original toy measurement
    max_position_embeddings: int = 64  # context in tokens; addition needs ~15
    seed: int = 0  # weight init seed, so the same flags give the same weights


def build_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per printable ASCII character.

    BOS is prepended to every encoded text (as Llama tokenizers do); EOS and PAD are separate ids;
    decoding concatenates characters (no spaces inserted).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def bpe_corpus(seed: int = 0, n: int = 6000) -> list[str]:
    """The bpe tokenizer's training text: addition turns in chat form and English-like sentences
    (common words and made-up words of a few syllables), drawn from `seed`."""
    import random

    rng = random.Random(seed)
    text = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        text.append(f"{BPE_TURN_START}user\n{a}+{b}={BPE_TURN_END}\n{BPE_TURN_START}assistant\n"
                    f"{a + b}{BPE_TURN_END}\n")
        words = [rng.choice(_WORDS) if rng.random() < 0.7 else
                 "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words)
        text.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!,;:"))
    return text


def build_bpe_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `bpe_corpus()` (deterministic), with
    the ChatML template; digits stay single tokens (as in Qwen2.5 and Llama 3), which keeps
    addition learnable by a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BPE_PAD, BPE_EOS, BPE_TURN_START, BPE_TURN_END]
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"bpe_vocab_size must be > 260 (256 bytes + 4 specials), got "
                         f"{vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(bpe_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=BPE_EOS,
        pad_token=BPE_PAD,
        additional_special_tokens=[BPE_TURN_START, BPE_TURN_END],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_toy_model(cfg: ToyConfig, overwrite: bool = False) -> str:
    """Write a randomly initialised tiny `LlamaForCausalLM` plus tokenizer to `cfg.out` (the same
    config gives the same bytes; `overwrite` replaces an existing directory atomically)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import storage

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}"
        )
    if cfg.tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be char or bpe, got {cfg.tokenizer!r}")
    tokenizer = build_tokenizer() if cfg.tokenizer == "char" else build_bpe_tokenizer(
        cfg.bpe_vocab_size)
    tokenizer.model_max_length = cfg.max_position_embeddings
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.tokenizer == "bpe":  # a chat model stops at the end of its turn or at EOS
        model.generation_config.eos_token_id = [
            tokenizer.convert_tokens_to_ids(BPE_TURN_END), tokenizer.eos_token_id]
    with storage.output_dir(cfg.out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return storage.absolute(cfg.out)


def _bos_written(tokenizer) -> str | None:
    """The BOS text a chat template may write that the tokenizer also adds itself (so the
    rendered prompt must not carry it), else None."""
    bos = tokenizer.bos_token
    adds = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return bos if adds else None


def chat_turn(tokenizer, question: str, answer: str | None = None,
              bos: str | None = None) -> tuple[str, str | None]:
    """(prompt, response) of a one-turn chat, as `tokenizer`'s chat template renders it.

    The prompt is the user turn with the generation prompt (`add_generation_prompt=True`), less
    a leading `bos` (`_bos_written`). The response is what the template writes for the
    assistant's `answer`, up to and including the first special token after it: its end of turn
    (`<|im_end|>`), the token vLLM stops on, so SFT ends the response there
    (trainer.collate.tokenize_completions appends no EOS after it); whitespace the template puts
    after it (ChatML's newline) is never generated and is left out. A template that writes no
    special token after the answer gives the answer alone (EOS is then appended). Without an
    `answer`, the response is None."""
    from pipeline.errors import UserError

    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    response = None
    if answer is not None:
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": answer}], tokenize=False)
        tail = full[len(prompt):]
        if not full.startswith(prompt) or not tail.startswith(answer):
            raise UserError(f"the chat template's rendering of {question!r} and its answer does "
                            f"not continue its generation prompt: it cannot render a chat task")
        ends = [i + len(t) for t in tokenizer.all_special_tokens
                if t not in (tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token)
                and (i := tail.find(t, len(answer))) >= 0]
        response = tail[:min(ends)] if ends else answer
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    return prompt, response


def chat_tokenizer(path: str):
    """The tokenizer of `path` (a model or tokenizer directory), which must have a chat
    template."""
    from transformers import AutoTokenizer

    from pipeline import storage
    from pipeline.errors import UserError

    if not storage.is_dir(path):
        raise UserError(f"{path}: tokenizer directory not found")
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(path, "tokenizer"),
                                              trust_remote_code=False)
    if not tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template (`odpo toy init --tokenizer "
                        f"bpe` makes one that has)")
    return tokenizer


def as_chat(rows: list[dict], tokenizer) -> list[dict]:
    """Task rows with `prompt` (and `response`) rendered as a chat (`chat_turn`); the plain
    prompt is kept as `question`. The answer column and the held-out split (a digest of the plain
    prompt, drawn before rendering) are unchanged."""
    bos, out = _bos_written(tokenizer), []
    for row in rows:
        prompt, response = chat_turn(tokenizer, row["prompt"], row.get("response"), bos)
        out.append({**row, "prompt": prompt, "question": row["prompt"],
                    **({"response": response} if "response" in row else {})})
    return out


def write_task_data(
    out: str | Path,
    sft_rows: int = 150_000,
    prompts: int = 2048,
    heldout: int = 500,
    seed: int = 0,
    overwrite: bool = False,
    chat: str | None = None,
) -> str:
    """The addition task's sft / prompts / heldout Parquet files (held-out split disjoint);
    `chat`: a tokenizer directory whose chat template renders them as a chat task (`as_chat`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.tasks import addition

    tokenizer = chat_tokenizer(chat) if chat else None
    with storage.output_dir(out, overwrite=overwrite) as tmp:
        for name, rows in (
            ("sft", addition.sft_data(sft_rows, seed=seed)),
            ("prompts", addition.prompts(prompts, seed=seed + 1)),
            ("heldout", addition.heldout(heldout, seed=seed + 2)),
        ):
            if tokenizer is not None:
                rows = as_chat(rows, tokenizer)
            pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / f"{name}.parquet")
    return storage.absolute(out)
