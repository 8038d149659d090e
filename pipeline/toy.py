"""The toy world: a tiny Llama and a printable-ASCII character tokenizer, made locally.

Every test, benchmark and the demo get a real model from here without any download. The directory
written by `init_toy_model` is an ordinary Hugging Face checkpoint: `AutoTokenizer`,
`AutoModelForCausalLM` and `vllm.LLM` load it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII, space (32) through tilde (126): one token per character.
CHARS = tuple(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class ToyConfig:
    out: str  # output directory of the HF checkpoint; no default: it is chosen on purpose
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


def init_toy_model(cfg: ToyConfig) -> str:
    """Write a randomly initialised tiny `LlamaForCausalLM` plus tokenizer to `cfg.out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import storage

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}"
        )
    tokenizer = build_tokenizer()
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
    with storage.output_dir(cfg.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return storage.absolute(cfg.out)


def write_task_data(
    out: str | Path,
    sft_rows: int = 150_000,
    prompts: int = 2048,
    heldout: int = 500,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """The addition task's sft / prompts / heldout Parquet files (held-out split disjoint)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.tasks import addition

    with storage.output_dir(out, overwrite=overwrite) as tmp:
        for name, rows in (
            ("sft", addition.sft_data(sft_rows, seed=seed)),
            ("prompts", addition.prompts(prompts, seed=seed + 1)),
            ("heldout", addition.heldout(heldout, seed=seed + 2)),
        ):
            pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / f"{name}.parquet")
    return storage.absolute(out)
