"""The two-node cluster run of tests/test_cluster.py (one node with a fake GPU): TWO_NODES runs
in a fresh interpreter with its own `ray.cluster_utils.Cluster`, started in the background when
the session begins (conftest's `two_nodes_run`), so that its ~3 minutes overlap the other tests'
idle CPU; its tests run last and read what it wrote."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, odpo
TIMEOUT = 900  # seconds for the whole run, overlapping the rest of the suite


def env() -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # as after `source .venv/bin/activate`
    env.pop("RAY_ADDRESS", None)
    return env


def our_pids(temp_dir: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


TWO_NODES = r"""
import json, os, sys, time
from pathlib import Path
import ray
import ray.data
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from jobs.cli import main as cli

a, temp_dir = json.loads(sys.argv[1]), sys.argv[2]
seconds = {}


def main(argv):  # the command's exit code; its wall time into `seconds`, for a slow run's log
    t0 = time.time()
    try:
        return cli(argv)
    finally:
        seconds[f"{len(seconds)} {argv[0]}"] = round(time.time() - t0, 1)
        print(f"STEP {list(seconds.items())[-1]}", flush=True)


model, data, pairs, work, s3 = a["model"], a["data"], a["pairs"], a["work"], a["s3"]
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "temp_dir": temp_dir})
c.add_node(num_cpus=3, num_gpus=1)  # a fake GPU: Ray counts it, nothing uses CUDA
c.wait_for_nodes()
# Ray Data starts an actor pool's actors without waiting for them: the first engine up could
# sample both batches while the second still waits for CPUs that a read task holds, and never
# be placed. Wait for both, so that where they ran is what this test checks.
ray.data.DataContext.get_current().wait_for_min_actors_s = 300
A = ["--address", c.address]
rc = {}


def actors():
    return list_actors(detail=True, limit=1000)  # dead ones too: every stage's actors


try:
    # A local --out (run_dir, policy) on a two-node cluster: refused before any work.
    out = f"{work}/refused"
    rc["refused"] = {
        "sample": main(["sample", *A, "--model", model, "--prompts", data, "--out", out]),
        "score": main(["score", *A, "--samples", data, "--scorer", "addition", "--out", out]),
        "pair": main(["pair", *A, "--scored", data, "--out", out]),
        "precompute": main(["precompute", *A, "--pairs", pairs, "--model", model, "--out", out]),
        "train": main(["train", *A, "--model", model, "--data", data, "--beta", "0.1",
                       "--out", out]),
        "sft": main(["sft", *A, "--model", model, "--data", data, "--out", out]),
        "eval": main(["eval", *A, "--model", model, "--prompts", data, "--scorer", "addition",
                       "--out", out]),
        "import": main(["import", *A, "--data", pairs, "--out", out]),
    }
    rc["iterate_run_dir"] = main(["iterate", *A, "--config", a["local_config"]])
    rc["iterate_policy"] = main(["iterate", *A, "--config", a["mixed_config"]])
    rc["refused_wrote"] = os.path.exists(out) or os.path.exists(f"{work}/run")

    # Everything on S3: two vLLM engines and two DDP workers, too big for one node each, so
    # one on each node, each reading the model from its node's copy of the S3 checkpoint.
    rc["s3_sample"] = main(["sample", *A, "--model", s3["model"], "--prompts", s3["prompts"],
                            "--out", f"{s3['run']}/samples", "--k", "2", "--max-tokens", "2",
                            "--batch-size", "2", "--engine-replicas", "2",
                            "--engine-cpus-per-replica", "2",
                            "--engine-gpu-memory-utilization", "0.06"])
    rc["s3_precompute"] = main(["precompute", *A, "--pairs", s3["pairs"], "--model", s3["model"],
                                "--out", f"{s3['run']}/precompute", "--cache-dir", ""])
    rc["s3_train"] = main(["train", *A, "--model", s3["model"], "--data",
                           f"{s3['run']}/precompute", "--out", f"{s3['run']}/train", "--beta",
                           "0.1", "--lr", "5e-4", "--batch-size", "4", "--max-steps", "2",
                           "--num-workers", "2", "--cpus-per-worker", "2", "--log-every", "1"])
    ran = {}
    for x in actors():
        if x.node_id:  # an actor that never started has no node
            ran.setdefault(x.class_name, set()).add(x.node_id)
    before = {x.actor_id for x in actors()}

    os.environ["ODPO_SHARED_STORAGE"] = "1"  # one machine: both nodes share its disk
    # With use_gpu each stage asks Ray for the GPU; the stage then fails on this CPU-only torch /
    # vLLM (no CUDA), after Ray has placed it.
    rc["precompute"] = main(["precompute", *A, "--pairs", pairs, "--model", model, "--out",
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
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    gpu_node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")][0]
    placed = [{"cls": x.class_name, "node_gpu": x.node_id == gpu_node,
               "resources": x.required_resources} for x in actors() if x.actor_id not in before]
    # to a file: a long line on stdout can be split by Ray's log lines going to the same log
    Path(a["result"]).write_text(json.dumps({"rc": rc, "nodes": nodes, "placed": placed,
                                            "seconds": seconds,
                                            "ran": {k: sorted(v) for k, v in ran.items()}}))
finally:
    ray.shutdown()
    c.shutdown()
"""



def start(toy_model_dir: str, toy_data_dir, bucket: str, tmp: Path) -> dict:
    """Write the run's inputs (local, and on S3 in `bucket`) under `tmp` and start TWO_NODES in
    the background; `finish` waits for it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    pairs, prompts = tmp / "pairs.parquet", tmp / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"{i}+2=" for i in range(8)],
                             "chosen": [str(i + 2) for i in range(8)],
                             "rejected": [str(i + 3) for i in range(8)]}), pairs)
    # 4 prompts in batches of 2: a batch for each of the two engines
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(4)]}), prompts)
    work = tmp / "work"
    work.mkdir()
    b = bucket
    for f in sorted(Path(toy_model_dir).iterdir()):
        storage.copy(str(f), f"{b}/model/{f.name}")
    storage.copy(str(prompts), f"{b}/data/prompts.parquet")
    storage.copy(str(pairs), f"{b}/data/pairs.parquet")
    s3 = {"model": f"{b}/model", "prompts": f"{b}/data/prompts.parquet",
          "pairs": f"{b}/data/pairs.parquet", "run": f"{b}/run"}
    config = {"rounds": 1, "prompts": s3["prompts"], "eval_prompts": s3["prompts"],
              "scorer": "addition", "train": {"beta": 0.1}}
    configs = {
        "local_config": {**config, "run_dir": str(work / "run"), "policy": s3["model"]},
        # run_dir on S3, but the policy on this node's disk
        "mixed_config": {**config, "run_dir": f"{b}/iterate", "policy": toy_model_dir},
    }
    for name, values in configs.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(values))
    args = {"model": toy_model_dir, "data": str(toy_data_dir), "pairs": str(pairs),
            "work": str(work), "s3": s3, "result": str(tmp / "result.json"),
            **{n: str(tmp / f"{n}.yaml") for n in configs}}
    temp_dir = tempfile.mkdtemp(prefix="odpo2n", dir="/tmp")  # Ray's socket paths must be short
    run_env = env()
    run_env.pop("ODPO_SHARED_STORAGE", None)
    log = tmp / "two_nodes.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", TWO_NODES, json.dumps(args), temp_dir],
                                cwd=REPO, env=run_env, stdout=f, stderr=subprocess.STDOUT)
    return {"proc": proc, "temp_dir": temp_dir, "log": log, "tmp": tmp, "started": time.time(),
            "work": work, "s3": s3, "bucket": b, "model": toy_model_dir}


def finish(run: dict) -> dict:
    """Wait for `start`'s run (until TIMEOUT after its start), kill what it leaves if it died
    first, and return {"rc", "log", "result" (None if it wrote none), and `start`'s paths}."""
    proc = run["proc"]
    try:
        rc = proc.wait(timeout=max(1, TIMEOUT - (time.time() - run["started"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    finally:
        for pid in our_pids(run["temp_dir"]):  # only if the driver died before c.shutdown()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(run["temp_dir"], ignore_errors=True)
    result = run["tmp"] / "result.json"
    return {"rc": rc, "log": run["log"].read_text(errors="replace"),
            "result": json.loads(result.read_text()) if result.exists() else None,
            **{k: run[k] for k in ("work", "s3", "bucket", "model")}}
