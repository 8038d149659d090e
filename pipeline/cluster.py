"""Starting or joining Ray the way this project needs it (docs: Platforms): one `ensure_ray()`
that every stage calls once it knows it has work."""

from __future__ import annotations

import math
import os
import threading

from pipeline.errors import UserError
from pipeline.storage import is_uri

# Environment every job driver and worker gets on a cluster (also in jobs/runtime_env.yaml, which
# `ray job submit --runtime-env` reads).
# RAY_DATA_USE_DATASOURCE_V2=0: Ray 2.60's new Parquet path lists files in a task that starts
# nested footer-reading tasks, each in a fresh worker process; reading one small shard took 13-20 s
# on a 2-core machine against 0.1-0.3 s through the V1 reader (`use_datasource_v2` below).
CLUSTER_ENV_VARS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_LOGGING_LEVEL": "WARNING",
                    "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_USE_DATASOURCE_V2": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             log_to_driver: bool = True) -> None:
    """Join `address` if given (or RAY_ADDRESS, as under `ray job submit`), else start a fresh
    embedded local Ray bound to loopback. `log_to_driver` prints the workers' output here.

    A bare `ray.init()` would join whatever cluster Ray's temp folder last recorded, even a dead
    one, so the embedded default asks for `address="local"` explicitly.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")  # CLUSTER_ENV_VARS
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": dict(CLUSTER_ENV_VARS)}
    if address:
        _defer_to_job_env(env)
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=log_to_driver,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same row order in every stage
    # One progress bar per Ray Data pass (a stage makes one to three), not one per operator as
    # well: the operators' progress is in Ray Data's own log.
    ctx.enable_operator_progress_bars = False
    ctx.use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"] not in ("0", "")


def uninterruptible(fn, *args):
    """`fn(*args)` in a thread of its own, waited for. For imports and model loads in Ray tasks:
    when a stage fails, Ray cancels its sibling tasks by raising KeyboardInterrupt in the task's
    thread; one cancelled in the middle of its first `import torch` would leave a half-imported
    torch in that reused worker, and every later task there would fail ("partially initialized
    module 'torch'"). Here the interrupt stops only the wait, at once: the import finishes in
    its thread (a later import of the same module waits for it on Python's import lock). The
    wait is short joins: Ray delivers the interrupt as `_thread.interrupt_main`, which runs only
    between bytecodes, never inside one long `join()`.
    (Importing torch in every worker at start, as a setup hook, also prevents it, but costs every
    Ray process, Ray Train's and Ray Data's helper actors too, 2-3 s: a toy fit took 15-22 s
    with the hook and 10-13 s without, measured side by side.)"""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="odpo-uninterruptible")
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- Cluster runs (issue 8) -------------------------------------------------------------------


def _defer_to_job_env(env: dict) -> None:
    """Under `ray job submit`, Ray refuses a driver runtime env that sets an env var the job's
    runtime env (--runtime-env) already sets: leave those to the job's values."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set for job drivers
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    for key in taken:
        env["env_vars"].pop(key, None)



def check_shared_storage(path: str, what: str, num_nodes: int | None = None) -> None:
    """Reject a plain local `path` when the job runs on a cluster of more than one node: shards,
    manifests and checkpoints written on one node must be readable on the others.

    `num_nodes` defaults to the alive nodes of the connected Ray cluster (1 when Ray is not
    running). A shared mount (NFS, ...) that looks like a local path is accepted with
    ODPO_SHARED_STORAGE=1 in the environment.
    """
    if is_uri(path) or os.environ.get("ODPO_SHARED_STORAGE", "") not in ("", "0"):
        return
    if num_nodes is None:
        import ray

        num_nodes = len([n for n in ray.nodes() if n.get("Alive")]) if ray.is_initialized() else 1
    if num_nodes > 1:
        raise UserError(
            f"{what} {path!r} is a local path but the Ray cluster has {num_nodes} nodes: use "
            "shared storage (a URI such as s3://bucket/run, or a shared mount with "
            "ODPO_SHARED_STORAGE=1)")


def local_cpus() -> int:
    """CPUs this process may run on: its affinity (a container's or `taskset`'s share), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def check_copies(replicas: int, torch_threads: int, cpus_per_replica: float) -> None:
    """A stage's copy settings, refused in one line: counts >= 0 (0 = auto), CPUs > 0."""
    for name, value in (("replicas", replicas), ("torch_threads", torch_threads)):
        if value < 0:
            raise UserError(f"{name} must be >= 0 (0 = auto), got {value}")
    if cpus_per_replica <= 0:
        raise UserError(f"cpus_per_replica must be > 0, got {cpus_per_replica}")


def copy_threads(explicit: int, copies: int, reserved: float) -> int:
    """Intra-op torch threads of one of `copies` model copies (actors, train workers) of a
    stage: `explicit` when set (> 0); with no cluster named (the embedded default: this machine
    is the cluster) this process's CPUs shared out among the copies; on a named cluster, where a
    copy may land on any node beside others' tasks, the CPUs it reserved (at least 1)."""
    if explicit > 0:
        return explicit
    if not cluster_named():
        return max(1, local_cpus() // max(1, copies))
    return max(1, math.ceil(reserved))


def copy_count(explicit: int, use_gpu: bool, gpus_per_copy: int = 1) -> int:
    """Model copies (Ray Data actors) of a stage: `explicit` when set (> 0); with no cluster
    named and `use_gpu`, one per `gpus_per_copy` of the GPUs the embedded Ray found (call it
    after `ensure_ray`); else 1 (on CPU, one copy with every thread beats copies that split
    them, and holds one model)."""
    if explicit > 0:
        return explicit
    if use_gpu and not cluster_named():
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        return max(1, gpus // max(1, gpus_per_copy))
    return 1


def cluster_named() -> bool:
    """Whether a Ray cluster is named (RAY_ADDRESS: `--address`, or `ray job submit`): then a
    stage joins and checks it before any work, even one that turns out to be a skip."""
    return bool(os.environ.get("RAY_ADDRESS"))


def ensure_ray(out: str | None = None, inputs: dict[str, str | None] | None = None,
               what: str = "out") -> None:
    """Start or join Ray (`init_ray`; a no-op when this process is already connected), then
    refuse a local `out` on a multi-node cluster (`check_shared_storage`) before the stage
    writes, and likewise a local path among `inputs` ({name: path}: models, datasets that Ray
    tasks, actors or workers read on any node) that exists here (a hub id is no local path)."""
    init_ray()
    if out:
        check_shared_storage(out, what)
    for name, path in (inputs or {}).items():
        if path and not is_uri(path) and os.path.exists(path):
            check_shared_storage(path, name)
