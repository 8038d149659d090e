"""How a stage sizes its model copies and their threads when the user leaves them at auto
(issue 19, item 5): the embedded default uses the machine it is given; a named cluster gets
what each copy reserved; settings the user gives always win."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster import copy_count, copy_threads, local_cpus

REPO = Path(__file__).resolve().parents[1]


def test_local_cpus_is_this_process_share():
    assert local_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_threads_embedded_share_the_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = local_cpus()
    assert copy_threads(0, 1, 1.0) == n  # one copy: every CPU (was 1 thread on 1 reserved CPU)
    assert copy_threads(0, 2, 1.0) == max(1, n // 2)
    assert copy_threads(0, 4 * n, 1.0) == 1  # never 0
    assert copy_threads(3, 1, 1.0) == 3  # a set value wins


def test_threads_on_a_named_cluster_are_the_reservation(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what --address and ray job submit set
    assert copy_threads(0, 1, 1.0) == 1
    assert copy_threads(0, 1, 4.0) == 4
    assert copy_threads(0, 2, 0.5) == 1
    assert copy_threads(2, 1, 0.5) == 2


def test_copies_on_cpu_are_one_unless_set(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert copy_count(0, use_gpu=False) == 1
    assert copy_count(3, use_gpu=False) == 3


SCRIPT = r"""
import json, os, sys
import ray
from pipeline.cluster import copy_count
ray.init(address="local", num_cpus=1, num_gpus=4, include_dashboard=False)
got = {"one_per_gpu": copy_count(0, use_gpu=True),
       "tensor_parallel_2": copy_count(0, use_gpu=True, gpus_per_copy=2),
       "set": copy_count(1, use_gpu=True), "cpu": copy_count(0, use_gpu=False)}
os.environ["RAY_ADDRESS"] = "127.0.0.1:6379"  # a named cluster: Ray's GPUs are not all ours
got["named"] = copy_count(0, use_gpu=True)
ray.shutdown()
print("RESULT " + json.dumps(got))
"""


@pytest.mark.slow
def test_copies_under_use_gpu_are_one_per_local_gpu():
    """A real embedded Ray that counts 4 GPUs (logical: nothing touches CUDA)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) == {
        "one_per_gpu": 4, "tensor_parallel_2": 2, "set": 1, "cpu": 1, "named": 1}


def test_bad_copy_settings_are_one_line_errors(toy_model_dir, tmp_path, capsys):
    from jobs.cli import main

    for flag, value, message in (("--replicas", "-1", "replicas must be >= 0 (0 = auto), got -1"),
                                 ("--torch-threads", "-2", "torch_threads must be >= 0"),
                                 ("--cpus-per-replica", "0", "cpus_per_replica must be > 0")):
        assert main(["precompute", "--pairs", str(tmp_path), "--model", toy_model_dir, "--out",
                     str(tmp_path / "out"), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
