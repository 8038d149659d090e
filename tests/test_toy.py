"""The toy world loads unchanged in transformers (and, in test_sft.py, in vLLM)."""

import string

import torch

from jobs.cli import main


def test_tokenizer_is_character_level(toy_tokenizer):
    text = string.printable[:95]  # every printable ASCII character, space included
    ids = toy_tokenizer(text)["input_ids"]
    assert ids[0] == toy_tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert toy_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({toy_tokenizer.bos_token_id, toy_tokenizer.eos_token_id,
                toy_tokenizer.pad_token_id}) == 3


def test_model_loads_in_transformers_with_flags(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "toy"
    assert main(["toy", "init", "--out", str(out), "--hidden-size", "64", "--num-layers", "2",
                 "--num-heads", "2", "--intermediate-size", "128"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.vocab_size == len(tok)
    logits = model(**tok(["1+1="], return_tensors="pt")).logits
    assert logits.shape == (1, 5, len(tok)) and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(["toy", "init", "--out", str(tmp_path / name), "--seed", "3"]) == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite(tmp_path, capsys):
    assert main(["toy", "init", "--out", str(tmp_path / "t")]) == 0
    assert main(["toy", "init", "--out", str(tmp_path / "t")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bpe_toy_is_a_chat_tokenizer_with_its_own_end_of_turn(tmp_path):
    """`odpo toy init --tokenizer bpe`: a byte-level BPE trained here, loaded back unchanged by
    transformers, whose ChatML turns end with `<|im_end|>` (not eos_token), both listed as stop
    tokens in generation_config.json; the habits of a real tokenizer are there."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bpe"
    assert main(["toy", "init", "--out", str(out), "--tokenizer", "bpe"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == 2048
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tok.eos_token_id and tok.bos_token_id is None
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([end_of_turn, tok.eos_token_id])
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34="}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids) == prompt and ids.count(end_of_turn) == 1
    # Byte-level: any text round-trips, a rare multi-byte character spans several tokens.
    text = "café costs €5 😀"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("€")["input_ids"]) == 3
    assert "Ġpeople" in tok.convert_ids_to_tokens(tok("The people")["input_ids"])
    # The split point changes the tokens: what re-tokenizing a completion gets wrong.
    assert (tok("the peo")["input_ids"] + tok("ple", add_special_tokens=False)["input_ids"]
            != tok("the people")["input_ids"])
    # Deterministic: the same options give the same files.
    again = tmp_path / "bpe2"
    assert main(["toy", "init", "--out", str(again), "--tokenizer", "bpe"]) == 0
    for name in ("tokenizer.json", "model.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
