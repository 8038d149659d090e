"""Task reward of a model on held-out prompts: greedy and sampled decoding through vLLM."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.checkpoint import check_checkpoint, checkpoint_digest
from pipeline.cluster import ensure_ray
from pipeline.engine import (
    EngineConfig,
    actor_options,
    check_engine,
    make_llm,
    sampling_params_for,
)
from pipeline.errors import UserError
from pipeline.manifest import current_result, input_digest, read_result, write_result
from pipeline.scorers import load_scorer
from pipeline.stage import join_named_cluster
from pipeline.tables import read_table

STAGE = "eval"


@dataclass(frozen=True)
class EvalConfig:
    model: str  # HF checkpoint to evaluate
    prompts: str  # held-out prompts file: `prompt` plus the scorer's metadata (e.g. `answer`)
    # `module:function` or a built-in task name; no default: what is correct is the user's choice
    scorer: str
    samples: int = 4  # sampled responses per prompt for the sampled reward
    temperature: float = 1.0  # sampled decoding temperature (greedy is temperature 0)
    top_p: float = 1.0  # nucleus mass for sampled decoding
    max_tokens: int = 16  # response budget in tokens
    seed: int = 0  # sampling seed (per prompt, see engine.request_seed)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Result JSON, written with its config, input digests and code version; a re-run whose
    # file records the same is skipped. None: the result is only returned.
    out: str | None = None


def _generate(model: str, engine: EngineConfig, prompts: list[str], cfg: dict) -> dict:
    from vllm import SamplingParams

    llm = make_llm(model, engine, seed=cfg["seed"])
    greedy = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"]), use_tqdm=False
    )
    sampled = llm.generate(
        prompts,
        sampling_params_for(prompts, {**cfg, "k": cfg["samples"]}),
        use_tqdm=False,
    )
    return {
        "greedy": [o.outputs[0].text for o in greedy],
        "sampled": [[c.text for c in o.outputs] for o in sampled],
    }


def check_config(cfg: EvalConfig) -> None:
    """Every field checked on the driver, before Ray starts."""
    for ok, msg in ((cfg.samples >= 1, f"samples must be >= 1, got {cfg.samples}"),
                    (cfg.temperature >= 0, f"temperature must be >= 0, got {cfg.temperature}"),
                    (0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got {cfg.top_p}"),
                    (cfg.max_tokens >= 1, f"max_tokens must be >= 1, got {cfg.max_tokens}")):
        if not ok:
            raise UserError(msg)
    check_engine(cfg.engine)


def run_eval(cfg: EvalConfig) -> dict:
    """Greedy and sampled mean task reward of `cfg.model` on `cfg.prompts` (a Ray task), with
    `skipped` True when `cfg.out` already holds it for this config, these inputs (the model's
    and the prompts' digests) and this code version."""
    import ray

    check_config(cfg)
    check_checkpoint(cfg.model)
    reads = {"--model": cfg.model}
    if cfg.out is not None:
        cfg = dataclasses.replace(cfg, out=storage.absolute(cfg.out))
        join_named_cluster(cfg.out, reads)
        config = dataclasses.asdict(cfg)
        inputs = {"model": checkpoint_digest(cfg.model), "prompts": input_digest(cfg.prompts)}
        done = current_result(cfg.out, STAGE, config, inputs)
        if done is not None:
            return {**done, "skipped": True}
        read_result(cfg.out, STAGE)  # refuses to overwrite a file that is no eval result
    ensure_ray(cfg.out, reads)
    table = read_table(cfg.prompts, required=("prompt",))
    rows = table.to_pylist()
    prompts = [r["prompt"] for r in rows]
    scorer = load_scorer(cfg.scorer)
    # max_calls=1: the engine's worker process exits with it (vLLM pins an in-process engine's
    # threads, which a reused Ray worker would keep)
    remote = ray.remote(max_calls=1)(_generate).options(**actor_options(cfg.engine),
                                                        max_retries=0)
    sampling = {k: getattr(cfg, k) for k in ("samples", "temperature", "top_p", "max_tokens",
                                              "seed")}
    texts = ray.get(remote.remote(cfg.model, cfg.engine, prompts, sampling))
    greedy = scorer(prompts, texts["greedy"], rows)
    flat_prompts = [p for p in prompts for _ in range(cfg.samples)]
    flat_rows = [r for r in rows for _ in range(cfg.samples)]
    flat_texts = [t for ts in texts["sampled"] for t in ts]
    sampled = scorer(flat_prompts, flat_texts, flat_rows)
    result = {
        "model": cfg.model,
        "prompts": cfg.prompts,
        "num_prompts": len(prompts),
        "greedy_reward": sum(greedy) / len(greedy),
        "sampled_reward": sum(sampled) / len(sampled),
        "samples_per_prompt": cfg.samples,
        "greedy_texts": texts["greedy"],
    }
    if cfg.out is not None:
        result = write_result(cfg.out, STAGE, config, inputs, result)
    return {**result, "skipped": False}
