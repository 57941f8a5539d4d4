"""Adapter registry: the model's ``config.model_type`` picks the family, and the family's ``when`` its variant.

The built-in adapters come from the modules of this package; other packages add theirs through the entry point group
``massact.adapters`` (in their metadata, ``[project.entry-points."massact.adapters"]``: ``name = "package.module:ADAPTER"``,
an ``Adapter`` or a tuple of them). Every adapter is registered with its source, and the registry checks itself: two
adapters claiming one model type must both have a ``when`` (at import and when entry points load), and a config that
two of them match is an error naming both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

from ...errors import UsageError
from . import (
    apertus,
    cohere,
    dsa,
    gemma2,
    gemma4,
    glm4,
    gpt2,
    granite,
    hybrid,
    hyper,
    llama,
    moe,
    moe_recent,
    olmo,
    parallel,
    phi,
    postln,
    ssm,
    starcoder2,
)
from .base import Adapter

GROUP = "massact.adapters"  # the entry point group other packages register adapters under

# The built-in adapters, in the order they are tried (``registry`` adds those of other packages).
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
    gemma4.ADAPTER,
    gemma4.MOE,
    dsa.GLM_MOE_DSA,
    dsa.DEEPSEEK_V32,
    *moe_recent.ADAPTERS,
    granite.GRANITE,
    olmo.OLMO,
    glm4.GLM4,
    starcoder2.STARCODER2,
    llama.INTERNLM3,
    llama.MINISTRAL,
    llama.MINISTRAL3,
    hyper.DEEPSEEK_V4,
    hyper.HY_V4,
    hyper.QWEN4_EXP,
    ssm.NEMOTRON_H,
    ssm.BAMBA,
    ssm.JAMBA,
    ssm.GRANITE_4_H,
    ssm.GRANITE_4_H_MOE,
    ssm.FALCON_H1,
    hybrid.OLMO_HYBRID,
    hybrid.LFM3,
    moe.KIMI_LINEAR,
)


@dataclass(frozen=True, kw_only=True)
class Registered:
    """An adapter and where it comes from: the module that defines it (``massact.models.adapters.llama``), or for one
    from another package the entry point (``name = module:attribute``) and its distribution."""

    adapter: Adapter
    source: str


def check(registered: tuple[Registered, ...]) -> None:
    """Raise a ValueError naming both adapters (and their sources) where two claim one model type and either has no
    ``when`` to tell them apart."""
    claims: dict[str, Registered] = {}
    for entry in registered:
        for model_type in entry.adapter.model_types:
            other = claims.setdefault(model_type, entry)
            if other is not entry and (other.adapter.when is None or entry.adapter.when is None):
                raise ValueError(f"model type {model_type!r} is claimed by {_named(other)} and by {_named(entry)}, and one of them "
                                 "has no `when` to tell them apart")


def _named(entry: Registered) -> str:
    return f"{entry.adapter.family} ({entry.source})"


def _built_in() -> tuple[Registered, ...]:
    modules = [module for name, module in sys.modules.items() if name.startswith(f"{__name__}.")]  # this package's, imported above
    names = {id(value): f"{module.__name__}.{name}"
             for module in modules for name, value in vars(module).items() if isinstance(value, Adapter)}
    return tuple(Registered(adapter=adapter, source=names[id(adapter)]) for adapter in ADAPTERS)


def _plugins() -> tuple[Registered, ...]:
    """The adapters other installed packages register under ``GROUP``."""
    found = []
    for point in entry_points(group=GROUP):
        loaded = point.load()
        adapters = loaded if isinstance(loaded, tuple) else (loaded,)
        if not all(isinstance(adapter, Adapter) for adapter in adapters):
            raise ValueError(f"entry point {point.name} = {point.value} in {GROUP} is not an Adapter or a tuple of them")
        dist = f" in {point.dist.name} {point.dist.version}" if point.dist is not None else ""
        found += [Registered(adapter=adapter, source=f"entry point {point.name} = {point.value}{dist}") for adapter in adapters]
    return tuple(found)


_BUILT_IN = _built_in()
check(_BUILT_IN)
_registry: tuple[Registered, ...] | None = None  # built-in and entry-point adapters, once the entry points are read


def registry() -> tuple[Registered, ...]:
    """Every registered adapter with its source: the built-in ones, then those of the entry points (read once; see
    ``refresh``)."""
    global _registry
    if _registry is None:
        entries = _BUILT_IN + _plugins()
        check(entries)
        _registry = entries
    return _registry


def refresh() -> None:
    """Read the entry points again at the next lookup (after a package is installed, or a path added)."""
    global _registry
    _registry = None


def source(adapter: Adapter) -> str:
    """Where ``adapter`` comes from (its module, or its entry point and distribution)."""
    return next(entry.source for entry in registry() if entry.adapter is adapter)


def supported() -> str:
    families: dict[str, list[str]] = {}
    for entry in registry():
        types = families.setdefault(entry.adapter.family, [])
        types += [t for t in entry.adapter.model_types if t not in types]
    return "; ".join(f"{family} ({', '.join(types)})" for family, types in families.items())


def claimed(config) -> bool:
    """Whether a registered adapter claims ``config``'s model type (where none does, ``models.inference`` infers one
    from the model itself)."""
    model_type = getattr(config, "model_type", None)
    return any(model_type in entry.adapter.model_types for entry in registry())


def adapter_for(config) -> Adapter:
    """The adapter of ``config``'s model type whose ``when`` holds; a UsageError where none does, or where two do."""
    model_type = getattr(config, "model_type", None)
    matching = []
    for entry in registry():
        if model_type not in entry.adapter.model_types:
            continue
        try:
            if entry.adapter.when is None or entry.adapter.when(config):
                matching.append(entry)
        except AttributeError as error:  # a config without a field the variant depends on
            raise UsageError(f"the {model_type!r} config lacks a field massact needs to map its blocks: {error}") from None
    if len(matching) > 1:
        raise UsageError(f"the {model_type!r} config matches more than one adapter: " + " and ".join(map(_named, matching)))
    if matching:
        return matching[0].adapter
    claimed = list(dict.fromkeys(entry.adapter.family for entry in registry() if model_type in entry.adapter.model_types))
    if claimed:  # the family is known, but none of its variants maps this config (each one's `when` refuses it)
        raise UsageError(f"this {model_type!r} config is a variant massact does not map: the {' and '.join(claimed)} adapters "
                         "do not apply to it (see docs/families.md for what each maps)")
    raise UsageError(
        f"architecture {model_type!r} is not supported; supported families: {supported()}"
        " (a new family is one Adapter in massact/models/adapters/ or in another package's massact.adapters entry point,"
        " with a test in tests/test_adapters.py)"
    )
