"""Issue 8: run on a Ray cluster. A real head started with `ray start --head` on loopback (its own
temp dir and ports, so other Ray instances on the machine are untouched), jobs sent with
`ray job submit` exactly as README's "Run on a cluster" shows, and the storage check for
multi-node clusters."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from jobs.runtime import check_shared_storage, is_uri
from pipeline.io import UserError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, odpo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # as after `source .venv/bin/activate`
    env.pop("RAY_ADDRESS", None)
    return env


def _our_pids(temp_dir: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with a 4-CPU budget; stopped by killing only its own
    processes (its process group and anything naming its temp dir), never a bare `ray stop`."""
    temp_dir = tempfile.mkdtemp(prefix="odpohead", dir="/tmp")  # short: AF_UNIX path limit
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--port", str(_free_port()),
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(_free_port()),
           "--dashboard-agent-grpc-port", str(_free_port()),
           "--metrics-export-port", str(_free_port()), "--num-cpus", "4", "--temp-dir", temp_dir]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    pgids = {os.getpgid(p) for p in _our_pids(temp_dir)}
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (Path.home() / ".ray" / "auth_token").exists()
        yield {"address": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir}
    finally:
        for pgid in pgids:
            if pgid != os.getpgid(0):
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        while _our_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        for pid in _our_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: dict, config: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """README: `ray job submit --address ... --working-dir . --runtime-env jobs/runtime_env.yaml
    -- odpo iterate --config FILE` (waits for the job, streams its logs, exits with its status)."""
    cmd = ["ray", "job", "submit", "--address", head["address"], "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--", "odpo", "iterate", "--config",
           str(config)]
    for _ in range(10):  # the head's job agent registers a few seconds after `ray start`
        out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


def _config(tmp: Path, sft_run, toy_data_dir, **extra) -> Path:
    run = tmp / "run"
    config = {
        "run_dir": str(run),
        "rounds": 1,
        "policy": str(sft_run / "model"),
        "prompts": str(toy_data_dir / "prompts.parquet"),
        "eval_prompts": str(toy_data_dir / "heldout.parquet"),
        "scorer": "addition",
        # a small vLLM memory budget: other Ray jobs and tests may share this machine
        "sample": {"k": 8, "max_tokens": 8, "engine": {"gpu_memory_utilization": 0.06}},
        "pair": {"mode": "correct_incorrect"},
        "train": {"beta": 0.1, "alpha": 1.0, "lr": 5.0e-4, "batch_size": 4, "log_every": 1},
        "eval": {"samples": 2, "engine": {"gpu_memory_utilization": 0.06}},
        **extra,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_job_submit_succeeds_and_fails(head, sft_run, toy_data_dir, tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    out = _submit(head, _config(ok, sft_run, toy_data_dir))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    run = ok / "run"
    summary = json.loads((run / "iterate_summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    e = json.loads((run / "round_1" / "eval.json").read_text())
    assert 0.0 <= e["greedy_reward"] <= 1.0 and e["num_prompts"] == 64
    assert (run / "round_1" / "train" / "model" / "model.safetensors").exists()
    assert "iterate: 1 rounds" in log  # the driver's own output streamed back

    bad = tmp_path / "bad"
    bad.mkdir()
    out = _submit(head, _config(bad, sft_run, toy_data_dir, no_such_key=1))
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "failed" in log.lower(), log[-4000:]
    assert "no_such_key" in log, log[-4000:]  # the config error reaches the submitter
    assert not (bad / "run").exists()


def test_uri_detection():
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("GCS://b/x")
    assert not is_uri("/tmp/run") and not is_uri("runs/x") and not is_uri("file:///tmp/run")


def test_local_path_rejected_on_multi_node(monkeypatch):
    monkeypatch.delenv("ODPO_SHARED_STORAGE", raising=False)
    check_shared_storage("/tmp/run", "run_dir", num_nodes=1)  # one node: any path is fine
    check_shared_storage("s3://bucket/run", "run_dir", num_nodes=3)
    with pytest.raises(UserError, match="run_dir '/tmp/run' is a local path but the Ray cluster "
                                        "has 2 nodes"):
        check_shared_storage("/tmp/run", "run_dir", num_nodes=2)
    monkeypatch.setenv("ODPO_SHARED_STORAGE", "1")  # a shared mount (NFS) the user vouches for
    check_shared_storage("/mnt/nfs/run", "run_dir", num_nodes=2)


TWO_NODES = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from jobs.cli import main

config, temp_dir = sys.argv[1], sys.argv[2]
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "temp_dir": temp_dir})
c.add_node(num_cpus=3)
c.wait_for_nodes()
try:
    rejected = main(["iterate", "--config", config, "--address", c.address])
    os.environ["ODPO_SHARED_STORAGE"] = "1"  # one machine: its disk is shared by both nodes
    ok = main(["iterate", "--config", config, "--address", c.address])
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    ran = {}
    for a in ray._private.state.actors().values():  # dead ones too: every stage's actors
        ran.setdefault(a["ActorClassName"], set()).add(a["Address"]["NodeID"])
    print("RESULT " + json.dumps({"rejected": rejected, "ok": ok, "nodes": nodes,
                                  "ran": {k: sorted(v) for k, v in ran.items()}}))
finally:
    ray.shutdown()
    c.shutdown()
"""


@pytest.mark.slow
def test_two_nodes_sample_and_train_on_both(sft_run, toy_data_dir, tmp_path):
    """A two-node cluster on this machine: a local run_dir is refused; with ODPO_SHARED_STORAGE=1
    one round runs with two vLLM engines and two DDP train workers, one on each node."""
    config = _config(tmp_path, sft_run, toy_data_dir,
                     sample={"k": 8, "max_tokens": 8,
                             "engine": {"replicas": 2, "cpus_per_replica": 2.0,
                                        "gpu_memory_utilization": 0.06}})
    values = yaml.safe_load(config.read_text())
    values["train"].update(num_workers=2, cpus_per_worker=2.0)
    config.write_text(yaml.safe_dump(values))
    temp_dir = tempfile.mkdtemp(prefix="odpo2n", dir="/tmp")  # Ray's socket paths must be short
    env = _env()
    env.pop("ODPO_SHARED_STORAGE", None)
    try:
        out = subprocess.run([sys.executable, "-c", TWO_NODES, str(config), temp_dir], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        for pid in _our_pids(temp_dir):  # only if the driver died before c.shutdown()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "is a local path but the Ray cluster has 2 nodes" in log
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    print(json.dumps(result, indent=1))
    errors = [line for line in log.splitlines() if "odpo iterate: error" in line]
    assert result["rejected"] == 2 and result["ok"] == 0, errors
    assert len(result["nodes"]) == 2
    trainers = result["ran"]["RayTrainWorker"]
    engines = [v for k, v in result["ran"].items() if "MapWorker" in k]
    assert sorted(trainers) == result["nodes"], result
    assert any(sorted(v) == result["nodes"] for v in engines), result
    e = json.loads((tmp_path / "run" / "round_1" / "eval.json").read_text())
    assert e["num_prompts"] == 64
