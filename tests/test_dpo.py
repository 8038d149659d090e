"""`odpo train` on real Ray Train, against docs/design.md's invariants and a plain PyTorch DPO step.
(A trained checkpoint sampled by vLLM: the end-to-end run's round 1 eval, tests/test_iterate.py.)"""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from jobs.cli import main
from pipeline.manifest import write_stage

BETA, ALPHA = 0.1, 1.0
# The 24-step run that the live-reference, crash and worker-kill runs must reproduce. At 2e-3 it
# also learns the preference clearly (24 steps at 5e-4 moved the margins by 0.01 to 0.08,
# depending on the session's SFT model: too close to the 0.05 asked below).
RUN = ("--epochs", "6", "--max-steps", "24", "--lr", "2e-3")


def _wrong(answer: str) -> str:
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def _ids(tok, prompt, completion):
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, c


def _seq_logp(model, p, c):
    """Summed completion log-prob of one unpadded sequence, float32 log-softmax (no shared code
    with the project's logps / collate)."""
    logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(p) + j - 1, t] for j, t in enumerate(c))


def _write_reference_shards(out, model_dir, rows):
    """Reference shards with log-probs computed here, independently of `odpo reference`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = []
    with torch.inference_mode():
        for i, r in enumerate(rows):
            p, c = _ids(tok, r["prompt"], r["answer"])
            _, rj = _ids(tok, r["prompt"], _wrong(r["answer"]))
            records.append({
                "prompt_id": f"p{i}", "prompt": r["prompt"], "chosen": r["answer"],
                "rejected": _wrong(r["answer"]), "chosen_score": 1.0, "rejected_score": 0.0,
                "round": 0, "prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": rj,
                "ref_chosen_logps": float(_seq_logp(model, p, c)),
                "ref_rejected_logps": float(_seq_logp(model, p, rj)),
            })
    schema = pa.schema([
        ("prompt_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
        ("rejected", pa.string()), ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()), ("round", pa.int64()),
        ("prompt_input_ids", pa.list_(pa.int32())), ("chosen_input_ids", pa.list_(pa.int32())),
        ("rejected_input_ids", pa.list_(pa.int32())), ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
    ])
    table = pa.Table.from_pylist(records, schema=schema)
    write_stage(out, "reference", {"model": model_dir}, {}, lambda d: pq.write_table(
        table, d / "part-00000.parquet"), rows_in=len(records), dropped={})
    return records


@pytest.fixture(scope="session")
def policy_dir(sft_run):
    return str(sft_run / "model")


@pytest.fixture(scope="session")
def ref_shards(policy_dir, toy_data_dir, tmp_path_factory):
    rows = pq.read_table(toy_data_dir / "prompts.parquet").to_pylist()
    out = tmp_path_factory.mktemp("ref") / "reference"
    _write_reference_shards(out, policy_dir, rows)
    return out


def _train(policy_dir, data, out, *extra):
    args = ["train", "--model", policy_dir, "--data", str(data), "--out", str(out),
            "--beta", str(BETA), "--alpha", str(ALPHA), "--lr", "5e-4", "--lr-schedule",
            "constant", "--batch-size", "16", "--log-every", "1", *extra]
    assert main(args) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def cached_run(ray_local, policy_dir, ref_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "cached"
    return out, _train(policy_dir, ref_shards, out, *RUN)


def test_step_zero_is_ln2_with_zero_rewards(cached_run):
    _, metrics = cached_run
    first = metrics[0]
    assert first["step"] == 0
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5


def test_preference_is_learned(cached_run):
    _, metrics = cached_run
    assert metrics[-1]["rewards/accuracies"] > 0.5
    early = sum(m["rewards/margins"] for m in metrics[:4]) / 4
    late = sum(m["rewards/margins"] for m in metrics[-4:]) / 4
    assert late > early + 0.05
    for key in ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "tokens_per_s"):
        assert key in metrics[0]


@pytest.fixture(scope="module")
def live_run(ray_local, policy_dir, ref_shards, tmp_path_factory):
    """cached_run with the reference model loaded beside the policy instead of the shards'."""
    out = tmp_path_factory.mktemp("dpo") / "live"
    args = (*RUN, "--reference", "live")
    return out, args, _train(policy_dir, ref_shards, out, *args)


def test_live_reference_gives_the_same_losses(cached_run, live_run):
    """24 steps: a reference that moved with the policy would part from the cached one.

    Step 0 is equal to 1e-6. After it the two runs are two trainings whose reference values
    differ in the last float32 bits (the cache stores float64 sums of the same float32
    log-softmax): at lr 2e-3 that grows to ~3e-5 by step 22 (measured), while a reference that
    moved with the policy would be off by the policy's own change, ~1e-1 by then."""
    _, cached = cached_run
    _, _, live = live_run
    assert [m["step"] for m in live] == [m["step"] for m in cached]
    for a, b in zip(cached, live, strict=True):
        tol = 1e-6 if a["step"] == 0 else 2e-4
        for key in ("loss", "dpo_loss", "rewards/chosen", "rewards/rejected"):
            assert abs(a[key] - b[key]) < tol, (a["step"], key, a[key], b[key])


def _plain_pytorch_step(policy_dir, records):
    """One DPO+NLL AdamW step over `records`, one sequence at a time, formulas written here.
    Returns the weights and the (clipped) gradients of the step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    model.train()
    losses = []
    for r in records:
        pc = _seq_logp(model, r["prompt_input_ids"], r["chosen_input_ids"])
        pr = _seq_logp(model, r["prompt_input_ids"], r["rejected_input_ids"])
        h = (pc - r["ref_chosen_logps"]) - (pr - r["ref_rejected_logps"])
        nll = -pc / len(r["chosen_input_ids"])
        losses.append(-F.logsigmoid(BETA * h) + ALPHA * nll)
    torch.stack(losses).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.0)
    opt.step()
    return model.state_dict(), grads


def test_one_step_matches_plain_pytorch(ray_local, policy_dir, toy_data_dir, tmp_path):
    """2 DDP workers x 8 pairs equal the single-process step on 16 (one worker's `train_steps`
    equals two workers' with accumulation: tests/test_loop.py)."""
    from transformers import AutoModelForCausalLM

    rows = pq.read_table(toy_data_dir / "prompts.parquet").to_pylist()[:16]
    records = _write_reference_shards(tmp_path / "ref", policy_dir, rows)
    out = tmp_path / "run"
    _train(policy_dir, tmp_path / "ref", out, "--max-steps", "1", "--num-workers", "2",
           "--cpus-per-worker", "1", "--torch-threads", "1", "--no-shuffle")
    expected, grads = _plain_pytorch_step(policy_dir, records)
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for name, value in expected.items():
        # Adam's first step moves a weight by lr·g/(|g| + 1e-8): where |g| < 1e-7 that ratio
        # rides on g's rounding noise (the two sum in different orders), so those weights are
        # held to the step's size, lr (seen: |g| = 1.4e-9 moved 1.6e-5 apart at lr 5e-4).
        tol = torch.where(grads[name].abs() < 1e-7, 5e-4, 1e-5)
        diff = (trained[name] - value).abs()
        assert (diff <= tol).all(), (name, diff.max().item())


def test_refuses_shards_without_reference_columns(toy_model_dir, tmp_path, capsys):
    """Refused on the driver, naming the step that makes them, before Ray starts."""
    table = pa.Table.from_pylist([{"prompt_id": "a", "prompt": "1+1=", "chosen": "2",
                                   "rejected": "3", "chosen_score": 1.0,
                                   "rejected_score": 0.0, "round": 0}])
    write_stage(tmp_path / "pairs", "pair", {}, {}, lambda d: pq.write_table(
        table, d / "part-00000.parquet"), rows_in=1, dropped={})
    rc = main(["train", "--model", toy_model_dir, "--data", str(tmp_path / "pairs"), "--out",
               str(tmp_path / "out"), "--beta", "0.1"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "odpo reference" in err
    assert not (tmp_path / "out").exists()


def test_resume_after_crash_continues_the_same_run(ray_local, cached_run, policy_dir,
                                                   ref_shards, tmp_path):
    """Kill `odpo train` (driver, its Ray and workers) after a checkpoint; the same command
    resumes from it and finishes with the losses of the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "crash"
    args = ["train", "--model", policy_dir, "--data", str(ref_shards), "--out", str(out),
            "--beta", str(BETA), "--alpha", str(ALPHA), "--lr-schedule", "constant",
            "--batch-size", "16", "--log-every", "1", *RUN, "--save-every", "4"]
    # The killed driver joins the session's Ray, so the kill takes its Train controller and
    # workers down with it (they are owned by the driver) while the cluster stays up.
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--address", address],
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((out / "ray" / "dpo").glob("checkpoint_*/trainer_state.pt")):
                time.sleep(1.0)
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()

    assert main(args) == 0
    assert (out / "model" / "model.safetensors").exists()
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(24))
    _, uninterrupted = cached_run
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def test_rerun_of_a_current_run_is_skipped(policy_dir, ref_shards, live_run, capsys):
    """`odpo train` skips a run whose manifest is current: nothing trained, nothing rewritten.
    (A half-done run of the same config resumes: the crash test above; another config starts
    over from step 0: the changed-section test of tests/test_iterate.py.)"""
    out, args, metrics = live_run
    weights = (out / "model" / "model.safetensors").read_bytes()
    mtime = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert _train(policy_dir, ref_shards, out, *args) == metrics
    assert "skipped: up to date" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_train_worker_killed_restarts_from_checkpoint(ray_local, cached_run, policy_dir,
                                                      ref_shards, tmp_path):
    """SIGKILL a Ray Train worker after a checkpoint: `FailureConfig(max_failures)` restarts the
    worker group from the last checkpoint and the run finishes with the uninterrupted losses."""
    import signal
    import threading
    import time

    import psutil

    out = tmp_path / "worker"
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            if list((out / "ray" / "dpo").glob("checkpoint_*/trainer_state.pt")):
                for p in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in c for c in p.info["cmdline"] or []):
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                        break
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        metrics = _train(policy_dir, ref_shards, out, *RUN, "--save-every", "4",
                         "--max-failures", "2")
    finally:
        stop.set()
        thread.join()
    assert killed, "no train worker was killed"
    assert [m["step"] for m in metrics] == list(range(24))
    _, uninterrupted = cached_run
    for a, b in zip(uninterrupted, metrics, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
