"""`odpo sft` on real Ray Train (the end-to-end run's SFT step, `sft_run`), checked against
transformers; its numerics against plain PyTorch are in tests/test_loop.py."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main


def test_writes_hf_checkpoint_metrics_and_eval(sft_run, e2e_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(sft_run / "model")
    AutoTokenizer.from_pretrained(sft_run / "model")
    lines = [json.loads(x) for x in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 10, 20, 30, 39]
    assert lines[-1]["loss"] < lines[0]["loss"] - 1.0  # it learned
    assert all(x["tokens_per_s"] > 0 for x in lines)
    assert list((sft_run / "tensorboard").glob("events.out.tfevents.*"))
    # iterate's round 0 is the evaluation of the SFT model
    result = json.loads((e2e_run["run"] / "round_0" / "eval.json").read_text())
    assert result["model"] == str(sft_run / "model")
    assert result["num_prompts"] == 64 and 0.0 <= result["greedy_reward"] <= 1.0


def test_vllm_greedy_matches_transformers_greedy(sft_run, e2e_run, toy_data_dir):
    """The checkpoint loads in vLLM unchanged: its greedy text equals transformers' own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = json.loads((e2e_run["run"] / "round_0" / "eval.json").read_text())
    assert result["model"] == str(sft_run / "model")
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


def _e2e_sft_args(e2e_run) -> list[str]:
    """`odpo sft` with the settings the end-to-end run's iterate gave its SFT step."""
    cfg = e2e_run["cfg"]
    args = ["sft", "--model", cfg.policy, "--data", cfg.sft_data, "--out",
            str(e2e_run["run"] / "sft")]
    for key, value in cfg.sft.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_rerun_skips_training_and_evaluates_only_what_changed(e2e_run, toy_data_dir, capsys):
    """`odpo sft` and `odpo eval --out` skip when their manifests are current. On the end-to-end
    run's SFT (trained by iterate, so also: the command line and iterate make one config): an
    unchanged re-run trains nothing; asking for an evaluation evaluates without retraining; then
    both are current, and so is the same evaluation asked of `odpo eval --out`."""
    sft = e2e_run["run"] / "sft"
    model = sft / "model" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_e2e_sft_args(e2e_run)) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == mtime and not (sft / "eval.json").exists()

    heldout = str(toy_data_dir / "heldout.parquet")
    args = [*_e2e_sft_args(e2e_run), "--eval-prompts", heldout, "--eval-samples", "1",
            "--scorer", "addition"]
    assert main(args) == 0  # training skipped, the evaluation run
    assert model.stat().st_mtime_ns == mtime
    result = json.loads((sft / "eval.json").read_text())
    assert result["num_prompts"] == 64 and result["samples_per_prompt"] == 1
    eval_mtime = (sft / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == mtime
    assert (sft / "eval.json").stat().st_mtime_ns == eval_mtime
    # `odpo eval --out` asked for the same evaluation: the same result file, current.
    ev = ["eval", "--model", str(sft / "model"), "--prompts", heldout, "--samples", "1",
          "--scorer", "addition", "--seed", "0", "--out", str(sft / "eval.json")]
    assert main(ev) == 0
    assert "skipped: up to date" in capsys.readouterr().out
    assert (sft / "eval.json").stat().st_mtime_ns == eval_mtime
