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

    init_ray(num_cpus=4)
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
