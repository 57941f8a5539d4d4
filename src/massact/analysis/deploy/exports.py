"""A protect list as the configuration each quantization engine takes: the modules that hold a super weight, kept out
of quantization, in each engine's own terms (``massact protect export --engine NAME protect.json``).

- quanto: ``quantize(model, weights=qint4, exclude=...)``: module names (fnmatch patterns; exact names here);
- hqq: ``skip_modules`` to leave as ``nn.Linear`` while every other linear becomes ``HQQLinear(module, quant_config=
  BaseQuantizeConfig(**quant_config))`` (transformers' ``HqqConfig`` names modules without their block, so it cannot
  single one block out);
- torchao: ``quantize_(model, config, filter_fn=...)`` that says no to ``skip_modules`` (fully qualified names);
- bnb: ``BitsAndBytesConfig(llm_int8_skip_modules=...)``: full names (transformers also matches a bare suffix, so a
  short name would skip block 11 along with block 1), with ``lm_head``, which a given list no longer keeps by itself;
- llm-compressor: ``QuantizationModifier(ignore=...)``: ``re:`` patterns anchored on each full name, and ``lm_head``;
- llama.cpp: ``llama-quantize --tensor-type PATTERN=TYPE`` for each tensor, by its GGUF name (``blk.11.ffn_down``),
  anchored (llama-quantize searches the pattern anywhere in the name, first match wins).
"""

from __future__ import annotations

import re

from ...errors import UsageError
from .protect import Protect

EXPORTS = ("quanto", "hqq", "torchao", "bnb", "llm-compressor", "llama.cpp")
KEEP_TYPE = "f16"  # what llama-quantize stores a protected tensor as


def protected_modules(protect: Protect) -> list[str]:
    """The modules (full names) whose weight holds a super weight, 2-D weights only: an engine keeps a module out of
    quantization whole, and fused experts' 3-D weights are no module of their own."""
    return sorted({w.parameter.removesuffix(".weight") for w in protect.super_weights if len(w.index) == 2})


def export(protect: Protect, engine: str, gguf_arch: str = "llama") -> dict:
    """The configuration ``engine`` takes, as JSON-ready data: the keys its API names, a ``usage`` line, and the
    protect list's ``modules``."""
    modules = protected_modules(protect)
    if engine == "quanto":
        config = {"exclude": modules, "usage": "optimum.quanto.quantize(model, weights=qint4, exclude=config['exclude'])"}
    elif engine == "hqq":
        config = {"skip_modules": modules, "quant_config": {"nbits": 4, "group_size": 64},
                  "usage": "replace every nn.Linear in the blocks whose name is not in skip_modules by "
                           "hqq.core.quantize.HQQLinear(module, quant_config=BaseQuantizeConfig(**config['quant_config']))"}
    elif engine == "torchao":
        config = {"skip_modules": modules,
                  "usage": "torchao.quantization.quantize_(model, config, filter_fn=lambda module, fqn: "
                           "isinstance(module, torch.nn.Linear) and fqn not in skip_modules)"}
    elif engine == "bnb":
        config = {"llm_int8_skip_modules": [*modules, "lm_head"],
                  "usage": "transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=config['llm_int8_skip_modules'])"}
    elif engine == "llm-compressor":
        config = {"ignore": ["lm_head", *(f"re:^{re.escape(name)}$" for name in modules)],
                  "usage": "llmcompressor.modifiers.quantization.QuantizationModifier(targets='Linear', scheme=..., "
                           "ignore=config['ignore'])"}
    elif engine == "llama.cpp":
        names = gguf_names(modules, gguf_arch)
        overrides = [f"^{re.escape(name)}\\.weight$={KEEP_TYPE}" for name in names]
        config = {"tensor_type": overrides,
                  "usage": "llama-quantize " + " ".join(f"--tensor-type '{o}'" for o in overrides) + " in.gguf out.gguf Q4_K_M"}
    else:
        raise UsageError(f"--engine must be one of {', '.join(EXPORTS)}, not {engine!r}")
    return {"engine": engine, "modules": modules, **config}


def gguf_names(modules: list[str], arch: str) -> list[str]:
    """Each module's tensor name in a GGUF file of architecture ``arch`` (the gguf package's own name map)."""
    import gguf

    kinds = {name: kind for kind, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in kinds:
        raise UsageError(f"--gguf-arch {arch!r} is not a GGUF architecture (e.g. llama, qwen2, gemma2, phi3)")
    blocks = 1 + max((int(m) for name in modules for m in re.findall(r"\.(\d+)\.", name)), default=0)
    mapping = gguf.get_tensor_name_map(kinds[arch], blocks)
    found = []
    for name in modules:
        mapped = mapping.get_name(name)
        if mapped is None:
            raise UsageError(f"{name} has no GGUF tensor name in the {arch} map")
        found.append(mapped)
    return found
