"""Shared fixtures. Anything that starts Ray or vLLM is session-scoped and shared."""

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

    from jobs.runtime import init_ray

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
