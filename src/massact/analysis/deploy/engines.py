"""Protect lists measured in the quantization engines people deploy with, against a control.

Each engine quantizes the block projections (every ``nn.Linear`` inside the blocks but a mixture of experts' router,
which the adapter names; the embeddings and the output head stay as they are) with the real library, and the model is
scored four ways:

- ``all``: every block projection quantized;
- ``protected``: the modules that hold a super weight of the protect list kept in float;
- ``control``: as many modules of the same kinds (the same path in another block), chosen at random with a fixed
  seed, kept in float: what keeping that much of the model in float gives by itself;
- ``sparse``: every projection quantized, then ``w - w_quantized`` added back at the super weights' coordinates as a
  sparse correction of the output (a hook adds correction x input[col] to output[row]): Yu et al.'s "restore the super
  weight", on a real engine, for a few scalars instead of a whole module.

Each projection is quantized once; the four ways swap the float or the engine's module in. A projection the engine
cannot take (torchao's groups of 64 need an input size that is a multiple of 64) stays in float in every way and is
named in each row (``EngineRow.refused``), as are the protect list's super weights that no quantized module holds
(``EngineRow.not_kept``: fused experts' 3-D parameters, which these engines do not quantize); where none of the list is
in a module the engine quantizes, only the ``all`` way is measured and the words say why there is no comparison. The
engines are optional extras (``pip install massact[engines]``).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import UsageError
from ...models.adapters.base import text_config
from ...models.loading import LoadedModel
from . import exports
from .protect import Protect
from .results import EngineRow

SEED = 0  # the control's draw


@dataclass(frozen=True, kw_only=True)
class Engine:
    """A quantization library, as massact drives it: ``quantize`` makes one ``nn.Linear``'s quantized module,
    ``weight`` gives a quantized module's weight back in float [out, in], ``nbytes`` the bytes it stores its weight in;
    ``refuses`` says why the library cannot take a linear (None: it can); ``settings`` are what the engine is given
    (written into each row), ``package`` what to install."""

    name: str
    package: str
    settings: dict
    quantize: Callable[[nn.Linear], nn.Module]
    weight: Callable[[nn.Module], torch.Tensor]
    nbytes: Callable[[nn.Module], int]
    refuses: Callable[[nn.Linear], str | None] = field(default=lambda linear: None)


def _quanto() -> Engine:
    from optimum.quanto import freeze, qint4, quantize

    def one(linear: nn.Linear) -> nn.Module:
        holder = nn.Sequential(copy.deepcopy(linear))  # quanto quantizes a model's children in place
        quantize(holder, weights=qint4)
        freeze(holder)
        return holder[0]

    # (quanto takes every shape: inputs of 7 to 256 and a single output row quantize and run, groups of 128 or not)
    return Engine(name="quanto", package="optimum-quanto",
                  settings={"weights": "qint4", "group_size": 128, "library": _version("optimum-quanto")},
                  quantize=one, weight=lambda m: m.weight.dequantize(), nbytes=lambda m: _state_bytes(m, "weight."))


def _hqq() -> Engine:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    group = 64
    config = BaseQuantizeConfig(nbits=3, group_size=group)

    def one(linear: nn.Linear) -> nn.Module:
        weight = linear.weight
        return HQQLinear(copy.deepcopy(linear), quant_config=config, compute_dtype=weight.dtype, device=str(weight.device), del_orig=True)

    def refuses(linear: nn.Linear) -> str | None:  # HQQ cuts the flattened weight into groups: its size must divide
        size = linear.weight.numel()
        return f"its {size:,} weights are not a multiple of HQQ's group size {group}" if size % group else None

    return Engine(name="hqq", package="hqq", settings={"nbits": 3, "group_size": group, "library": _version("hqq")}, quantize=one,
                  weight=lambda m: m.dequantize().reshape(m.meta["shape"]),
                  nbytes=lambda m: m.W_q.nbytes + m.meta["scale"].nbytes + m.meta["zero"].nbytes, refuses=refuses)


def _torchao() -> Engine:
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    group = 64
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))

    def one(linear: nn.Linear) -> nn.Module:
        copied = copy.deepcopy(linear)
        quantize_(copied, config)
        return copied

    def nbytes(module: nn.Module) -> int:
        weight = module.weight
        return sum(getattr(weight, name).nbytes for name in weight.__tensor_flatten__()[0] if getattr(weight, name) is not None)

    def refuses(linear: nn.Linear) -> str | None:  # torchao's groups run along each row: the input size must divide
        size = linear.in_features
        return f"its input size {size} is not a multiple of torchao's group size {group}" if size % group else None

    return Engine(name="torchao", package="torchao",
                  settings={"config": f"IntxWeightOnlyConfig(int4, PerGroup({group}))", "library": _version("torchao")},
                  quantize=one, weight=lambda m: m.weight.dequantize(), nbytes=nbytes, refuses=refuses)


def _bnb() -> Engine:
    # bitsandbytes' CPU backend logs at import, on every CPU with AVX512-BF16, that an optional kernel package is not
    # installed (its plain CPU code runs instead): a library's note, not massact's to print.
    with _quiet("bitsandbytes.backends.cpu.ops"):
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

    # (bitsandbytes' blocks of 64 run over the flattened weight, its last one short where it must be: every shape)
    return Engine(name="bnb", package="bitsandbytes",
                  settings={"quant_type": "nf4", "blocksize": 64, "library": _version("bitsandbytes")},
                  quantize=one, weight=weight, nbytes=nbytes)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """While open, the library logger ``logger`` says nothing below an error; its level is put back after."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


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
    """Every ``nn.Linear`` inside the blocks, by its full module name (the modules an engine quantizes), but the
    routers the adapter names (and anything inside them): a router picks experts, it is no projection of the stream."""
    model, path = lm.model, lm.adapter.layers_path(lm.model)
    found = {}
    for index, block in enumerate(lm.adapter.blocks(model)):
        routers = lm.adapter.routers(text_config(model), index)
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not any(name == r or name.startswith(r + ".") for r in routers):
                found[f"{path}.{index}.{name}"] = module
    return found


def refused_modules(the_engine: Engine, originals: dict[str, nn.Linear]) -> dict[str, str]:
    """The projections ``the_engine`` cannot take, each with why: a subclass of ``nn.Linear`` with a forward of its own
    (the engine's module computes x W^T + b and nothing else), or a shape the library's rule says no to."""
    refused = {}
    for name, linear in originals.items():
        if type(linear).forward is not nn.Linear.forward:
            refused[name] = (f"it is a {type(linear).__name__}, whose forward is its own, not nn.Linear's: the engine's "
                             "quantized linear would not compute it")
        elif (why := the_engine.refuses(linear)) is not None:
            refused[name] = why
    return refused


def protected_modules(lm: LoadedModel, protect: Protect) -> list[str]:
    """The block projections that hold a super weight of the protect list: the list's modules an engine can keep."""
    return sorted(set(exports.protected_modules(protect)) & set(projections(lm)))


def not_kept(protect: Protect, name: str, originals: dict[str, nn.Linear], quantized: Collection[str],
             refused: dict[str, str]) -> dict[str, str]:
    """The protect list's super weights (parameter names) that no module the engine ``name`` quantizes holds, each
    with why (a clause that follows the name): they stay in float in every way, so keeping them out is no choice this
    engine has."""
    why = {}
    for weight in protect.super_weights:
        module = weight.parameter.removesuffix(".weight")
        if len(weight.index) != 2:
            why[weight.parameter] = (f"is in fused experts (one 3-D parameter that holds every expert), which {name} leaves in "
                                     "float: it quantizes nn.Linear modules only")
        elif module in refused:
            why[weight.parameter] = f"is in a module {name} cannot take, left in float: {refused[module]}"
        elif module not in quantized or module not in originals:
            why[weight.parameter] = f"is in no nn.Linear block projection, and those are all {name} quantizes"
    return why


def control_modules(lm: LoadedModel, protected: list[str], seed: int = SEED, *, among: Collection[str] | None = None) -> list[str]:
    """As many block projections as ``protected``, of the same kinds (the same path inside a block), chosen at random
    with ``seed`` among the others (``among``: the ones an engine quantizes; default every projection)."""
    names = projections(lm) if among is None else among
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


@dataclass(kw_only=True)
class EngineWays:
    """One engine's ways of running the model (see the module's docstring), fixed once the modules it quantizes are
    known: ``refused`` (module -> why it stays in float), the ``protected`` modules and the ``control``'s, the protect
    list's super weights no quantized module holds (``outside``) and the ``coordinates`` the sparse way corrects
    (module, row, col); ``float_bytes`` each projection's weight in float."""

    name: str
    engine: Engine
    refused: dict[str, str]
    protected: list[str]
    control: list[str]
    outside: dict[str, str]
    coordinates: list[tuple[str, int, int]]
    float_bytes: dict[str, int]

    def ways(self) -> list[tuple[str, list[str]]]:
        """(kind, modules kept in float) of each way but the sparse one, which keeps none. With nothing of the protect
        list in a quantized module, keeping it out and the control would both keep 0 modules and restoring would
        correct 0 entries: three copies of the "all" row, so it is measured alone."""
        return [("all", []), ("protected", self.protected), ("control", self.control)] if self.protected else [("all", [])]

    def row(self, kind: str, in_float: list[str], perplexity: float, value: float, baseline: float, float_value: float,
            nbytes: dict[str, int], seconds: float, corrected: int = 0, largest: float = 0.0) -> EngineRow:
        """The way's row: its perplexity (against the float model's ``baseline``) and massive value at its birth block
        (against ``float_value``); ``nbytes``: each quantized module's stored bytes."""
        stored = sum(self.float_bytes[m] if m in in_float or m not in nbytes else nbytes[m] for m in self.float_bytes)
        return EngineRow(engine=self.name, kind=kind, settings=self.engine.settings, modules_in_float=in_float, perplexity=perplexity,
                         perplexity_ratio=perplexity / baseline, value_birth=value,
                         kept_birth=value / float_value if float_value else float("nan"), weight_bytes=int(stored + corrected * 12),
                         float_bytes=int(sum(self.float_bytes.values())), corrections=corrected, largest_error=largest,
                         seconds=round(seconds, 2), refused=dict(self.refused), not_kept=dict(self.outside))


def engine_ways(lm: LoadedModel, protect: Protect, name: str, the_engine: Engine, originals: dict[str, nn.Linear],
                quantized: Collection[str], refused: dict[str, str]) -> EngineWays:
    """The ways of engine ``name`` once ``quantized`` (the module names it quantizes) is known. Reads the modules'
    shapes and names only."""
    protected = [module for module in protected_modules(lm, protect) if module in quantized]
    return EngineWays(name=name, engine=the_engine, refused=refused, protected=protected,
                      control=control_modules(lm, protected, among=quantized),
                      outside=not_kept(protect, name, originals, quantized, refused),
                      coordinates=[(w.parameter.removesuffix(".weight"), w.index[-2], w.index[-1]) for w in protect.super_weights
                                   if len(w.index) == 2 and w.parameter.removesuffix(".weight") in quantized],
                      float_bytes={module: linear.weight.nbytes for module, linear in originals.items()})


def quantize_modules(the_engine: Engine, name: str, originals: dict[str, nn.Linear], refused: dict[str, str]) -> dict[str, nn.Module]:
    """Each of ``originals`` but the ``refused`` quantized by the engine; one its library refuses when asked (a shape
    or dtype rule ``refuses`` does not know) is added to ``refused``, with the library's reason."""
    quantized = {}
    for module, linear in originals.items():
        if module in refused:
            continue
        try:
            quantized[module] = the_engine.quantize(linear)
        except (AssertionError, ValueError) as error:
            refused[module] = f"{name} refused it: " + (str(error).strip().splitlines() or [type(error).__name__])[0]
    return quantized


def engine_modules(lm: LoadedModel, name: str) -> tuple[Engine, dict[str, nn.Linear], dict[str, str]]:
    """Engine ``name``, the block projections it may quantize and those its rules refuse (with why); one UsageError
    line where the blocks have no ``nn.Linear``."""
    the_engine = engine(name)
    originals = projections(lm)
    if not originals:
        raise UsageError(f"the {name} engine quantizes nn.Linear modules, and this model's blocks have none (Conv1D weights)")
    return the_engine, originals, refused_modules(the_engine, originals)


def no_module_taken(name: str, originals: dict[str, nn.Linear], refused: dict[str, str]) -> UsageError:
    """The error where engine ``name`` takes none of the block projections."""
    module, why = next(iter(refused.items()))
    return UsageError(f"the {name} engine can take none of this model's {len(originals)} block projections ({module}: {why})")


def engine_rows(lm: LoadedModel, protect: Protect, name: str, score: Callable[[], float], read: Callable[[], float],
                baseline: float, float_value: float) -> list[EngineRow]:
    """The rows of one engine (see the module's docstring): ``score`` is the perplexity of the model as it is now,
    ``read`` the massive value at its birth block on its probe (``float_value`` in the float model). Four rows, or the
    ``all`` row alone where no super weight of the protect list is in a module the engine quantizes."""
    the_engine, originals, refused = engine_modules(lm, name)
    started = time.perf_counter()
    quantized = quantize_modules(the_engine, name, originals, refused)
    quantize_seconds = time.perf_counter() - started
    if not quantized:
        raise no_module_taken(name, originals, refused)
    ways = engine_ways(lm, protect, name, the_engine, originals, quantized, refused)
    nbytes = {module: the_engine.nbytes(q) for module, q in quantized.items()}
    rows = []

    def measure(kind: str, in_float: list[str], corrected: int = 0, largest: float = 0.0) -> EngineRow:
        began = time.perf_counter()
        ppl, value = score(), read()
        return ways.row(kind, in_float, ppl, value, baseline, float_value, nbytes, time.perf_counter() - began + quantize_seconds / 4,
                        corrected, largest)

    for kind, in_float in ways.ways():
        with swapped(lm, {m: module for m, module in quantized.items() if m not in in_float}):
            rows.append(measure(kind, in_float))
    if ways.protected:
        with swapped(lm, quantized), sparse_corrections(quantized, the_engine, originals, ways.coordinates) as (corrected, largest):
            rows.append(measure("sparse", [], corrected, largest))
    return rows


def engine_words(rows: list[EngineRow]) -> str:
    """Whether keeping the protect list's modules in float does better than keeping as many random ones, in words;
    where the engine quantizes none of the list's super weights, that there is no such comparison, and why."""
    found = {row.kind: row for row in rows}
    all_, protected, control, sparse = (found.get(kind) for kind in ("all", "protected", "control", "sparse"))
    if all_ is None:
        return ""
    outside = "; ".join(f"{parameter} {why}" for parameter, why in all_.not_kept.items())
    if not (protected and control):
        return (f"with {all_.engine}, everything quantized gives perplexity {all_.perplexity:,.2f}; the protect list names no module "
                f"{all_.engine} quantizes, so {all_.engine} cannot keep it out and nothing is compared with a control: "
                + (outside or "it names no super weight"))
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
    if outside:
        words += f"; of the protect list's other super weights, {outside}"
    return words
