"""The suite's one real end-to-end run (conftest's `e2e_run`): `odpo iterate`, one round from the
toy model, in a process of its own on the session's Ray, started when the session begins so that
it overlaps the first tests. Run as a script: `python tests/e2e.py ROOT RAY_ADDRESS`."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT = 900  # seconds for both runs


class Interrupted(Exception):
    """A run stopped at a chosen step (Ctrl-C, a lost driver), raised by a stand-in step."""


def write_digits_scorer(path) -> str:
    """A scorer file giving partial credit (the share of answer digits in place), for runs from
    the 40-step test SFT model, which is rarely exactly right: best-vs-worst pairs then always
    exist. Returns the `file.py:function` spec."""
    path.write_text(
        "def score(prompts, responses, rows):\n"
        "    out = []\n"
        "    for r, row in zip(responses, rows):\n"
        "        got, want = r.strip(), row['answer']\n"
        "        hits = sum(a == b for a, b in zip(got, want))\n"
        "        out.append(hits / max(len(got), len(want), 1))\n"
        "    return out\n"
    )
    return f"{path}:score"



def config(root: Path, policy: str, toy_data_dir: Path, prompts: Path):
    """The run's IterateConfig, its data written under `root` (JSONL, as a user's own task data
    often is)."""
    import pyarrow.parquet as pq

    from jobs.iterate import IterateConfig

    jsonl = {}
    for name in ("sft", "heldout"):
        jsonl[name] = root / f"{name}.jsonl"
        jsonl[name].write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(
            Path(toy_data_dir) / f"{name}.parquet").to_pylist()))
    return IterateConfig(
        run_dir=str(root / "run"), rounds=1, policy=policy, sft_data=str(jsonl["sft"]),
        prompts=str(prompts), eval_prompts=str(jsonl["heldout"]),
        # The 40-step SFT model is rarely exactly right: partial credit, best against worst,
        # so that the round has pairs to train on.
        scorer=write_digits_scorer(root / "digits.py"),
        seed=2,  # round 1 samples with seed 3
        sft={"max_steps": 40, "batch_size": 64, "lr": 3e-3, "lr_schedule": "constant",
             "warmup_steps": 5, "log_every": 10, "torch_threads": 2},
        sample={"k": 4, "max_tokens": 8},
        pair={"mode": "best_worst"},
        precompute={"cache_dir": str(root / "cache")},
        # 24 steps at 2e-3: the DPO run of tests/test_dpo.py too (step 0 at ln 2, the
        # preference learned, reproduced by the live-reference, crash and worker-kill runs)
        train={"beta": 0.1, "alpha": 1.0, "lr": 2e-3, "lr_schedule": "constant", "epochs": 24,
               "max_steps": 24, "batch_size": 4, "log_every": 1, "torch_threads": 2},
        eval={"samples": 2},
    )


def start(root: Path, policy: str, toy_data_dir: Path, prompts: Path, address: str) -> dict:
    """Write the config and start the run (this file as a script) on the Ray at `address`."""
    cfg = config(root, policy, toy_data_dir, prompts)
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    log = root / "e2e.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, str(root), address],
                                stdout=f, stderr=subprocess.STDOUT)
    return {"proc": proc, "root": root, "cfg": cfg, "log": log, "started": time.time()}


def finish(run: dict) -> dict:
    """Wait for `start`'s run; its results (conftest's `e2e_run`)."""
    proc = run["proc"]
    try:
        rc = proc.wait(timeout=max(1, TIMEOUT - (time.time() - run["started"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    result = run["root"] / "result.json"
    assert rc == 0 and result.exists(), run["log"].read_text(errors="replace")[-4000:]
    out = json.loads(result.read_text())
    return {"run": run["root"] / "run", "cfg": run["cfg"],
            "stopped": {Path(p): t for p, t in out["stopped"].items()},
            "train_metrics": out["train_metrics"]}


def main(root: Path, address: str) -> None:
    """The run, stopped once where round 1's training starts, then run again; results to
    ROOT/result.json."""
    import pytest

    from jobs import iterate
    from jobs.iterate import IterateConfig, run_iterate
    from pipeline.cluster import init_ray
    from trainer import dpo

    init_ray(address, log_to_driver=False)
    cfg = IterateConfig(**json.loads((root / "config.json").read_text()))

    def stopped(cfg):
        raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        for module in (iterate, dpo):
            mp.setattr(module, "run_dpo", stopped, raising=False)
        try:
            run_iterate(cfg)
        except Interrupted:
            pass
        else:
            raise AssertionError("the stand-in training step was never reached")
    run = root / "run"
    written = {str(p): p.stat().st_mtime_ns for p in run.rglob("*.json")
               if p.name in ("manifest.json", "eval.json")}
    run_iterate(cfg)
    metrics = (run / "round_1" / "train" / "metrics.jsonl").read_text().splitlines()
    (root / "result.json").write_text(json.dumps({
        "stopped": written, "train_metrics": [json.loads(line) for line in metrics]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
