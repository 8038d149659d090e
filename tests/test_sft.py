"""`odpo sft` end to end on real Ray Train, checked against plain PyTorch and transformers."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main

pytestmark = pytest.mark.slow


def test_writes_hf_checkpoint_metrics_and_eval(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(sft_run / "model")
    AutoTokenizer.from_pretrained(sft_run / "model")
    lines = [json.loads(x) for x in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 10, 20, 30, 39]
    assert lines[-1]["loss"] < lines[0]["loss"] - 1.0  # it learned
    assert all(x["tokens_per_s"] > 0 for x in lines)
    assert list((sft_run / "tensorboard").glob("events.out.tfevents.*"))
    result = json.loads((sft_run / "eval.json").read_text())
    assert result["num_prompts"] == 64 and 0.0 <= result["greedy_reward"] <= 1.0


def test_vllm_greedy_matches_transformers_greedy(sft_run, toy_data_dir):
    """The checkpoint loads in vLLM unchanged: its greedy text equals transformers' own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = json.loads((sft_run / "eval.json").read_text())
    tok = AutoTokenizer.from_pretrained(sft_run / "model")
    model = AutoModelForCausalLM.from_pretrained(sft_run / "model").eval()
    prompts = [r["prompt"] for r in pq.read_table(toy_data_dir / "heldout.parquet").to_pylist()]
    hf = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=16, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    same = sum(a == b for a, b in zip(hf, result["greedy_texts"], strict=True))
    assert same >= 0.95 * len(prompts), list(zip(hf, result["greedy_texts"], strict=True))[:8]


def test_one_step_matches_plain_pytorch(ray_local, toy_model_dir, toy_data_dir, tmp_path):
    """One optimizer step through Ray Train equals AdamW on the token-mean NLL written here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = pq.read_table(toy_data_dir / "sft.parquet").to_pylist()[:32]
    data = tmp_path / "sft32.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "run"
    assert main(["sft", "--model", toy_model_dir, "--data", str(data), "--out", str(out),
                 "--max-steps", "1", "--batch-size", "32", "--warmup-steps", "0",
                 "--grad-clip", "0", "--lr", "1e-3"]) == 0

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    model.train()
    total, count = 0.0, 0
    for r in rows:  # one sequence at a time: no padding, no shared code with the trainer
        prompt = tok(r["prompt"])["input_ids"]
        completion = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for j, target in enumerate(completion):
            total = total - logprobs[len(prompt) + j - 1, target]
            count += 1
    (total / count).backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    opt.step()

    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=0, msg=name)


def _one_line_error(capsys) -> str:
    """The error is one line of our own, with no traceback (Ray may forward worker log lines
    to the driver's stderr as well; those are not the error)."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("odpo sft: error: ")]
    assert len(ours) == 1, err
    assert "Traceback" not in err, err
    return ours[0]


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: d / "absent.parquet", "no such file"),
        (lambda d: _write(d / "garbage.parquet", b"not parquet"), "cannot read"),
        (lambda d: _rows(d / "nocol.parquet", [{"prompt": "1+1=", "answer": "2"}]),
         "missing column(s) ['response']"),
        (lambda d: _rows(d / "empty.parquet", [{"prompt": "1+1=", "response": ""}] * 4),
         "empty response"),
        (lambda d: _rows(d / "long.jsonl", [{"prompt": "1+" * 40 + "1=", "response": "41"}]),
         "longer than max_length 64"),
    ],
)
def test_bad_input_is_one_clear_line(ray_local, toy_model_dir, tmp_path, capsys, make, expect):
    data = make(tmp_path)
    out = tmp_path / "out"
    rc = main(["sft", "--model", toy_model_dir, "--data", str(data), "--out", str(out),
               "--batch-size", "1", "--max-steps", "1"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert expect in line and Path(data).name in line
    assert not out.exists()


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_rerun_skips_training_and_evaluates_only_what_changed(ray_local, toy_model_dir,
                                                              toy_data_dir, tmp_path, capsys):
    """`odpo sft` and `odpo eval --out` skip when their manifests are current: an unchanged
    re-run trains nothing; changed eval settings re-evaluate without retraining."""
    out = tmp_path / "run"
    args = ["sft", "--model", toy_model_dir, "--data", str(toy_data_dir / "sft.parquet"),
            "--out", str(out), "--max-steps", "2", "--batch-size", "16", "--warmup-steps", "0",
            "--eval-prompts", str(toy_data_dir / "heldout.parquet"), "--eval-samples", "1"]
    assert main(args) == 0
    model = out / "model" / "model.safetensors"
    mtime, eval_mtime = model.stat().st_mtime_ns, (out / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == mtime
    assert (out / "eval.json").stat().st_mtime_ns == eval_mtime
    assert main([*args[:-1], "2"]) == 0  # two samples per held-out prompt: a new evaluation
    assert model.stat().st_mtime_ns == mtime
    result = json.loads((out / "eval.json").read_text())
    assert result["samples_per_prompt"] == 2 and result["config"]["samples"] == 2
    # odpo eval --out: the same result file is reused while current
    out_json = tmp_path / "eval.json"
    ev = ["eval", "--model", str(out / "model"), "--prompts",
          str(toy_data_dir / "heldout.parquet"), "--samples", "1", "--out", str(out_json)]
    assert main(ev) == 0
    first = out_json.read_text()
    capsys.readouterr()
    assert main(ev) == 0
    assert "skipped: up to date" in capsys.readouterr().out and out_json.read_text() == first
