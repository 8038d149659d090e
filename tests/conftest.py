"""Shared fixtures. Anything that starts Ray or vLLM is session-scoped and shared."""

import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def toy_data_dir(tmp_path_factory):
    from jobs.cli import main

    out = tmp_path_factory.mktemp("data") / "addition"
    assert main(["toy", "data", "--out", str(out), "--sft-rows", "4096", "--prompts", "64",
                 "--heldout", "64"]) == 0
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
def sft_run(ray_local, toy_model_dir, toy_data_dir, tmp_path_factory):
    """A short real `odpo sft` run (40 steps) with vLLM evaluation: the tests' SFT model."""
    from jobs.cli import main

    out = tmp_path_factory.mktemp("sft") / "run"
    rc = main(["sft", "--model", toy_model_dir, "--data", str(toy_data_dir / "sft.parquet"),
               "--out", str(out), "--max-steps", "40", "--batch-size", "64", "--log-every", "10",
               "--warmup-steps", "5", "--eval-prompts", str(toy_data_dir / "heldout.parquet"),
               "--eval-samples", "2"])
    assert rc == 0
    return out


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


@pytest.fixture(scope="session")
def sample_run(ray_local, sft_run, sample_prompts, tmp_path_factory):
    """One real `odpo sample` (vLLM on CPU in a Ray Data actor): 16 prompts x k=4 from the
    tests' SFT model. Returns the stage directory."""
    from jobs.cli import main

    out = tmp_path_factory.mktemp("stages") / "samples"
    assert main(["sample", "--model", str(sft_run / "model"), "--prompts", str(sample_prompts),
                 "--out", str(out), "--k", "4", "--max-tokens", "8", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="session")
def score_run(sample_run):
    """`odpo score` of `sample_run` with the built-in exact-answer verifier."""
    from jobs.cli import main

    out = sample_run.parent / "scored"
    assert main(["score", "--samples", str(sample_run), "--out", str(out),
                 "--scorer", "exact"]) == 0
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
