"""One vLLM engine per Ray actor, created once and reused across batches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from pipeline.storage import local_copy


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"  # vLLM dtype; "auto" on CPU turns float32 weights into bf16
    max_model_len: int = 0  # tokens of context; 0 uses the model's max_position_embeddings
    tensor_parallel_size: int = 1  # GPUs per engine (1 on CPU)
    # Share of accelerator memory for weights + KV cache. On CPU it is the share of NUMA node
    # 0's memory that vLLM reserves up front (0.3 took 7 GiB and failed when two engines or
    # other jobs shared the machine; 0.1 = 2.4 GiB serves the toy). On a GPU set ~0.85.
    gpu_memory_utilization: float = 0.1
    replicas: int = 1  # engines (Ray actors) running in parallel
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per engine actor
    enforce_eager: bool = True  # skip graph capture/compile: start-up dominates on small runs
    use_gpu: bool = False  # request tensor_parallel_size GPUs per replica from Ray


def request_seed(seed: int, key: str) -> int:
    """Per-request sampling seed from the run seed and the prompt: same seed -> same samples,
    whatever the batching, while different prompts draw independent random streams."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sampling_params_for(prompts: list[str], cfg: dict) -> list:
    """One `SamplingParams(n=k)` per prompt (`cfg`: k, temperature, top_p, max_tokens, seed),
    seeded by the run seed and the prompt text (`request_seed`)."""
    from vllm import SamplingParams

    return [
        SamplingParams(
            n=cfg["k"],
            temperature=cfg["temperature"],
            top_p=cfg["top_p"],
            max_tokens=cfg["max_tokens"],
            seed=request_seed(cfg["seed"], p),
        )
        for p in prompts
    ]


def make_llm(model: str, cfg: EngineConfig, seed: int = 0):
    """Create a `vllm.LLM`. Call it inside a Ray actor or under `__main__` (it spawns).
    A model named by URI is loaded from this node's copy (`storage.local_copy`)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    model = local_copy(model)
    kwargs = {}
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    return LLM(
        model=model,
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        seed=seed,
        trust_remote_code=False,
        load_format="safetensors",  # never unpickle a checkpoint's *.bin
        **kwargs,
    )


def actor_options(cfg: EngineConfig) -> dict:
    """Ray resources for one engine actor."""
    if cfg.use_gpu:
        return {"num_gpus": cfg.tensor_parallel_size, "num_cpus": cfg.cpus_per_replica}
    return {"num_cpus": cfg.cpus_per_replica}
