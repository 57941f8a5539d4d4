"""Protect lists measured in the quantization engines people deploy with, against a control.

Each engine quantizes the block projections (every ``nn.Linear`` inside the blocks; the embeddings and the output
head stay as they are) with the real library, and the model is scored four ways:

- ``all``: every block projection quantized;
- ``protected``: the modules that hold a super weight of the protect list kept in float;
- ``control``: as many modules of the same kinds (the same path in another block), chosen at random with a fixed
  seed, kept in float: what keeping that much of the model in float gives by itself;
- ``sparse``: every projection quantized, then ``w - w_quantized`` added back at the super weights' coordinates as a
  sparse correction of the output (a hook adds correction x input[col] to output[row]): Yu et al.'s "restore the super
  weight", on a real engine, for a few scalars instead of a whole module.

Each projection is quantized once; the four ways swap the float or the engine's module in. The engines are optional
extras (``pip install massact[engines]``).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UsageError
from ...models.loading import LoadedModel
from . import exports
from .protect import Protect
from .results import EngineRow

SEED = 0  # the control's draw


@dataclass(frozen=True)
class Engine:
    """A quantization library, as massact drives it: ``quantize`` makes one ``nn.Linear``'s quantized module,
    ``weight`` gives a quantized module's weight back in float [out, in], ``nbytes`` the bytes it stores its weight in;
    ``settings`` are what the engine is given (written into each row), ``package`` what to install."""

    name: str
    package: str
    settings: dict
    quantize: Callable[[nn.Linear], nn.Module]
    weight: Callable[[nn.Module], torch.Tensor]
    nbytes: Callable[[nn.Module], int]


def _quanto() -> Engine:
    from optimum.quanto import freeze, qint4, quantize

    def one(linear: nn.Linear) -> nn.Module:
        holder = nn.Sequential(copy.deepcopy(linear))  # quanto quantizes a model's children in place
        quantize(holder, weights=qint4)
        freeze(holder)
        return holder[0]

    return Engine("quanto", "optimum-quanto", {"weights": "qint4", "group_size": 128, "library": _version("optimum-quanto")},
                  one, lambda m: m.weight.dequantize(), lambda m: _state_bytes(m, "weight."))


def _hqq() -> Engine:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=3, group_size=64)

    def one(linear: nn.Linear) -> nn.Module:
        weight = linear.weight
        return HQQLinear(copy.deepcopy(linear), quant_config=config, compute_dtype=weight.dtype, device=str(weight.device), del_orig=True)

    return Engine("hqq", "hqq", {"nbits": 3, "group_size": 64, "library": _version("hqq")}, one,
                  lambda m: m.dequantize().reshape(m.meta["shape"]),
                  lambda m: m.W_q.nbytes + m.meta["scale"].nbytes + m.meta["zero"].nbytes)


def _torchao() -> Engine:
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))

    def one(linear: nn.Linear) -> nn.Module:
        copied = copy.deepcopy(linear)
        quantize_(copied, config)
        return copied

    def nbytes(module: nn.Module) -> int:
        weight = module.weight
        return sum(getattr(weight, name).nbytes for name in weight.__tensor_flatten__()[0] if getattr(weight, name) is not None)

    return Engine("torchao", "torchao", {"config": "IntxWeightOnlyConfig(int4, PerGroup(64))", "library": _version("torchao")},
                  one, lambda m: m.weight.dequantize(), nbytes)


def _bnb() -> Engine:
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit, Params4bit

    def one(linear: nn.Linear) -> nn.Module:
        new = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=linear.weight.dtype,
                         quant_type="nf4", device="meta")
        new.weight = Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64, module=new)
        new.weight = new.weight._quantize(str(linear.weight.device))
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return new

    def weight(module: nn.Module) -> torch.Tensor:
        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def nbytes(module: nn.Module) -> int:
        state = module.weight.quant_state
        return module.weight.data.nbytes + state.absmax.nbytes

    return Engine("bnb", "bitsandbytes", {"quant_type": "nf4", "blocksize": 64, "library": _version("bitsandbytes")}, one, weight, nbytes)


ENGINES: dict[str, Callable[[], Engine]] = {"quanto": _quanto, "hqq": _hqq, "torchao": _torchao, "bnb": _bnb}


def engine(name: str) -> Engine:
    """The engine ``name``, its library imported; one UsageError line where the name is unknown or it is not installed."""
    if name not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {name!r}")
    try:
        return ENGINES[name]()
    except ImportError:
        package = {"quanto": "optimum-quanto", "bnb": "bitsandbytes"}.get(name, name)
        raise UsageError(f"the {name} engine needs its library: pip install 'massact[engines]' (or pip install {package})") from None


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _state_bytes(module: nn.Module, prefix: str) -> int:
    return sum(t.nbytes for key, t in module.state_dict().items() if key.startswith(prefix))


def projections(lm: LoadedModel) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the blocks, by its full module name (the modules an engine quantizes)."""
    path = lm.adapter.layers_path(lm.model)
    return {f"{path}.{index}.{name}": module for index, block in enumerate(lm.adapter.blocks(lm.model))
            for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def protected_modules(lm: LoadedModel, protect: Protect) -> list[str]:
    """The block projections that hold a super weight of the protect list: the list's modules an engine can keep."""
    return sorted(set(exports.protected_modules(protect)) & set(projections(lm)))


def control_modules(lm: LoadedModel, protected: list[str], seed: int = SEED) -> list[str]:
    """As many block projections as ``protected``, of the same kinds (the same path inside a block), chosen at random
    with ``seed`` among the others."""
    names = projections(lm)
    prefix = lm.adapter.layers_path(lm.model) + "."
    kind = lambda name: name.removeprefix(prefix).split(".", 1)[1]  # "11.mlp.down_proj" -> "mlp.down_proj"
    draw = random.Random(seed)
    chosen = []
    for name in protected:
        pool = sorted(other for other in names if kind(other) == kind(name) and other not in protected and other not in chosen)
        if pool:
            chosen.append(draw.choice(pool))
    return sorted(chosen)


@contextmanager
def swapped(lm: LoadedModel, modules: dict[str, nn.Module]) -> Iterator[None]:
    """While open, each named module of the model is replaced by the given one; the originals are put back."""
    saved = {}
    try:
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            owner = lm.model.get_submodule(parent)
            saved[name] = (owner, child, getattr(owner, child))
            setattr(owner, child, module)
        yield
    finally:
        for owner, child, original in saved.values():
            setattr(owner, child, original)


@contextmanager
def sparse_corrections(quantized: dict[str, nn.Module], engine_: Engine, originals: dict[str, nn.Linear],
                       coordinates: list[tuple[str, int, int]]) -> Iterator[tuple[int, float]]:
    """While open, each quantized module holding a super weight ([out row, in col] as ``nn.Linear`` stores it) gets
    back its quantization error there: output[..., row] += (w - w_quantized)[row, col] x input[..., col]. Yields how
    many entries are corrected, and the largest of their errors relative to the weight."""
    by_module: dict[str, list[tuple[int, int, float]]] = {}
    largest = 0.0
    for name, row, col in coordinates:
        weight = float(originals[name].weight.detach()[row, col])
        error = weight - float(engine_.weight(quantized[name]).detach()[row, col])
        by_module.setdefault(name, []).append((row, col, error))
        largest = max(largest, abs(error) / abs(weight) if weight else 0.0)
    handles = []

    def hook(entries):
        rows = torch.tensor([r for r, _, _ in entries])
        cols = torch.tensor([c for _, c, _ in entries])
        errors = torch.tensor([e for _, _, e in entries])

        def add(module, args, output):
            x = args[0]
            fix = x[..., cols.to(x.device)] * errors.to(x.device, x.dtype)
            return output.index_add(-1, rows.to(output.device), fix.to(output.dtype))

        return add

    try:
        for name, entries in by_module.items():
            handles.append(quantized[name].register_forward_hook(hook(entries)))
        yield sum(len(entries) for entries in by_module.values()), largest
    finally:
        for handle in handles:
            handle.remove()


def engine_rows(lm: LoadedModel, protect: Protect, name: str, score: Callable[[], float], read: Callable[[], float],
                baseline: float, float_value: float) -> list[EngineRow]:
    """The four rows of one engine (see the module's docstring): ``score`` is the perplexity of the model as it is
    now, ``read`` the massive value at its birth block on its probe (``float_value`` in the float model)."""
    the_engine = engine(name)
    originals = projections(lm)
    if not originals:
        raise UsageError(f"the {name} engine quantizes nn.Linear modules, and this model's blocks have none (Conv1D weights)")
    protected = protected_modules(lm, protect)
    control = control_modules(lm, protected)
    started = time.perf_counter()
    quantized = {module: the_engine.quantize(linear) for module, linear in originals.items()}
    quantize_seconds = time.perf_counter() - started
    float_bytes = {module: linear.weight.nbytes for module, linear in originals.items()}
    coordinates = [(w.parameter.removesuffix(".weight"), w.index[-2], w.index[-1]) for w in protect.super_weights
                   if w.parameter.removesuffix(".weight") in originals]
    rows = []

    def measure(kind: str, in_float: list[str], corrected: int = 0, largest: float = 0.0) -> EngineRow:
        began = time.perf_counter()
        ppl, value = score(), read()
        stored = sum(float_bytes[m] if m in in_float else the_engine.nbytes(quantized[m]) for m in originals) + corrected * 12
        return EngineRow(engine=name, kind=kind, settings=the_engine.settings, modules_in_float=in_float, perplexity=ppl,
                         perplexity_ratio=ppl / baseline, value_birth=value,
                         kept_birth=value / float_value if float_value else float("nan"), weight_bytes=int(stored),
                         float_bytes=int(sum(float_bytes.values())), corrections=corrected, largest_error=largest,
                         seconds=round(time.perf_counter() - began + quantize_seconds / 4, 2))

    for kind, in_float in (("all", []), ("protected", protected), ("control", control)):
        with swapped(lm, {m: module for m, module in quantized.items() if m not in in_float}):
            rows.append(measure(kind, in_float))
    with swapped(lm, quantized), sparse_corrections(quantized, the_engine, originals, coordinates) as (corrected, largest):
        rows.append(measure("sparse", [], corrected, largest))
    return rows


def engine_words(rows: list[EngineRow]) -> str:
    """Whether keeping the protect list's modules in float does better than keeping as many random ones, in words."""
    found = {row.kind: row for row in rows}
    all_, protected, control, sparse = (found.get(kind) for kind in ("all", "protected", "control", "sparse"))
    if not (all_ and protected and control):
        return ""
    n = len(protected.modules_in_float)
    verdict = ("does better than the control" if protected.perplexity < control.perplexity
               else "does no better than the control: here the protect list's modules matter no more than any others")
    words = (f"with {all_.engine}, everything quantized gives perplexity {all_.perplexity:,.2f}; keeping the protect list's {n} "
             f"module{'s' if n != 1 else ''} in float gives {protected.perplexity:,.2f}, and {n} random one{'s' if n != 1 else ''} "
             f"of the same kind {control.perplexity:,.2f}: the protect list {verdict}")
    if sparse and sparse.corrections:
        words += (f"; adding back only the super weights' {sparse.corrections} quantization error{'s' if sparse.corrections != 1 else ''} "
                  f"gives {sparse.perplexity:,.2f}")
        if abs(sparse.perplexity - all_.perplexity) < 0.01 * all_.perplexity:
            words += (f", no better: the super weights themselves survive this engine (their largest error is {sparse.largest_error:.1%} "
                      f"of the weight), so what the module kept in float gives is the rest of its matrix")
    return words
