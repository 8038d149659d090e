"""One vLLM engine per Ray actor, created once and reused across batches."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import config_context_length
from pipeline.errors import UserError
from pipeline.storage import local_copy


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"  # vLLM dtype; "auto" on CPU turns float32 weights into bf16
    max_model_len: int = 0  # tokens of context; 0 uses the model's max_position_embeddings
    tensor_parallel_size: int = 1  # GPUs per engine (1 on CPU)
    # Share of accelerator memory for weights + KV cache; 0 picks by device: vLLM's 0.9 on a
    # GPU; on CPU, where it is the share of NUMA node 0's memory that vLLM reserves up front,
    # 0.1 (0.3 took 7 GiB and failed when two engines or other jobs shared a 24 GiB machine).
    gpu_memory_utilization: float = 0.0
    # KV cache in GiB; 0 = auto: under use_gpu vLLM's own (gpu_memory_utilization); on CPU,
    # room for vLLM's 256 concurrent sequences at full context, at most the
    # gpu_memory_utilization share. On CPU vLLM allocates and zeroes the whole cache at start:
    # the 2.4 GiB share of a 24 GiB machine took 2-13 s of page faults where the toy needs 48 MiB
    # (kv_cache_bytes).
    kv_cache_gib: float = 0.0
    # engines (Ray actors) running in parallel (`odpo sample`; eval runs one); 0 = auto: with no
    # cluster named, one per tensor_parallel_size local GPUs under use_gpu, else 1
    # (pipeline.cluster.copy_count)
    replicas: int = 0
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per engine actor
    # Skip CUDA-graph capture / compilation. Unset picks by device: graphs on a GPU (vLLM's
    # default, faster decoding), eager on CPU (compiling costs more than a stage samples)
    enforce_eager: bool | None = None
    use_gpu: bool = False  # request tensor_parallel_size GPUs per replica from Ray
    # Run vLLM's engine core and its one worker inside the calling process instead of two
    # spawned ones. Unset picks by device: in-process on CPU (an engine starts in ~2 s instead
    # of ~17 s on the toy, measured: the two spawns each import vLLM), separate processes on a
    # GPU (the engine core's own process overlaps scheduling with the forward).
    in_process: bool | None = None


def check_engine(cfg: EngineConfig) -> None:
    """The engine settings a stage was given, refused in one line before Ray starts."""
    checks = (
        (cfg.replicas >= 0, f"engine.replicas must be >= 0 (0 = auto), got {cfg.replicas}"),
        (cfg.max_model_len >= 0, "engine.max_model_len must be >= 0 (0 = model's)"),
        (0 <= cfg.gpu_memory_utilization <= 1,
         f"engine.gpu_memory_utilization must be in [0, 1] (0: by device), got "
         f"{cfg.gpu_memory_utilization}"),
        (cfg.kv_cache_gib >= 0, f"engine.kv_cache_gib must be >= 0 (0 = auto), got "
                                f"{cfg.kv_cache_gib}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def runs_in_process(cfg: EngineConfig) -> bool:
    """Whether `make_llm` builds the engine inside the calling process (`in_process`)."""
    if cfg.in_process is None:
        return not cfg.use_gpu and cfg.tensor_parallel_size == 1
    return cfg.in_process


# Sequences a CPU engine schedules at once (vLLM's default `max_num_seqs` for `LLM` on CPU).
CPU_MAX_SEQS = 256


def kv_bytes_per_token(config: dict, dtype: str) -> int | None:
    """Bytes of K and V one token takes in every layer of a model config (a dict; inside
    `text_config` for multimodal checkpoints); None when the config lacks a size it needs.
    float32 unless `dtype` names a 16-bit type (`auto` may keep float32 weights)."""
    c = config.get("text_config") or config
    layers, heads = c.get("num_hidden_layers"), c.get("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads
                                     if heads and c.get("hidden_size") else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    width = 2 if dtype in ("bfloat16", "float16", "half") else 4
    return 2 * layers * kv_heads * head_dim * width


def kv_cache_bytes(cfg: EngineConfig, config: dict, total_memory: int) -> int | None:
    """The KV cache to ask vLLM for (`kv_cache_memory_bytes`), or None to leave it to
    gpu_memory_utilization: `kv_cache_gib` when set; under use_gpu, None; on CPU, what
    CPU_MAX_SEQS sequences of the context length take, in whole MiB, when that is below the
    gpu_memory_utilization share of `total_memory` (else None: the share, as before)."""
    if cfg.kv_cache_gib:
        return int(cfg.kv_cache_gib * 2**30)
    per_token = kv_bytes_per_token(config, cfg.dtype)
    context = cfg.max_model_len or config_context_length(config)
    if cfg.use_gpu or per_token is None or context is None:
        return None
    need = -(-CPU_MAX_SEQS * context * per_token // 2**20) * 2**20
    share = (cfg.gpu_memory_utilization or 0.1) * total_memory
    return need if need < share else None


def engine_kwargs(cfg: EngineConfig) -> dict:
    """The `vllm.LLM` arguments of `cfg`, with the device-dependent defaults filled in (all but
    the KV cache size, which needs the model: `kv_cache_bytes`)."""
    kwargs = {
        "dtype": cfg.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization or (0.9 if cfg.use_gpu else 0.1),
        "enforce_eager": (not cfg.use_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
    }
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if runs_in_process(cfg):
        kwargs["distributed_executor_backend"] = "uni"  # the worker in the engine's process
    return kwargs


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
    """Create a `vllm.LLM` inside a Ray actor (or under `__main__`: unless in-process, it
    spawns). A model named by URI is loaded from this node's copy (`storage.local_copy`).
    In-process, vLLM pins this process's threads for serving: give it a process of its own (an
    actor, or a task with `max_calls=1`)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # read by vLLM when the engine is built: 0 keeps the engine core in this process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if runs_in_process(cfg) else "1"
    from vllm import LLM

    path = local_copy(model)
    kwargs = engine_kwargs(cfg)
    config_file = Path(path) / "config.json"
    if config_file.is_file():  # a hub id: vLLM's own sizing
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        kv = kv_cache_bytes(cfg, json.loads(config_file.read_text()), memory)
        if kv is not None:
            kwargs["kv_cache_memory_bytes"] = kv
    return LLM(
        model=path,
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
