"""Issue 8: run on a Ray cluster. A real head started with `ray start --head` on loopback (its own
temp dir and ports, so other Ray instances on the machine are untouched), jobs sent with
`ray job submit` and `odpo submit` exactly as README's "Run on a cluster" shows (cheap commands:
what runs inside a job is tested on its own), and one two-node cluster (one node with a fake GPU)
for the storage checks, placement across nodes with everything on S3, and GPU requests."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from two_nodes import BIN, REPO, env, finish, our_pids

from pipeline.cluster import check_shared_storage
from pipeline.errors import UserError
from pipeline.storage import is_uri


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports on loopback, all held open while they are chosen (ports picked one
    at a time can repeat: the head once got the same port for GCS and dashboard)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with a 4-CPU budget; stopped by killing only its own
    processes (its process group and anything naming its temp dir), never a bare `ray stop`."""
    temp_dir = tempfile.mkdtemp(prefix="odpohead", dir="/tmp")  # short: AF_UNIX path limit
    gcs, dash, agent, agent_grpc, metrics = _free_ports(5)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--port", str(gcs),
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--num-cpus", "4", "--temp-dir", temp_dir]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    pgids = {os.getpgid(p) for p in our_pids(temp_dir)}
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
        for pid in our_pids(temp_dir):  # also those started in sessions of their own (jobs)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while our_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        for pid in our_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: dict, entrypoint: list[str], timeout: int = 400):
    """README: `ray job submit --address ... --working-dir . --runtime-env jobs/runtime_env.yaml
    -- odpo iterate --config FILE` (waits for the job, streams its logs, exits with its status),
    with `entrypoint` after the `--`."""
    cmd = ["ray", "job", "submit", "--address", head["address"], "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint]
    for _ in range(10):  # the head's job agent registers a few seconds after `ray start`
        out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


def _samples_file(path: Path) -> Path:
    """Three samples of one prompt, for a stage that runs on Ray Data in a few seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt_id": ["p0"] * 3, "prompt": ["1+1="] * 3,
                             "response": ["2", "3", " 2"], "sample_index": [0, 1, 2],
                             "answer": ["2"] * 3}), path)
    return path


@pytest.mark.slow
def test_job_submit_succeeds_and_fails(head, tmp_path):
    """A stage as a job: its driver joins the head (RAY_ADDRESS, the job's runtime env) and runs
    its Ray Data pipeline there; a bad config fails the job and the error reaches the
    submitter."""
    out = tmp_path / "scored"
    job = _submit(head, ["odpo", "score", "--samples", str(_samples_file(tmp_path / "s.parquet")),
                         "--scorer", "exact", "--out", str(out)])
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and (m["rows_in"], m["rows_out"]) == (3, 3)
    assert str(out) in job.stdout  # the driver's own summary line, streamed back

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "no_such_key": 1}))
    job = _submit(head, ["odpo", "iterate", "--config", str(bad)])
    log = job.stdout + job.stderr
    assert job.returncode != 0
    assert "failed" in log.lower(), log[-4000:]
    assert "no_such_key" in log, log[-4000:]  # the config error reaches the submitter
    assert not (tmp_path / "run").exists()


def test_job_runtime_env_sets_what_every_embedded_run_sets():
    """`ray job submit --runtime-env jobs/runtime_env.yaml` gives the job's driver and workers the
    environment that `init_ray` gives an embedded run (loopback, V1 Parquet reads, ...)."""
    from pipeline.cluster import CLUSTER_ENV_VARS

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    assert env == CLUSTER_ENV_VARS


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
        out = subprocess.run(_readme_submit(head, entrypoint), cwd=REPO, env=env(),
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
    # A terminal starts its command with SIGINT's default action. A test run started with `&`
    # from a script has SIGINT ignored, and a child inherits an ignored signal across exec (then
    # Ctrl-C does nothing and `odpo submit` follows the job to its end): start it as a terminal
    # would, whatever this process inherited (a Python handler is reset to default on exec).
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(_readme_submit(head, sleeper), cwd=REPO, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, handler)
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
                            env=env(), capture_output=True, text=True, timeout=60)
    assert "RUNNING" in status.stdout + status.stderr, status.stdout + status.stderr
    stop = shlex.split(err.split("Stop it with `", 1)[1].split("`", 1)[0])  # the printed command
    assert stop[:3] == ["ray", "job", "stop"], err
    out = subprocess.run(stop, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=env(), capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' was stopped" in status.stdout + status.stderr, status.stdout


# --- two nodes, one with a fake GPU -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(two_nodes_run):
    """The two-node run (tests/two_nodes.py), started in the background when the session began:
    its log and parsed result, once it has finished."""
    run = finish(two_nodes_run)
    assert run["rc"] == 0 and run["result"] is not None, run["log"][-4000:]
    print(json.dumps({k: v for k, v in run["result"].items() if k != "placed"}, indent=1))
    return run


@pytest.mark.slow
def test_local_paths_refused_on_two_nodes(two_nodes):
    """Every command that writes refuses a local --out with one line and writes nothing;
    iterate refuses a local run_dir, and a local policy beside an S3 run_dir."""
    log, rc = two_nodes["log"], two_nodes["result"]["rc"]
    refused = rc["refused"]
    assert refused == dict.fromkeys(refused, 2) and len(refused) == 8, log[-4000:]
    local = f"{two_nodes['work']}/refused"
    for cmd in refused:
        line = (f"odpo {cmd}: error: out {local!r} is a local path but the Ray cluster has 2 "
                "nodes: use shared storage (a URI such as s3://bucket/run, or a shared mount "
                "with ODPO_SHARED_STORAGE=1)")
        assert log.count(line) == 1, (cmd, log[-4000:])
    assert (rc["iterate_run_dir"], rc["iterate_policy"]) == (2, 2), log[-4000:]
    assert (f"odpo iterate: error: run_dir '{two_nodes['work'] / 'run'}' is a local path but "
            "the Ray cluster has 2 nodes") in log
    assert (f"odpo iterate: error: policy '{two_nodes['model']}' is a local path but the Ray "
            "cluster has 2 nodes") in log
    assert not rc["refused_wrote"]


@pytest.mark.slow
def test_sample_and_train_on_both_nodes_with_everything_on_s3(two_nodes):
    """Engines and DDP workers on both nodes, reading the model from S3 and writing there:
    samples and precompute shards, and training's model, metrics, TensorBoard files and Ray
    Train checkpoints all in the bucket."""
    import math

    from safetensors.numpy import load

    from pipeline import storage

    result, s3 = two_nodes["result"], two_nodes["s3"]
    rc = result["rc"]
    assert (rc["s3_sample"], rc["s3_precompute"], rc["s3_train"]) == (0, 0, 0), \
        two_nodes["log"][-4000:]
    assert len(result["nodes"]) == 2
    assert sorted(result["ran"]["RayTrainWorker"]) == result["nodes"], result
    engines = [v for k, v in result["ran"].items() if "VLLMSampler" in k]
    assert any(sorted(v) == result["nodes"] for v in engines), result
    run = s3["run"]
    samples = json.loads(storage.read_text(f"{run}/samples/manifest.json"))
    assert samples["complete"] and samples["rows_out"] == 4 * 2
    assert json.loads(storage.read_text(f"{run}/precompute/manifest.json"))["rows_out"] == 8
    names = {storage.relative(f, f"{run}/train") for f in storage.list_files(f"{run}/train")}
    assert {"model/config.json", "model/model.safetensors", "train_summary.json",
            "metrics.jsonl"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert any(n.startswith("ray/dpo/") for n in names)  # Ray Train's storage_path on S3
    metrics = [json.loads(x) for x in storage.read_text(f"{run}/train/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    # The workers read the policy from their copies of the S3 model and the reference log-probs
    # from the S3 shards: at step 0 they agree, so every reward is 0 and the loss is ln 2.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    summary = json.loads(storage.read_text(f"{run}/train/train_summary.json"))
    assert summary["model"] == f"{run}/train/model" and summary["steps"] == 2
    # The trained model, read back from S3, is whole and moved away from the initial one.
    trained = load(storage.read_bytes(f"{run}/train/model/model.safetensors"))
    initial = load((Path(two_nodes["model"]) / "model.safetensors").read_bytes())
    assert trained.keys() == initial.keys()
    assert max(abs(trained[k] - initial[k]).max() for k in trained) > 1e-4


def _placed(result: dict, name: str) -> list[dict]:
    """The actors of class `name`, with placement-group resource names (GPU_group_0_<pg>, as Ray
    Train's workers have) read as the plain resource (GPU)."""
    actors = [dict(a) for a in result["placed"] if name in a["cls"]]
    for a in actors:
        a["resources"] = {k.split("_group_")[0]: v for k, v in a["resources"].items()
                          if not k.startswith("bundle_group")}
    return actors


@pytest.mark.slow
def test_gpu_requests_land_on_the_gpu_node(two_nodes):
    """With ODPO_SHARED_STORAGE=1, `precompute --use-gpu`, `sample --engine-use-gpu` and `sft
    --use-gpu` put their actors / workers on the GPU node, each requesting one GPU and the
    fractional CPUs asked for."""
    log, result = two_nodes["log"], two_nodes["result"]
    print(json.dumps({k: _placed(result, k) for k in (
        "ReferenceForward", "VLLMSampler", "RayTrainWorker")}, indent=1))
    assert result["rc"]["precompute"] == 2 and "CUDA" in log  # no CUDA here: fails once placed
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
