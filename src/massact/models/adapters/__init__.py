"""Adapter registry: the model's ``config.model_type`` picks the family, and the family's ``when`` its variant."""

from __future__ import annotations

from ...errors import UsageError
from . import apertus, cohere, gemma2, gpt2, hybrid, llama, moe, olmo, parallel, phi, postln
from .base import Adapter

ADAPTERS: tuple[Adapter, ...] = (
    gpt2.ADAPTER,
    llama.ADAPTER,
    gemma2.ADAPTER,
    moe.MIXTRAL,
    moe.QWEN2_MOE,
    moe.QWEN3_MOE,
    moe.OLMOE,
    moe.GPT_OSS,
    moe.DEEPSEEK_V2,
    moe.DEEPSEEK_V3,
    moe.GLM4_MOE,
    moe.LLAMA4,
    phi.PHI2,
    phi.PHI3,
    parallel.NEOX_PARALLEL,
    parallel.NEOX_SEQUENTIAL,
    parallel.GPTJ,
    parallel.FALCON_PARALLEL,
    parallel.FALCON_SEQUENTIAL,
    postln.OPT_PRE_LN,
    postln.OPT_POST_LN,
    postln.BERT,
    olmo.OLMO2,
    olmo.EXAONE4,
    cohere.COHERE2,
    apertus.APERTUS,
    llama.SMOLLM3,
    hybrid.LFM2,
    hybrid.QWEN3_NEXT,
    hybrid.QWEN3_5_MULTIMODAL,
    moe.QWEN3_NEXT_MOE,
    moe.QWEN3_5_MOE,
    moe.QWEN3_5_MOE_MULTIMODAL,
    gemma2.GEMMA3_MULTIMODAL,
)


def supported() -> str:
    families: dict[str, list[str]] = {}
    for adapter in ADAPTERS:
        types = families.setdefault(adapter.family, [])
        types += [t for t in adapter.model_types if t not in types]
    return "; ".join(f"{family} ({', '.join(types)})" for family, types in families.items())


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type not in adapter.model_types:
            continue
        try:
            if adapter.when is None or adapter.when(config):
                return adapter
        except AttributeError as error:  # a config without a field the variant depends on
            raise UsageError(f"the {model_type!r} config lacks a field massact needs to map its blocks: {error}") from None
    raise UsageError(
        f"architecture {model_type!r} is not supported; supported families: {supported()}"
        " (a new family is one Adapter in massact/models/adapters/, with a test in tests/test_adapters.py)"
    )
