"""LoRA (PEFT) on `odpo train` and `odpo sft` (issue 17, item 3): only the adapters train, the
published model is the adapters merged into a plain Hugging Face checkpoint, a resumed run picks
up the adapter and its optimizer state, and the memory-lean log-prob path serves the wrapped
model.

Trusted values: the toy's weights as stored on disk, transformers' plain forward with a float32
log-softmax written out here, PEFT's own forward through the full logits, and the run that was
not interrupted."""

import copy
import json
import math
import re
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import plain_logp
from safetensors.torch import load_file

from trainer.collate import collate
from trainer.logps import TokenLogps, lean_supported, model_token_logps, per_token_logps
from trainer.loop import (
    STATE_FILE,
    causal_lm,
    dpo_step_loss,
    load_policy,
    make_optimizer,
    take_rows,
    train_steps,
)
from trainer.lora import ADAPTER_DIR, LoraSettings, add_lora, save_lora

SETTINGS = asdict(LoraSettings(r=4, alpha=8.0))


def _rows(tok, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) of n addition prompts: the right sum and a wrong
    one, each ending in EOS."""
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [(tok(f"{i}+{i + 7}=")["input_ids"], ids(str(2 * i + 7)), ids(str(3 * i + 1)))
            for i in range(n)]


def _table(tok, n: int, objective: str, model=None) -> pa.Table:
    """The training set as the loop gets it; DPO's reference log-probs from `model`'s plain
    forward (so that the policy starts at the reference), or made up when it is None."""
    rows = _rows(tok, n)
    if objective == "sft":
        return pa.table({"prompt_input_ids": [p for p, _, _ in rows],
                         "completion_input_ids": [c for _, c, _ in rows]})
    ref = [(plain_logp(model, p, c), plain_logp(model, p, r)) if model is not None
           else (-2.0 * len(c) - 0.1 * i, -2.0 * len(r) + 0.2 * i)
           for i, (p, c, r) in enumerate(rows)]
    ints = pa.list_(pa.int32())
    return pa.table({
        "prompt_input_ids": pa.array([p for p, _, _ in rows], ints),
        "chosen_input_ids": pa.array([c for _, c, _ in rows], ints),
        "rejected_input_ids": pa.array([r for _, _, r in rows], ints),
        "ref_chosen_logps": [a for a, _ in ref], "ref_rejected_logps": [b for _, b in ref]})


def _cfg(model_dir: str, objective: str, total_steps: int) -> dict:
    """A loop config (`asdict` of the entry point's config plus the planned steps)."""
    return {"objective": objective, "model": model_dir, "dtype": "float32", "lora": SETTINGS,
            "batch_size": 4, "grad_accum": 2, "seed": 0, "shuffle": True,
            "total_steps": total_steps, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 0,
            "lr_schedule": "constant", "log_every": 1, "grad_clip": 1.0, "beta": 0.1,
            "loss_type": "sigmoid", "label_smoothing": 0.0, "alpha": 1.0}


def _train(model, table, cfg, start_step=0, optimizer_state=None):
    """`train_steps` as a one-worker Ray Train worker runs it, on `model` (a causal LM) wrapped
    in `TokenLogps` as `loop.load_models` does; returns (model, optimizer, scheduler, log)."""
    model = TokenLogps(model.train())
    optimizer, scheduler = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    log = []
    train_steps(model, optimizer, scheduler, table, cfg, rank=0, world=1, start_step=start_step,
                pad_token_id=0, log=lambda s, m: log.append({"step": s, **m}),
                after_step=lambda done, epoch: None)
    return causal_lm(model), optimizer, scheduler, log


def _base_name(name: str) -> str:
    """A PeftModel's name of a base weight -> the name it has in the plain checkpoint."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# --- only the adapters train ------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_only_the_adapters_change(toy_model_dir, toy_tokenizer, objective):
    """4 steps of DPO+NLL (or SFT) at lr 1e-2 with weight decay 0.1: every adapter moved, every
    base weight is bit-identical to the toy's stored one, and AdamW holds the adapters only."""
    stored = load_file(f"{toy_model_dir}/model.safetensors")
    cfg = _cfg(toy_model_dir, objective, 4)
    torch.manual_seed(0)
    model = load_policy(cfg, toy_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n for n in dict(model.named_parameters()) if "lora_" in n} == trainable
    before = _lora_state(model)
    assert all((v == 0).all() for n, v in before.items() if "lora_B" in n)  # step 0 = base

    model, optimizer, _, log = _train(model, _table(toy_tokenizer, 12, objective), cfg)
    assert [m["step"] for m in log] == [0, 1, 2, 3]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    after = _lora_state(model)
    for name, value in after.items():
        assert not torch.equal(value, before[name]), name
    base = {_base_name(n): t for n, t in model.state_dict().items() if "lora_" not in n}
    assert set(base) == set(stored)
    for name, value in stored.items():
        assert torch.equal(base[name], value), name


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_changes_no_gradient(toy_model_dir, toy_tokenizer, lora_r):
    """`gradient_checkpointing: true`, turned on as `loop.load_models` does (after the adapters
    are added), gives every trainable parameter the gradient of the plain backward: full
    fine-tuning, and LoRA, whose frozen embedding gives the checkpointed layers inputs that need
    no gradient (a re-entrant checkpoint without transformers' `enable_input_require_grads` has
    no graph to backward through then: checked by hand, this test fails). The decoder layers'
    MLPs are entered twice under checkpointing (the backward's recompute): it is on."""
    cfg = {**_cfg(toy_model_dir, "dpo", 1), "lora": {**SETTINGS, "r": lora_r}}
    batch = take_rows(_table(toy_tokenizer, 4, "dpo"), np.arange(4))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the adapters' A is drawn at random
        model = load_policy(cfg, toy_model_dir)
        for name, p in model.named_parameters():  # B = 0 would leave A without a gradient
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        if checkpointing:
            model.gradient_checkpointing_enable()
        mlps = [m for n, m in model.named_modules() if n.endswith("mlp")]
        entered = []  # a pre-hook: the recompute stops once it has what the backward needs
        for mlp in mlps:
            mlp.register_forward_pre_hook(lambda module, args, seen=entered: seen.append(module))
        loss, _ = dpo_step_loss(TokenLogps(model.train()), batch, 0, cfg)
        loss.backward()
        calls.append(len(entered) / len(mlps))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert (lora_r > 0) == all("lora_" in n for n in grads[0])
    for name, plain in grads[0].items():
        assert plain is not None and plain.abs().sum() > 0, name
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], plain, rtol=0, atol=1e-6, msg=name)


# --- the merged checkpoint ----------------------------------------------------------------------


def _trained(toy_model_dir, toy_tokenizer, steps=3):
    cfg = _cfg(toy_model_dir, "dpo", steps)
    torch.manual_seed(0)
    model = load_policy(cfg, toy_model_dir)
    return (*_train(model, _table(toy_tokenizer, 12, "dpo"), cfg), cfg)


def test_the_merged_checkpoint_is_a_plain_model_with_the_adapted_log_probs(
        toy_model_dir, toy_tokenizer, tmp_path):
    """`save_lora` (what a LoRA checkpoint holds): a plain HF directory, safetensors with the
    toy's own keys and no PEFT ones, the adapter in `adapter/`; the training model untouched bit
    for bit (never merged in place). The merged model's token log-probs equal the adapted
    model's to 1e-5, through the trainer's function and through transformers' plain forward."""
    from transformers import AutoModelForCausalLM

    model, *_ = _trained(toy_model_dir, toy_tokenizer)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    save_lora(model, str(tmp_path))
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(load_file(f"{toy_model_dir}/model.safetensors"))
    assert not (tmp_path / "adapter_config.json").exists()
    adapter = tmp_path / ADAPTER_DIR
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))

    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(merged).__name__ == "LlamaForCausalLM"
    rows = _rows(toy_tokenizer, 6)
    t = collate([p for p, _, _ in rows] * 2, [c for _, c, _ in rows] + [r for *_, r in rows],
                toy_tokenizer.pad_token_id)
    args = (t["input_ids"], t["attention_mask"], t["labels"])
    with torch.no_grad():
        adapted, mask = model_token_logps(model, *args)
        got, merged_mask = model_token_logps(merged, *args)
    assert torch.equal(mask, merged_mask)
    torch.testing.assert_close(got, adapted, atol=1e-5, rtol=0)
    plain = [plain_logp(merged, p, c) for p, c in zip([p for p, _, _ in rows] * 2,
                                                      [c for _, c, _ in rows]
                                                      + [r for *_, r in rows], strict=True)]
    assert adapted.double().sum(-1).tolist() == pytest.approx(plain, abs=1e-5)
    # the adapters did move the model: the merged weights are not the toy's
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                           load_file(f"{toy_model_dir}/model.safetensors")[
                               "model.layers.0.self_attn.q_proj.weight"])


def test_resume_loads_the_adapter_onto_the_base_and_continues_exactly(
        toy_model_dir, toy_tokenizer, tmp_path):
    """A checkpoint at step 3 (merged model + adapter + optimizer state, as `report_checkpoint`
    writes it) resumed by `load_policy`: the base weights are the toy's (not the merged ones),
    the adapter is the trained one, the optimizer state loads onto its parameters, and step 3
    gives the same weights as the run that went on uninterrupted."""
    model, optimizer, scheduler, _, cfg = _trained(toy_model_dir, toy_tokenizer)
    save_lora(model, str(tmp_path))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": 3, "epoch": 1}, tmp_path / STATE_FILE)
    trained = _lora_state(model)
    table = _table(toy_tokenizer, 12, "dpo")
    cfg = {**cfg, "total_steps": 4}
    on, *_ = _train(model, table, cfg, start_step=3,
                    optimizer_state=torch.load(tmp_path / STATE_FILE, weights_only=True))

    resumed = load_policy(cfg, str(tmp_path), resumed=True)
    stored = load_file(f"{toy_model_dir}/model.safetensors")
    for name, value in resumed.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, stored[_base_name(name)]), name
    assert list(_lora_state(resumed)) == list(trained)
    for name, value in _lora_state(resumed).items():
        assert torch.equal(value, trained[name]), name
    again, *_ = _train(resumed, table, cfg, start_step=3,
                       optimizer_state=torch.load(tmp_path / STATE_FILE, weights_only=True))
    for name, value in _lora_state(on).items():
        torch.testing.assert_close(_lora_state(again)[name], value, atol=1e-6, rtol=0,
                                   msg=name)


# --- the lean log-prob path -------------------------------------------------------------------


def _peft_toy(toy_model_dir, target_modules="all-linear"):
    """The toy wrapped with adapters whose B is random (a fresh B is 0: the adapters would
    neither change the log-probs nor get gradients in A)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = add_lora(AutoModelForCausalLM.from_pretrained(toy_model_dir),
                     {**SETTINGS, "target_modules": target_modules})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.train()


@pytest.mark.parametrize("targets, lean", [("all-linear", True), ("q_proj,lm_head", False)])
def test_lean_log_probs_of_a_peft_model_equal_the_full_logits(toy_model_dir, toy_tokenizer,
                                                              targets, lean):
    """The PeftModel forwards `get_decoder` (the body with the adapters injected) and
    `get_output_embeddings` to the base model: the lean path applies and its token log-probs
    and every adapter's gradient equal PEFT's own forward through the full logits to 1e-5. An
    adapter on the output head makes it no plain Linear: the full path then serves."""
    import peft

    model = _peft_toy(toy_model_dir, targets)
    assert lean_supported(model) == lean
    assert isinstance(model.get_decoder().layers[0].self_attn.q_proj, peft.tuners.lora.Linear)
    rows = _rows(toy_tokenizer, 5)
    t = collate([p for p, _, _ in rows], [c + r for _, c, r in rows], toy_tokenizer.pad_token_id)
    args = (t["input_ids"], t["attention_mask"], t["labels"])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    want, want_mask = per_token_logps(logits, t["labels"])
    want_grads = torch.autograd.grad(want.double().sum(), list(params.values()))
    got, mask = model_token_logps(model, *args, chunk=3)
    grads = torch.autograd.grad(got.double().sum(), list(params.values()))
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name, a, b in zip(params, grads, want_grads, strict=True):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "-1"], r"lora\.r must be >= 0 \(0: full fine-tuning\), got -1$"),
    (["--lora-r", "4", "--lora-alpha", "0"], r"lora\.alpha must be > 0, got 0\.0$"),
    (["--lora-dropout", "1"], r"lora\.dropout must be in \[0, 1\), got 1\.0$"),
    (["--lora-target-modules", " , "], r"lora\.target_modules must be all-linear or "),
])
@pytest.mark.parametrize("command", ["train", "sft"])
def test_bad_settings_stop_on_the_driver_in_one_line(toy_model_dir, tmp_path, capsys, command,
                                                     flags, message):
    """Checked before any data is read or Ray starts (the fixture refuses Ray here)."""
    from jobs.cli import main

    data = ["--data", str(tmp_path / "nowhere")] + (["--beta", "0.1"] if command == "train"
                                                      else [])
    out = tmp_path / "out"
    assert main([command, "--model", toy_model_dir, *data, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("odpo ")]
    assert line.startswith(f"odpo {command}: error: ")
    assert re.search(message, line), line
    assert not out.exists()


def test_yaml_section_and_unknown_target_modules(toy_model_dir):
    """`lora: {r: 8, alpha: 16, ...}` in a config file; a comma list becomes PEFT's list (a plain
    string would be a regex to PEFT); module names the model lacks are one line."""
    from transformers import AutoModelForCausalLM

    from jobs.config import build
    from pipeline.errors import UserError
    from trainer.dpo import DPOConfig
    from trainer.lora import target_modules

    cfg = build(DPOConfig, {"model": "m", "data": "d", "out": "o", "beta": 0.1,
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                     "target_modules": "all-linear"}}, "t.yaml")
    assert cfg.lora == LoraSettings(r=8, alpha=16.0)
    assert DPOConfig("m", "d", "o", 0.1).lora.r == 0  # off by default: full fine-tuning
    with pytest.raises(UserError, match=r"unknown key\(s\) \['lora\.rank'\] for LoraSettings"):
        build(DPOConfig, {"model": "m", "data": "d", "out": "o", "beta": 0.1,
                          "lora": {"rank": 8}}, "t.yaml")
    assert target_modules("all-linear") == "all-linear"
    assert target_modules("q_proj, v_proj,") == ["q_proj", "v_proj"]
    assert target_modules("q_proj") == ["q_proj"]
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    with pytest.raises(UserError, match=r"^lora\.target_modules 'qq_proj': Target modules "
                                        r"\{'qq_proj'\} not found"):
        add_lora(model, {**SETTINGS, "target_modules": "qq_proj"})


def test_trainable_share_of_the_toy(toy_model_dir):
    """r 4 on every linear layer of the 0.66M-parameter toy: 30,720 adapter parameters (4.4%),
    counted by hand: 3 layers x 4 x (in + out) of q, k, v, o (128 -> 128) and gate, up (128 ->
    384), down (384 -> 128)."""
    model = _peft_toy(toy_model_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * 4 * (4 * (128 + 128) + 2 * (128 + 384) + (384 + 128)) == 30_720
    total = sum(p.numel() for p in model.parameters())
    assert trainable / total == pytest.approx(0.0441, abs=1e-4)


# --- a real run -----------------------------------------------------------------------------


@pytest.mark.slow
def test_odpo_train_with_lora_publishes_a_merged_model_and_the_adapter(
        ray_local, toy_model_dir, toy_tokenizer, tmp_path):
    """`odpo train --lora-r 4` on real Ray Train, 3 steps on a precompute stage whose reference
    log-probs are the toy's plain forward: step 0 is ln 2; `out/model` is a plain HF checkpoint
    (the toy's keys, no PEFT files) equal to the toy plus `out/adapter`, loaded by PEFT, in
    log-probs to 1e-5."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.cli import main
    from pipeline.manifest import read_manifest, write_stage

    toy = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    table = _table(toy_tokenizer, 12, "dpo", model=toy)
    data = tmp_path / "precompute"
    write_stage(data, "precompute", {"test": True}, {},
                lambda d: pq.write_table(table, f"{d}/part-00000.parquet"), rows_in=12,
                dropped={})
    out = tmp_path / "train"
    assert main(["train", "--model", toy_model_dir, "--data", str(data), "--out", str(out),
                 "--beta", "0.1", "--lr", "1e-2", "--lr-schedule", "constant",
                 "--batch-size", "4", "--max-steps", "3", "--log-every", "1",
                 "--torch-threads", "2", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert abs(metrics[0]["dpo_loss"] - math.log(2)) < 1e-5
    assert abs(metrics[0]["rewards/chosen"]) < 1e-5
    assert read_manifest(out)["complete"]

    model_dir, adapter = out / "model", out / "adapter"
    assert set(load_file(model_dir / "model.safetensors")) == set(
        load_file(f"{toy_model_dir}/model.safetensors"))
    assert not list(model_dir.glob("adapter*")) and not (model_dir / STATE_FILE).exists()
    assert (adapter / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    adapted = PeftModel.from_pretrained(copy.deepcopy(toy), str(adapter))
    moved = 0.0
    for p, c, r in _rows(toy_tokenizer, 4):
        for completion in (c, r):
            want = plain_logp(merged, p, completion)
            with torch.no_grad():
                logits = adapted(input_ids=torch.tensor([p + completion])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            got = sum(float(logprobs[len(p) + j - 1, t]) for j, t in enumerate(completion))
            assert got == pytest.approx(want, abs=1e-5)
            moved = max(moved, abs(want - plain_logp(toy, p, completion)))
    assert moved > 1e-3  # the adapters trained
