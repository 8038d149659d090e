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
