"""Shared fixtures. Anything that starts Ray or vLLM is session-scoped and shared."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: each toy `fit` waited ~3 s for polls
# between its start, its workers and its end (measured: a 1-step fit 15-17 s -> 12-13 s at
# 0.2 s). Read by every Ray process started after this (they inherit this environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# pytest-xdist (`make test-fast`): each worker's torch would take a thread per core, so two
# workers on two cores run four OpenMP threads that spin-wait for each other on the many small
# ops here (measured side by side, 546 tests: 70.7 s that way, 28.8 s with OMP_NUM_THREADS=1).
# Each worker gets its share of the cores instead.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 for the storage tests is moto's server on loopback (`s3_server`). Its address and fake
# credentials are set before anything starts, so every Ray worker of the session inherits them,
# and no test can reach a real bucket.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
for _key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_key, None)


# ---------------------------------------------------------------- `slow`: Ray or vLLM

# Fixtures that start Ray (and with it any vLLM engine), directly or through the fixtures they
# use: a test that needs one is `slow` without saying so. `make test-fast` runs the rest.
SLOW_FIXTURES = {"ray_local", "head"}
BACKGROUND_FIXTURE = "two_nodes"  # tests/test_cluster.py's two-node run (tests/two_nodes.py)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The tests of the run started in the background (`_background_runs`) go last: by then it
    # has finished, having used the CPU the other tests leave idle.
    items.sort(key=lambda item: BACKGROUND_FIXTURE in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _no_ray_unless_slow(request, monkeypatch):
    """A test not marked `slow` runs without Ray, whatever ran before it: starting Ray there
    fails the test (vLLM runs only inside Ray actors or a slow test's own process)."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it slow")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API, in memory); yields a factory that
    creates a fresh bucket and returns its s3:// URI."""
    import itertools

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto S3 server did not start") from None
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3")
        counter = itertools.count()

        def bucket(prefix: str = "odpo") -> str:
            name = f"{prefix}-{next(counter)}"
            client.create_bucket(Bucket=name)
            return f"s3://{name}"

        bucket.client = client
        yield bucket
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _background_runs(request):
    """The two-node cluster run (tests/two_nodes.py, ~3 minutes in a process of its own) starts
    with the session when any of its tests is selected; they run last (see
    pytest_collection_modifyitems) and wait for it. On 2 cores the rest of the suite leaves a
    quarter of the CPU idle (Ray and vLLM processes starting, polls): the run uses that."""
    if any(BACKGROUND_FIXTURE in getattr(i, "fixturenames", ()) for i in request.session.items):
        request.getfixturevalue("two_nodes_run")


@pytest.fixture(scope="session")
def two_nodes_run(toy_model_dir, toy_data_dir, s3_server, tmp_path_factory):
    """tests/two_nodes.py's run, started; its module fixture `two_nodes` waits for it."""
    import two_nodes

    run = two_nodes.start(toy_model_dir, toy_data_dir, s3_server("twonodes"),
                          tmp_path_factory.mktemp("two_nodes"))
    yield run
    if run["proc"].poll() is None:  # its tests were not reached (-x, Ctrl-C): stop it
        run["proc"].kill()
        two_nodes.finish(run)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    from pipeline.toy import ToyConfig, init_toy_model

    out = tmp_path_factory.mktemp("toy") / "model"
    init_toy_model(ToyConfig(out=str(out)))
    return str(out)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model_dir)


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """`odpo toy init --tokenizer bpe`: the toy Llama (random weights) with the byte-level BPE
    chat tokenizer, end of turn `<|im_end|>` beside EOS `<|endoftext|>`."""
    from pipeline.toy import ToyConfig, init_toy_model

    out = tmp_path_factory.mktemp("bpe_toy") / "model"
    init_toy_model(ToyConfig(out=str(out), tokenizer="bpe"))
    return str(out)


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    """The addition task's sft (4096 rows), prompts (64) and heldout (64) Parquet files."""
    from pipeline.toy import write_task_data

    out = tmp_path_factory.mktemp("data") / "addition"
    write_task_data(out, sft_rows=4096, prompts=64, heldout=64)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session, on loopback, with spare logical CPUs so a train worker,
    Ray Data tasks and a vLLM actor never wait on each other on a 2-core machine."""
    import ray

    from pipeline.cluster import init_ray

    # Workers' output is not forwarded: it would arrive late, in whichever test's captured stderr
    # is open then (a vLLM actor's shutdown noise inside a one-line-error check).
    init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_prompts(toy_data_dir, tmp_path_factory):
    """16 addition prompts plus one empty, one longer than the toy's 64-token context and one
    repeat of the first: 19 rows, of which 16 can be sampled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(toy_data_dir / "prompts.parquet").to_pylist()[:16]
    rows += [{"prompt": "", "answer": "0"}, {"prompt": "1+" * 40 + "1=", "answer": "41"},
             dict(rows[0])]
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class Interrupted(Exception):
    """A run stopped at a chosen step (Ctrl-C, a lost driver), raised by a stand-in step."""


@pytest.fixture(scope="session")
def e2e_run(ray_local, toy_model_dir, toy_data_dir, sample_prompts, tmp_path_factory):
    """The suite's one real end-to-end run: `odpo iterate`, one round from the toy model: SFT
    (40 steps, on JSONL), round 0 eval, sample -> score -> pair -> precompute -> DPO+NLL train ->
    round 1 eval, report. It is stopped once where round 1's training starts and run again, as a
    user re-runs the command after a Ctrl-C. Its SFT model (`sft_run`) and its round 1 samples
    (`sample_run`) are the other tests' model and samples; tests/test_iterate.py checks the run.

    Returns {"run": run dir, "cfg": its IterateConfig, "stopped": {path: mtime_ns} of every
    manifest.json / eval.json the stopped run had written, "train_metrics": round 1's training
    metrics as the run wrote them (a test retrains that round later)}."""
    import pyarrow.parquet as pq

    from jobs import iterate
    from jobs.iterate import IterateConfig, run_iterate
    from trainer import dpo

    root = tmp_path_factory.mktemp("e2e")
    jsonl = {}
    for name in ("sft", "heldout"):  # JSONL, as a user's own task data often is
        jsonl[name] = root / f"{name}.jsonl"
        jsonl[name].write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(
            toy_data_dir / f"{name}.parquet").to_pylist()))
    cfg = IterateConfig(
        run_dir=str(root / "run"), rounds=1, policy=toy_model_dir, sft_data=str(jsonl["sft"]),
        prompts=str(sample_prompts), eval_prompts=str(jsonl["heldout"]),
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

    def stopped(cfg):
        raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        for module in (iterate, dpo):
            mp.setattr(module, "run_dpo", stopped, raising=False)
        with pytest.raises(Interrupted):
            run_iterate(cfg)
    run = root / "run"
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*.json")
               if p.name in ("manifest.json", "eval.json")}
    run_iterate(cfg)
    metrics = (run / "round_1" / "train" / "metrics.jsonl").read_text().splitlines()
    return {"run": run, "cfg": cfg, "stopped": written,
            "train_metrics": [json.loads(line) for line in metrics]}


@pytest.fixture(scope="session")
def sft_run(e2e_run):
    """The tests' SFT model: the end-to-end run's SFT step (`RUN/sft`: model/, metrics.jsonl)."""
    return e2e_run["run"] / "sft"


@pytest.fixture(scope="session")
def sample_run(e2e_run):
    """The tests' samples: the end-to-end run's round 1 `odpo sample` (vLLM on CPU in a Ray
    Data actor), `sample_prompts` x k=4 from `sft_run`, seed 3, max_tokens 8."""
    return e2e_run["run"] / "round_1" / "samples"


@pytest.fixture(scope="session")
def score_run(sample_run):
    """`odpo score` of `sample_run` with the built-in exact-answer verifier."""
    from pipeline.score import ScoreConfig, run_score

    out = sample_run.parent.parent.parent / "scored_exact"
    run_score(ScoreConfig(samples=str(sample_run), out=str(out), scorer="exact"))
    return out


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


def our_processes(title: str) -> list:
    """This test process's descendants (its embedded Ray's workers and what they spawned) whose
    command line contains `title`: a fault test kills its own Ray's worker, never one of
    another test run on the same machine."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def char_ids(tok, text: str) -> list[int]:
    """The toy tokenizer is one token per character: ids by hand, not via the project's code."""
    return tok.convert_tokens_to_ids(list(text))


def plain_logp(model, prompt_ids, completion_ids) -> float:
    """Summed completion log-prob of one unpadded sequence: plain forward, float32 log-softmax."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + list(completion_ids)])).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return sum(float(logprobs[n + j - 1, t]) for j, t in enumerate(completion_ids))


# ---------------------------------------------------------------- stand-in steps

# Every step `odpo iterate` and `odpo byod` run: (module, function). `stub_steps` replaces each
# in its module and in the entry points that imported it.
STEPS = {
    "sft": ("trainer.sft", "run_sft"), "eval": ("pipeline.evaluate", "run_eval"),
    "sample": ("pipeline.sample", "run_sample"), "score": ("pipeline.score", "run_score"),
    "pair": ("pipeline.pair", "run_pair"),
    "precompute": ("trainer.precompute", "run_precompute"),
    "train": ("trainer.dpo", "run_dpo"), "import": ("pipeline.importer", "run_import"),
}


def stub_steps(monkeypatch) -> list[tuple[str, object]]:
    """Replace every step of iterate / byod by a stand-in that records (step, its config) in the
    returned list and writes, at the path or URI it is given, the few small files the entry
    point and the report read (manifests, eval.json, metrics.jsonl, a model dir). No Ray, no
    model: for what runs in which order with which inputs; the steps themselves are tested on
    their own, and tests/test_iterate.py runs one real round."""
    import importlib

    from pipeline import cluster, storage

    calls: list[tuple[str, object]] = []

    def write_json(path, value):
        storage.write_text(path, json.dumps(value))

    def stage(name, stage_name, rows_in, rows_out, extra=None):
        def run(cfg, **_):
            calls.append((name, cfg))
            write_json(storage.join(cfg.out, "manifest.json"), {
                "stage": stage_name, "complete": True, "rows_in": rows_in, "rows_out": rows_out,
                "dropped": {}, "files": []})
            return {"out": cfg.out, "skipped": False, "dropped": {}, "seconds": 0.0,
                    **(extra or {})}
        return run

    def model_step(name, summary):
        def run(cfg, **_):
            calls.append((name, cfg))
            model = storage.join(cfg.out, "model")
            write_json(storage.join(model, "config.json"), {"stand_in": True})
            if name == "train":
                write_json(storage.join(cfg.out, "metrics.jsonl"), {
                    "step": 0, "loss": 0.69, "logps/chosen": -3.0, "logps/rejected": -4.0,
                    "rewards/margins": 0.0, "rewards/accuracies": 0.5})
            return {"model": model, "skipped": False, "dropped": {}, **summary}
        return run

    def evaluate(cfg, **_):
        calls.append(("eval", cfg))
        n = len([c for c in calls if c[0] == "eval"])
        result = {"model": cfg.model, "prompts": cfg.prompts, "num_prompts": 2,
                  "greedy_reward": n / 10, "sampled_reward": n / 20, "samples_per_prompt": 1,
                  "greedy_texts": ["1", "2"]}
        if cfg.out is not None:
            write_json(cfg.out, result)
        return {**result, "skipped": False}

    fakes = {
        "sft": model_step("sft", {"steps": 3, "rows": 8}),
        "train": model_step("train", {"steps": 2, "pairs": 2}),
        "eval": evaluate,
        "sample": stage("sample", "sample", 2, 8, {"prompts": 2, "samples": 8}),
        "score": stage("score", "score", 8, 8, {"samples": 8, "scored": 8}),
        "pair": stage("pair", "pair", 2, 2, {"prompts": 2, "pairs": 2}),
        "precompute": stage("precompute", "precompute", 2, 2, {"pairs": 2, "cache": "computed"}),
        "import": stage("import", "import", 2, 2, {"rows": 2, "pairs": 2, "form": "standard",
                                                   "prompt_source": "column",
                                                   "prompt_extraction": {}}),
    }
    entry_points = [importlib.import_module(m) for m in ("jobs.iterate", "jobs.byod")]
    for name, (module, function) in STEPS.items():
        for target in (importlib.import_module(module), *entry_points):
            monkeypatch.setattr(target, function, fakes[name], raising=False)
    # Nothing here needs Ray: an entry point that starts it for its steps starts nothing.
    monkeypatch.setattr(cluster, "init_ray", lambda *args, **kwargs: None)
    return calls
