"""Issue 8: run on a Ray cluster. A real head started with `ray start --head` on loopback (its own
temp dir and ports, so other Ray instances on the machine are untouched), jobs sent with
`ray job submit` exactly as README's "Run on a cluster" shows, and the storage check for
multi-node clusters."""

import json
import os
import shlex
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
from conftest import write_digits_scorer

from pipeline.cluster import check_shared_storage
from pipeline.errors import UserError
from pipeline.storage import is_uri

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
    # The 40-step SFT model is rarely exactly right (0 of 512 samples, seen), so the jobs score
    # partial credit (share of answer digits in place) and pair best against worst, as
    # test_iterate does: every round has pairs to train on.
    scorer = write_digits_scorer(tmp / "digits.py")
    config = {
        "run_dir": str(run),
        "rounds": 1,
        "policy": str(sft_run / "model"),
        "prompts": str(toy_data_dir / "prompts.parquet"),
        "eval_prompts": str(toy_data_dir / "heldout.parquet"),
        "scorer": scorer,
        # a small vLLM memory budget: other Ray jobs and tests may share this machine
        "sample": {"k": 8, "max_tokens": 8, "engine": {"gpu_memory_utilization": 0.06}},
        "pair": {"mode": "best_worst"},
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


def _own_cluster(script: str, args: list[str], prefix: str, timeout: int) -> str:
    """Run `script` (which starts and shuts down its own `ray.cluster_utils.Cluster` in the
    temp dir it is given last) in a fresh interpreter; kill what it leaves if it dies first.
    Returns its output; fails the test on a non-zero exit."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray's socket paths must be short
    env = _env()
    env.pop("ODPO_SHARED_STORAGE", None)
    try:
        out = subprocess.run([sys.executable, "-c", script, *args, temp_dir], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=timeout)
    finally:
        for pid in _our_pids(temp_dir):  # only if the driver died before c.shutdown()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


TWO_NODES = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from jobs.cli import main

local_config, mixed_config, s3_config, temp_dir = sys.argv[1:5]
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "temp_dir": temp_dir})
c.add_node(num_cpus=3)
c.wait_for_nodes()
try:
    rejected = main(["iterate", "--config", local_config, "--address", c.address])
    rejected_input = main(["iterate", "--config", mixed_config, "--address", c.address])
    ok = main(["iterate", "--config", s3_config, "--address", c.address])
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    ran = {}
    for a in ray._private.state.actors().values():  # dead ones too: every stage's actors
        ran.setdefault(a["ActorClassName"], set()).add(a["Address"]["NodeID"])
    print("RESULT " + json.dumps({"rejected": rejected, "rejected_input": rejected_input,
                                  "ok": ok, "nodes": nodes,
                                  "ran": {k: sorted(v) for k, v in ran.items()}}))
finally:
    ray.shutdown()
    c.shutdown()
"""


@pytest.mark.slow
def test_two_nodes_sample_and_train_on_both(sft_run, toy_data_dir, tmp_path, s3_server):
    """A two-node cluster on this machine: a local run_dir is refused; with everything on S3 (the
    policy, the prompts, the run directory) one round runs with two vLLM engines and two DDP
    train workers, one on each node, each reading the model from its own node-local copy."""
    from pipeline import storage

    config = _config(tmp_path, sft_run, toy_data_dir,
                     sample={"k": 8, "max_tokens": 8,
                             "engine": {"replicas": 2, "cpus_per_replica": 2.0,
                                        "gpu_memory_utilization": 0.06}})
    values = yaml.safe_load(config.read_text())
    values["train"].update(num_workers=2, cpus_per_worker=2.0)
    config.write_text(yaml.safe_dump(values))
    bucket = s3_server("twonodes")
    for f in sorted((sft_run / "model").iterdir()):
        storage.copy(str(f), f"{bucket}/sft/{f.name}")
    for name in ("prompts", "heldout"):
        storage.copy(str(toy_data_dir / f"{name}.parquet"), f"{bucket}/data/{name}.parquet")
    run = f"{bucket}/run"
    values.update(run_dir=run, policy=f"{bucket}/sft", prompts=f"{bucket}/data/prompts.parquet",
                  eval_prompts=f"{bucket}/data/heldout.parquet")
    s3_config = tmp_path / "s3.yaml"
    s3_config.write_text(yaml.safe_dump(values))
    mixed = tmp_path / "mixed.yaml"  # run_dir on S3, but the policy on this node's disk
    mixed.write_text(yaml.safe_dump({**values, "policy": str(sft_run / "model")}))
    log = _own_cluster(TWO_NODES, [str(config), str(mixed), str(s3_config)], "odpo2n",
                       timeout=600)
    assert "is a local path but the Ray cluster has 2 nodes" in log
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    print(json.dumps(result, indent=1))
    errors = [line for line in log.splitlines() if "odpo iterate: error" in line]
    assert result["rejected"] == 2 and result["rejected_input"] == 2 and result["ok"] == 0, errors
    assert (f"odpo iterate: error: policy '{sft_run / 'model'}' is a local path but the Ray "
            "cluster has 2 nodes") in log
    assert len(result["nodes"]) == 2
    trainers = result["ran"]["RayTrainWorker"]
    engines = [v for k, v in result["ran"].items() if "MapWorker" in k]
    assert sorted(trainers) == result["nodes"], result
    assert any(sorted(v) == result["nodes"] for v in engines), result
    assert not (tmp_path / "run").exists()  # the refused local run wrote nothing
    e = json.loads(storage.read_text(f"{run}/round_1/eval.json"))
    assert e["num_prompts"] == 64 and e["model"] == f"{run}/round_1/train/model"
    summary = json.loads(storage.read_text(f"{run}/iterate_summary.json"))
    assert summary["report"] == f"{run}/report/report.md"
    assert storage.is_file(f"{run}/report/reward.png")
    for stage in ("samples", "scored", "pairs", "reference"):
        assert json.loads(storage.read_text(f"{run}/round_1/{stage}/manifest.json"))["complete"]
    assert storage.is_file(f"{run}/round_1/train/model/model.safetensors")
    assert storage.read_text(f"{run}/round_1/train/metrics.jsonl").count("\n") >= 1


# --- odpo submit ------------------------------------------------------------------------------


def _readme_submit(head: dict, entrypoint: list[str]) -> list[str]:
    """README's `odpo submit` line as written (continuation lines joined), pointed at this test's
    head, with `entrypoint` after its `--` in place of the README's iterate command."""
    lines = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("odpo submit "))
    text = ""
    for line in lines[start:]:
        text += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    argv = shlex.split(text)
    argv[argv.index("--address") + 1] = head["address"]
    return argv[: argv.index("--") + 1] + entrypoint


def _odpo_submit(head: dict, entrypoint: list[str]) -> subprocess.CompletedProcess:
    for _ in range(10):  # the head's job agent registers a few seconds after `ray start`
        out = subprocess.run(_readme_submit(head, entrypoint), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


@pytest.mark.slow
def test_odpo_submit_succeeds_and_fails(head, tmp_path):
    data = tmp_path / "data"
    out = _odpo_submit(head, ["odpo", "toy", "data", "--out", str(data), "--sft-rows", "64",
                              "--prompts", "8", "--heldout", "8"])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    job_id = log.split("odpo submit: job ", 1)[1].split()[0]
    assert job_id.startswith("raysubmit_"), log
    assert f"odpo submit: job {job_id} SUCCEEDED" in out.stdout, log
    assert f"addition data in {data}" in out.stdout  # the job's own output, streamed back
    assert (data / "prompts.parquet").exists() and (data / "heldout.parquet").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"no_such_key": 1}))
    out = _odpo_submit(head, ["odpo", "iterate", "--config", str(bad)])
    log = out.stdout + out.stderr
    assert out.returncode == 1, log[-4000:]
    assert "odpo iterate: error:" in out.stdout and "no_such_key" in out.stdout, log  # streamed
    failed = [line for line in out.stderr.splitlines() if " FAILED: " in line]
    assert len(failed) == 1 and "unknown key(s) ['no_such_key']" in failed[0], log


@pytest.mark.slow
def test_odpo_submit_ctrl_c_leaves_the_job_running(head):
    sleeper = ["python", "-c", "import time; print('tick', flush=True); time.sleep(90)"]
    proc = subprocess.Popen(_readme_submit(head, sleeper), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        for line in proc.stdout:  # the job's log, streamed: interrupt once it is running
            seen += line
            if line.startswith("tick"):
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, seen + rest + err
    job_id = seen.split("odpo submit: job ", 1)[1].split()[0]
    assert f"job {job_id} keeps running on the cluster" in err, err
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert "RUNNING" in status.stdout + status.stderr, status.stdout + status.stderr
    stop = shlex.split(err.split("Stop it with `", 1)[1].split("`", 1)[0])  # the printed command
    assert stop[:3] == ["ray", "job", "stop"], err
    out = subprocess.run(stop, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' was stopped" in status.stdout + status.stderr, status.stdout


# --- every writing command checks its storage; GPU requests on a fake-GPU node ---------------


FAKE_GPU = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from jobs.cli import main

model, data, pairs, work, temp_dir = sys.argv[1:6]
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": temp_dir})
c.add_node(num_cpus=2, num_gpus=1)  # a fake GPU: Ray counts it, nothing uses CUDA
c.wait_for_nodes()
A = ["--address", c.address]
rc = {}
try:
    # A local --out on a two-node cluster: refused before any work (no paths need to exist).
    out = f"{work}/refused"
    rc["refused"] = {
        "sample": main(["sample", *A, "--model", model, "--prompts", data, "--out", out]),
        "score": main(["score", *A, "--samples", data, "--scorer", "addition", "--out", out]),
        "pair": main(["pair", *A, "--scored", data, "--out", out]),
        "reference": main(["reference", *A, "--pairs", pairs, "--model", model, "--out", out]),
        "train": main(["train", *A, "--model", model, "--data", data, "--beta", "0.1",
                       "--out", out]),
        "sft": main(["sft", *A, "--model", model, "--data", data, "--out", out]),
        "eval": main(["eval", *A, "--model", model, "--prompts", data, "--out", out]),
        "import": main(["import", *A, "--data", pairs, "--out", out]),
    }
    rc["refused_wrote"] = os.path.exists(out)
    os.environ["ODPO_SHARED_STORAGE"] = "1"  # one machine: both nodes share its disk
    # With use_gpu each stage asks Ray for the GPU; the stage then fails on this CPU-only torch /
    # vLLM (no CUDA), after Ray has placed it.
    rc["reference"] = main(["reference", *A, "--pairs", pairs, "--model", model, "--out",
                            f"{work}/ref", "--use-gpu", "--cpus-per-replica", "0.5",
                            "--cache-dir", ""])
    rc["sample"] = main(["sample", *A, "--model", model, "--prompts", f"{data}/prompts.parquet",
                         "--out", f"{work}/samples", "--engine-use-gpu",
                         "--engine-cpus-per-replica", "0.5", "--engine-dtype", "no-such-dtype"])
    try:
        rc["sft"] = main(["sft", *A, "--model", model, "--data", f"{data}/sft.parquet",
                          "--out", f"{work}/sft", "--use-gpu", "--cpus-per-worker", "0.5",
                          "--max-steps", "1", "--batch-size", "4"])
    except Exception as e:  # noqa: BLE001 - a CUDA/NCCL failure is the expected end here
        rc["sft"] = type(e).__name__
    gpu_node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")][0]
    placed = [{"cls": a.class_name, "node_gpu": a.node_id == gpu_node,
               "resources": a.required_resources}
              for a in list_actors(detail=True, limit=1000)]
    print("RESULT " + json.dumps({"rc": rc, "placed": placed}))
finally:
    ray.shutdown()
    c.shutdown()
"""


def _placed(result: dict, name: str) -> list[dict]:
    """The actors of class `name`, with placement-group resource names (GPU_group_0_<pg>, as Ray
    Train's workers have) read as the plain resource (GPU)."""
    actors = [dict(a) for a in result["placed"] if name in a["cls"]]
    for a in actors:
        a["resources"] = {k.split("_group_")[0]: v for k, v in a["resources"].items()
                          if not k.startswith("bundle_group")}
    return actors


@pytest.mark.slow
def test_storage_check_and_gpu_requests_on_cluster(toy_model_dir, toy_data_dir, tmp_path):
    """Two nodes, one with a fake GPU. Every command that writes refuses a local --out with one
    line and writes nothing; with ODPO_SHARED_STORAGE=1, `reference --use-gpu`, `sample
    --engine-use-gpu` and `sft --use-gpu` put their actors / workers on the GPU node, each
    requesting one GPU and the fractional CPUs asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["1+2=", "3+4="], "chosen": ["3", "7"],
                             "rejected": ["4", "8"]}), pairs)
    work = tmp_path / "work"
    work.mkdir()
    log = _own_cluster(FAKE_GPU, [toy_model_dir, str(toy_data_dir), str(pairs), str(work)],
                       "odpogpu", timeout=500)
    assert "RESULT " in log, log[-4000:]
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    print(json.dumps({"rc": result["rc"], **{k: _placed(result, k) for k in (
        "ReferenceForward", "VLLMSampler", "RayTrainWorker")}}, indent=1))

    refused = result["rc"]["refused"]
    assert refused == dict.fromkeys(refused, 2) and len(refused) == 8, log[-4000:]
    local = f"{work}/refused"
    for cmd in refused:
        line = (f"odpo {cmd}: error: out {local!r} is a local path but the Ray cluster has 2 "
                "nodes: use shared storage (a URI such as s3://bucket/run, or a shared mount "
                "with ODPO_SHARED_STORAGE=1)")
        assert log.count(line) == 1, (cmd, log[-4000:])
    assert not result["rc"]["refused_wrote"]

    assert result["rc"]["reference"] == 2 and "CUDA" in log  # no CUDA here: fails once placed
    refs = _placed(result, "ReferenceForward")
    assert refs and all(a["node_gpu"] and a["resources"] == {"GPU": 1.0, "CPU": 0.5}
                        for a in refs), refs
    assert result["rc"]["sample"] == 2
    engines = _placed(result, "VLLMSampler")
    assert engines and all(a["node_gpu"] and a["resources"] == {"GPU": 1.0, "CPU": 0.5}
                           for a in engines), engines
    assert result["rc"]["sft"] != 0
    workers = _placed(result, "RayTrainWorker")
    assert workers and all(a["node_gpu"] and a["resources"] == {"GPU": 1.0, "CPU": 0.5}
                           for a in workers), workers
