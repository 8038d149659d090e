"""`odpo submit`: send a command to a Ray cluster as a job, as `ray job submit` does, follow its log
and exit with its outcome (0 SUCCEEDED, 1 FAILED or STOPPED).

Ctrl-C while following stops the following, not the job (Ray's convention: a job lives on the
cluster, `ray job stop ID` ends it); the command prints that line and exits 130."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from pipeline.errors import UserError


@dataclass(frozen=True)
class SubmitConfig:
    address: str  # the head's dashboard, e.g. http://127.0.0.1:8265: it names the cluster
    entrypoint: str  # shell command the job runs (`odpo submit ... -- odpo iterate --config F`)
    working_dir: str | None = "."  # uploaded as the job's cwd (.gitignore'd paths stay out)
    runtime_env: str | None = None  # runtime-env YAML, e.g. jobs/runtime_env.yaml
    submission_id: str | None = None  # job id to use; None lets Ray name it (raysubmit_...)
    wait: bool = True  # follow the log until the job ends; --no-wait returns once submitted


def runtime_env(cfg: SubmitConfig) -> dict:
    """The job's runtime env: the YAML file's mapping plus the working dir, as `ray job submit
    --runtime-env FILE --working-dir DIR` builds it."""
    from jobs.config import load_yaml

    env = load_yaml(cfg.runtime_env) if cfg.runtime_env else {}
    if cfg.working_dir:
        env["working_dir"] = cfg.working_dir
    return env


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        hint = ""
        if "Authentication" in str(e):
            hint = " (the head uses token auth: export RAY_AUTH_MODE=token)"
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot reach the Ray job server at {address}: {first}{hint}") from e


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _final_status(client, job_id: str, timeout_s: float = 30.0):
    """The job's status once terminal (the log stream can close a moment before it is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def run_submit(cfg: SubmitConfig) -> int:
    """Submit `cfg.entrypoint`; follow it unless `cfg.wait` is off. Returns the exit code."""
    if not cfg.entrypoint.strip():
        raise UserError("no command to run: give it after `--`, e.g. `-- odpo iterate --config F`")
    env = runtime_env(cfg)
    client = _client(cfg.address)
    try:
        job_id = client.submit_job(entrypoint=cfg.entrypoint, runtime_env=env,
                                   submission_id=cfg.submission_id)
    except RuntimeError as e:  # e.g. "No available agent" right after `ray start`: try again
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"job submission to {cfg.address} failed: {first}") from e
    print(f"odpo submit: job {job_id} submitted to {cfg.address}", flush=True)
    if not cfg.wait:
        print(f"odpo submit: follow it with `ray job logs {job_id} --follow --address "
              f"{cfg.address}`; stop it with `ray job stop {job_id} --address {cfg.address}`")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
        info = _final_status(client, job_id)
    except KeyboardInterrupt:
        print(f"\nodpo submit: stopped following; job {job_id} keeps running on the cluster. "
              f"Stop it with `ray job stop {job_id} --address {cfg.address}`", file=sys.stderr)
        return 130
    status = str(info.status.value)
    if status == "SUCCEEDED":
        print(f"odpo submit: job {job_id} SUCCEEDED", flush=True)
        return 0
    message = (info.message or "").strip().splitlines()
    print(f"odpo submit: job {job_id} {status}" + (f": {message[-1]}" if message else ""),
          file=sys.stderr)
    return 1
