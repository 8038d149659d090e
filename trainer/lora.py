"""LoRA (Hu et al. 2021) through PEFT for `odpo train` and `odpo sft`: the `--lora-*` settings and
what the training loop does with them.

With `r` > 0 the policy's weights stay frozen and only the low-rank adapters train (their
update is alpha / r · B·A, B starting at zero, so step 0 is the base model and DPO's ln 2 holds).
A checkpoint stays a plain Hugging Face directory, what vLLM samples the next round from and
`odpo precompute` reads: the adapters merged into a copy of the model (the training model is
never merged in place: merging and unmerging would move its frozen weights by rounding), plus
the adapter itself in `ADAPTER_DIR`, which a resumed run loads onto the base model so that the
restored optimizer state matches the adapter parameters.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

from pipeline.errors import UserError

ADAPTER_DIR = "adapter"  # a checkpoint's (and the run's published) PEFT adapter directory
ALL_LINEAR = "all-linear"  # PEFT's value: every linear layer but the output head


@dataclass(frozen=True)
class LoraSettings:
    r: int = 0  # LoRA rank; 0 turns LoRA off: every weight trains (full fine-tuning)
    alpha: float = 16.0  # LoRA scale numerator: the update is alpha / r times B·A
    dropout: float = 0.0  # dropout on the adapters' input; 0 keeps the policy deterministic
    # layers that get adapters: all-linear (PEFT's: every linear layer but the output head) or
    # comma-separated module names, e.g. q_proj,v_proj
    target_modules: str = ALL_LINEAR


def target_modules(spec: str) -> str | list[str]:
    """PEFT's `target_modules` of a `--lora-target-modules` value: "all-linear" as is, else the
    list of the comma-separated names (a list: PEFT matches a plain string as a regex)."""
    spec = spec.strip()
    if spec == ALL_LINEAR:
        return ALL_LINEAR
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_lora(settings: LoraSettings) -> None:
    """One-line errors for bad settings, on the driver."""
    checks = (
        (settings.r >= 0, f"lora.r must be >= 0 (0: full fine-tuning), got {settings.r}"),
        (settings.alpha > 0, f"lora.alpha must be > 0, got {settings.alpha}"),
        (0 <= settings.dropout < 1, f"lora.dropout must be in [0, 1), got {settings.dropout}"),
        (bool(target_modules(settings.target_modules)),
         f"lora.target_modules must be {ALL_LINEAR} or comma-separated module names, got "
         f"{settings.target_modules!r}"),
    )
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def enabled(cfg: dict) -> bool:
    """Whether a loop config (`asdict` of an entry point's config) trains LoRA adapters."""
    return (cfg.get("lora") or {}).get("r", 0) > 0


def add_lora(model, settings: dict, base: str | None = None):
    """`model` (a causal LM, dropout already off) wrapped by `peft.get_peft_model` with fresh
    adapters of `settings` (`asdict(LoraSettings)`); only the adapters require gradients.
    `base` is recorded in the adapter's config as the model it belongs to."""
    import peft

    config = peft.LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=target_modules(settings["target_modules"]), task_type="CAUSAL_LM")
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules the model does not have
        raise UserError(f"lora.target_modules {settings['target_modules']!r}: "
                        f"{str(e).splitlines()[0]}") from e
    if base is not None:
        wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


def load_lora(model, checkpoint: str):
    """`model` (the base causal LM) with the trainable adapter saved in `checkpoint`'s
    ADAPTER_DIR (`save_lora`): how a LoRA run resumes."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, os.path.join(checkpoint, ADAPTER_DIR),
                                     is_trainable=True, trust_remote_code=False)


def is_lora(model) -> bool:
    """Whether `model` is a PEFT-wrapped model (without importing PEFT into a run that never
    did: no PeftModel exists there)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_copy(model):
    """A plain causal LM with `model`'s (a PeftModel's) adapters merged into a copy of its
    weights; `model` itself is left as it was, bit for bit."""
    return copy.deepcopy(model).merge_and_unload()


def save_lora(model, path: str) -> None:
    """Save a PeftModel as a checkpoint: the merged model at `path` (a plain HF directory,
    safetensors) and the adapter in `path`/ADAPTER_DIR."""
    merged_copy(model).save_pretrained(path, safe_serialization=True)
    model.save_pretrained(os.path.join(path, ADAPTER_DIR), safe_serialization=True)
