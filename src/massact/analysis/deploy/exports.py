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

A super weight inside fused experts (one 3-D parameter holding every expert of a block, ``mlp.experts.down_proj``) is
no module of its own. Where an engine's list can name a module and everything under it, the experts module is listed
whole: quanto (``NAME`` and ``NAME.*``), bnb (transformers matches a name up to a module boundary) and llm-compressor
(``re:^NAME(\\.|$)``), which also covers a layout that unfuses the experts into one ``nn.Linear`` each; llama.cpp keeps
the block's fused tensor (``blk.1.ffn_down_exps``, every expert) in f16. HQQ's and torchao's lists take exact
``nn.Linear`` names, so they cannot name it. Each export says so in ``notes`` (and the command in one line on stderr).
"""

from __future__ import annotations

import re

from ...errors import UsageError
from .protect import Protect

EXPORTS = ("quanto", "hqq", "torchao", "bnb", "llm-compressor", "llama.cpp")
KEEP_TYPE = "f16"  # what llama-quantize stores a protected tensor as


def protected_modules(protect: Protect) -> list[str]:
    """The modules (full names) whose weight holds a super weight, 2-D weights only: an engine keeps a module out of
    quantization whole, and fused experts' 3-D weights are no module of their own (see ``fused_experts``)."""
    return sorted({w.parameter.removesuffix(".weight") for w in protect.super_weights if len(w.index) == 2})


def fused_experts(protect: Protect) -> list[str]:
    """The fused experts' parameters (full names, e.g. ``model.layers.1.mlp.experts.down_proj``: [experts, out, in])
    that hold a super weight of the protect list."""
    return sorted({w.parameter for w in protect.super_weights if len(w.index) != 2})


def _experts_module(parameter: str) -> str:
    return parameter.rpartition(".")[0]  # "model.layers.1.mlp.experts.down_proj" -> "model.layers.1.mlp.experts"


def export(protect: Protect, engine: str, gguf_arch: str = "llama") -> dict:
    """The configuration ``engine`` takes, as JSON-ready data: the keys its API names, a ``usage`` line, and the
    protect list's ``modules``; with super weights in fused experts, those parameters (``fused_experts``) and
    ``notes`` saying what the export does with them."""
    modules = protected_modules(protect)
    fused = fused_experts(protect)
    experts = sorted({_experts_module(parameter) for parameter in fused})
    listed = ", ".join(fused)
    if engine == "quanto":
        config = {"exclude": [*modules, *(pattern for name in experts for pattern in (name, f"{name}.*"))],
                  "usage": "optimum.quanto.quantize(model, weights=qint4, exclude=config['exclude'])"}
        note = (f"{listed}: fused experts (one 3-D parameter holding every expert), which quanto does not quantize (it replaces "
                "nn.Linear modules): they stay in float; exclude names the experts module and each module under it, for a "
                "layout that unfuses the experts into nn.Linear modules")
    elif engine == "hqq":
        config = {"skip_modules": modules, "quant_config": {"nbits": 4, "group_size": 64},
                  "usage": "replace every nn.Linear in the blocks whose name is not in skip_modules by "
                           "hqq.core.quantize.HQQLinear(module, quant_config=BaseQuantizeConfig(**config['quant_config']))"}
        note = (f"{listed}: in fused experts (one 3-D parameter holding every expert), which skip_modules cannot keep out: it "
                "names nn.Linear modules exactly; this usage leaves them in float (it replaces nn.Linear modules only)")
    elif engine == "torchao":
        config = {"skip_modules": modules,
                  "usage": "torchao.quantization.quantize_(model, config, filter_fn=lambda module, fqn: "
                           "isinstance(module, torch.nn.Linear) and fqn not in skip_modules)"}
        note = (f"{listed}: in fused experts (one 3-D parameter holding every expert), which skip_modules cannot keep out: the "
                "filter_fn compares exact nn.Linear names; this usage leaves them in float (it quantizes nn.Linear modules only)")
    elif engine == "bnb":
        config = {"llm_int8_skip_modules": [*modules, *experts, "lm_head"],
                  "usage": "transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=config['llm_int8_skip_modules'])"}
        note = (f"{listed}: fused experts (one 3-D parameter holding every expert), which transformers' bitsandbytes does not "
                "quantize (it replaces nn.Linear modules): they stay in float; llm_int8_skip_modules names the experts module, "
                "which transformers matches with every module under it")
    elif engine == "llm-compressor":
        config = {"ignore": ["lm_head", *(f"re:^{re.escape(name)}$" for name in modules),
                             *(f"re:^{re.escape(name)}(\\.|$)" for name in experts)],
                  "usage": "llmcompressor.modifiers.quantization.QuantizationModifier(targets='Linear', scheme=..., "
                           "ignore=config['ignore'])"}
        note = (f"{listed}: fused experts (one 3-D parameter holding every expert); ignore names the experts module and every "
                "module under it (llm-compressor quantizes experts unfused, one Linear each): all the block's experts stay in float")
    elif engine == "llama.cpp":
        names = gguf_names([*modules, *fused], gguf_arch)
        overrides = [f"^{re.escape(name)}\\.weight$={KEEP_TYPE}" for name in names]
        config = {"tensor_type": overrides,
                  "usage": "llama-quantize " + " ".join(f"--tensor-type '{o}'" for o in overrides) + " in.gguf out.gguf Q4_K_M"}
        note = (f"{listed}: fused experts; a GGUF file stores every expert of a block in one tensor "
                f"({', '.join(names[len(modules):])}), kept in {KEEP_TYPE} whole")
    else:
        raise UsageError(f"--engine must be one of {', '.join(EXPORTS)}, not {engine!r}")
    if not fused:
        return {"engine": engine, "modules": modules, **config}
    return {"engine": engine, "modules": modules, "fused_experts": fused, **config, "notes": [note]}


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
