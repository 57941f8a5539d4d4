"""What quantization does to the massive activations (Yu et al. 2024; PrefixQuant, Chen et al. 2024).

Weights: every linear projection of the blocks (not the embeddings, the output head or the norms) is fake-quantized
(quantized, then dequantized in the model's dtype) with asymmetric min-max round-to-nearest, or with a llama.cpp block
format through the gguf package's reference quantizer; optionally the super weights are held out (left out of the
range and put back in full precision) and the remaining outliers clipped at a z-score. Activations: the input of
every block projection is fake-quantized to int8 per tensor or per token, optionally with the massive tokens kept
in float. Each setting is one perplexity pass over the evaluation text plus one read of the massive value at its
birth and peak block; the weights are restored bit-exactly after each one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...capture.edits import massive_mask, read_coordinate
from ...capture.expert_maxima import instrumented
from ...capture.hooks import forward_until, tap
from ...errors import UsageError
from ...models.loading import LoadedModel
from ...settings import QUANT_DEFAULTS, QUANT_GRIDS, ScanSettings
from ..evaluation.mlm import next_token_windows
from ..evaluation.perplexity import default_eval_text, eval_windows, perplexity
from ..evaluation.windows import Evaluation
from .engines import engine, engine_rows, engine_words
from .protect import Protect
from .results import EngineRow, ProtectedDim, Quantization, QuantRow

GGUF_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
DEFAULT_BLOCK = QUANT_DEFAULTS["block_size"]  # entries per flat block
DEFAULT_CLIP_Z = QUANT_DEFAULTS["clip_z"]
ROW_GROUP = 128


@dataclass(frozen=True)
class Setting:
    """One point of the grid. ``granularity``: "tensor", "block" (flat blocks of ``block`` entries) or "row" (groups
    of 128 along each row's input dim); ``variant``: "plain", "held out" (super weights) or "held out + clip";
    for activations: "plain" or "massive in float"."""

    method: str
    bits: int = 0
    granularity: str = ""
    variant: str = "plain"
    fmt: str = ""
    block: int = DEFAULT_BLOCK

    @property
    def label(self) -> str:
        if self.method == "gguf":
            return self.fmt
        if self.method == "activation":
            return f"int8 per {self.granularity}"
        where = {"tensor": "per tensor", "block": f"blocks of {self.block:,}", "row": f"groups of {ROW_GROUP} per row"}
        return f"{self.bits}-bit {where[self.granularity]}"


def grid(name: str = "default", block: int = DEFAULT_BLOCK) -> list[Setting]:
    """The settings of a named grid. ``default`` fits a few minutes on a small CPU; ``full`` is every combination."""
    if name not in QUANT_GRIDS:
        raise UsageError(f"--quant-grid must be one of {', '.join(QUANT_GRIDS)}; got {name!r}")
    three = ("plain", "held out", "held out + clip")
    if name == "none":  # the real engines' rows alone
        return []
    if name == "default":  # about 20 perplexity passes
        rtn = [Setting("rtn", 8, "tensor", v) for v in three[:2]]
        rtn += [Setting("rtn", 4, "tensor", v) for v in (three[0], three[2])]
        rtn += [Setting("rtn", 4, "block", v, block=block) for v in three]
        rtn += [Setting("rtn", b, "row", v) for b in (4, 3) for v in three[:2]]
        gguf_rows = [Setting("gguf", fmt="Q8_0")] + [Setting("gguf", fmt=f, variant=v) for f in ("Q4_0", "Q4_1") for v in three[:2]]
    else:
        rtn = [Setting("rtn", b, g, v, block=block) for b in (8, 4, 3) for g in ("tensor", "block", "row") for v in three]
        gguf_rows = [Setting("gguf", fmt=f, variant=v) for f in GGUF_FORMATS for v in three[:2]]
    acts = [Setting("activation", 8, g, v) for g in ("tensor", "token") for v in ("plain", "massive in float")]
    return rtn + gguf_rows + acts


# ---- the quantizers: small pure functions over tensors ----


def rtn_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest of each row of ``x`` [groups, size], dequantized (in float32):
    scale = (max - min) / (2^bits - 1), zero = clamp(round(-min / scale), 0, 2^bits - 1),
    q = clamp(round(x / scale) + zero, 0, 2^bits - 1), x' = (q - zero) x scale. A constant row is exact."""
    x = x.float()
    levels = 2**bits - 1
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), (high - low) / levels)
    zero = torch.round(-low / scale).clamp(0, levels)
    q = (torch.round(x / scale) + zero).clamp(0, levels)
    return torch.where(flat, x, (q - zero) * scale)


def _by_groups(flat: torch.Tensor, size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` over consecutive groups of ``size`` entries of a 1-D tensor; a shorter last group is its own group."""
    full = flat.numel() // size * size
    parts = [fn(flat[:full].view(-1, size)).flatten()] if full else []
    if full < flat.numel():
        parts.append(fn(flat[full:].view(1, -1)).flatten())
    return torch.cat(parts)


def rtn(weight: torch.Tensor, bits: int, granularity: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Fake-quantize a weight given as [..., in] (rows along the input dim), returned in float32 and the same shape.
    ``tensor``: one range for the whole tensor; ``block``: flat blocks of ``block`` entries in row-major order;
    ``row``: groups of 128 consecutive inputs within each row (a shorter last group where ``in`` is not a multiple)."""
    quantize = lambda g: rtn_rows(g, bits)
    if granularity == "tensor":
        return rtn_rows(weight.reshape(1, -1), bits).view(weight.shape)
    if granularity == "block":
        return _by_groups(weight.reshape(-1), block, quantize).view(weight.shape)
    rows = weight.reshape(-1, weight.shape[-1])
    full = rows.shape[1] // ROW_GROUP * ROW_GROUP
    out = torch.empty(rows.shape, dtype=torch.float32, device=weight.device)
    if full:
        out[:, :full] = quantize(rows[:, :full].reshape(-1, ROW_GROUP)).view(rows.shape[0], full)
    if full < rows.shape[1]:
        out[:, full:] = quantize(rows[:, full:])
    return out.view(weight.shape)


def gguf_roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize [..., in] with the gguf package's reference quantizer for a llama.cpp block format (blocks along the
    input dim, as llama.cpp stores a linear weight) and dequantize with its own dequantizer; float32, same shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[fmt]
    data = weight.detach().float().cpu().contiguous().numpy()
    back = dequantize(quantize(data, kind), kind)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).view(weight.shape).to(weight.device)


def gguf_block_size(fmt: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt]][0]


def int8_rows(x: torch.Tensor, scale_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric absmax int8 of each row of ``x`` [rows, width], dequantized: scale = max |x| / 127 over the row (or
    over the rows ``scale_rows`` marks, one scale for all of them), q = clamp(round(x / scale), -127, 127)."""
    if scale_rows is None:
        scale = x.abs().amax(-1, keepdim=True) / 127
    else:
        chosen = x[scale_rows] if scale_rows.any() else x
        scale = chosen.abs().amax().reshape(1, 1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(x / scale).clamp(-127, 127) * scale).to(x.dtype)


# ---- where the quantizers act ----


def projections(lm: LoadedModel, layers: Collection[int] | None = None) -> list[tuple[str, nn.Parameter, bool]]:
    """Every linear projection's weight inside the blocks (of ``layers``; None: every block): (name, parameter,
    stored transposed), the 2-D (and fused 3-D expert) weights. Norms and biases are 1-D; embeddings and the output
    head sit outside the blocks."""
    found = []
    path = lm.adapter.layers_path(lm.model)
    for index, block in enumerate(lm.adapter.blocks(lm.model)):
        if layers is not None and index not in layers:
            continue
        owners = {name: module for name, module in block.named_modules()}
        for name, parameter in block.named_parameters():
            if parameter.ndim >= 2:
                owner = owners[name.rpartition(".")[0]]
                found.append((f"{path}.{index}.{name}", parameter, lm.adapter.is_in_out(owner)))
    return found


@contextmanager
def quantized_weights(
    lm: LoadedModel, quantize: Callable[[torch.Tensor], torch.Tensor], held_out: list[tuple[str, tuple[int, ...]]] = (),
    clip_z: float | None = None, skip: Callable[[torch.Tensor], bool] = lambda w: False, layers: Collection[int] | None = None,
) -> Iterator[Quantized]:
    """Fake-quantize every block projection (of ``layers``; None: every block) with ``quantize`` (given [..., in],
    returns float32 of that shape). ``held_out`` entries (parameter name, index as stored) are set to 0 before (so
    they do not stretch the range) and put back in full precision after; ``clip_z`` clips the rest at mean +/- z x std
    of each matrix first. Matrices ``skip`` says no to stay in float (``Quantized.skipped``). Every weight is restored
    on exit."""
    done = Quantized(lm, quantize, clip_z, layers)
    try:
        with torch.no_grad():
            done.apply(held_out, skip)
        yield done
    finally:
        done.restore()


class Quantized:
    """The block projections as ``quantized_weights`` set them, with their originals to quantize from and restore."""

    def __init__(self, lm: LoadedModel, quantize: Callable[[torch.Tensor], torch.Tensor], clip_z: float | None,
                 layers: Collection[int] | None = None):
        self.lm, self.quantize, self.clip_z, self.layers = lm, quantize, clip_z, layers
        self.skipped: list[str] = []
        self._saved: dict[str, tuple[nn.Parameter, bool, torch.Tensor]] = {}  # name -> (parameter, transposed, original)

    def apply(self, held_out: list[tuple[str, tuple[int, ...]]], skip: Callable[[torch.Tensor], bool]) -> None:
        """Quantize every block projection but those ``skip`` says no to, ``held_out`` entries held out."""
        held = _by_name(held_out)
        for name, parameter, transposed in projections(self.lm, self.layers):
            if skip(parameter.data.transpose(-1, -2) if transposed else parameter.data):
                self.skipped.append(name)
                continue
            self._saved[name] = (parameter, transposed, parameter.data.clone())
            self._set(name, held.get(name, []))

    def hold_out(self, held_out: list[tuple[str, tuple[int, ...]]]) -> None:
        """From a plain setting (no entries held out, no clipping) to its "held out" sibling: only the matrices that
        hold one of ``held_out`` change, quantized again from their originals; every other one is already what the
        sibling would make of it."""
        with torch.no_grad():
            for name, indices in _by_name(held_out).items():
                if name in self._saved:  # a skipped matrix is in float, its held entries with it
                    self._set(name, indices)

    def restore(self) -> None:
        with torch.no_grad():
            for parameter, _, original in self._saved.values():
                parameter.data.copy_(original)

    def _set(self, name: str, held: list[tuple[int, ...]]) -> None:
        """Matrix ``name`` quantized from its original, ``held`` entries outside the range and put back after."""
        parameter, transposed, original = self._saved[name]
        work = original.to(torch.float32, copy=True)
        for index in held:
            work[index] = 0.0
        if self.clip_z is not None:
            mean, std = work.mean(), work.std()
            work.clamp_(float(mean - self.clip_z * std), float(mean + self.clip_z * std))
        done = self.quantize(work.transpose(-1, -2) if transposed else work)
        done = done.transpose(-1, -2) if transposed else done
        for index in held:
            done[index] = original[index].float()
        parameter.data.copy_(done.to(parameter.dtype))


def _by_name(held_out: list[tuple[str, tuple[int, ...]]]) -> dict[str, list[tuple[int, ...]]]:
    held: dict[str, list[tuple[int, ...]]] = {}
    for name, index in held_out:
        held.setdefault(name, []).append(tuple(index))
    return held


class ActivationQuant:
    """int8 fake-quantization of every block projection's input (per tensor or per token), as forward pre-hooks; in a
    mixture of experts also every expert's input and its neurons' activations (the fused experts run instrumented,
    ``massact.capture.expert_maxima``). ``keep`` [positions] marks the massive tokens of the current input: kept in float
    when ``keep_massive``, and always used to split the squared error (summed over every input entry) into the
    massive tokens' part (while ``counting``: the evaluation windows are, the probe is not)."""

    def __init__(self, lm: LoadedModel, per_token: bool, keep_massive: bool):
        self.lm, self.per_token, self.keep_massive = lm, per_token, keep_massive
        self.keep: torch.Tensor | None = None
        self.counting = True
        self.error_total = 0.0
        self.error_massive = 0.0

    def _quantize(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` quantized; ``positions``: which position each of its rows is (an expert's tokens), else row = position."""
        rows = x.reshape(-1, x.shape[-1])
        # One sequence per pass: rows are positions (flat [positions, d] inputs included), or an expert's tokens.
        if self.keep is not None and positions is not None:
            keep = self.keep.to(x.device)[positions]
        elif self.keep is not None and self.keep.numel() == rows.shape[0]:
            keep = self.keep.to(x.device)
        else:
            keep = torch.zeros(rows.shape[0], dtype=torch.bool, device=x.device)
        if self.per_token:
            out = int8_rows(rows)
        else:
            out = int8_rows(rows, ~keep if self.keep_massive else torch.ones_like(keep))
        if self.keep_massive:
            out = torch.where(keep.unsqueeze(1), rows, out)
        if self.counting:
            error = (out.double() - rows.double()).pow(2).sum(-1)
            self.error_total += float(error.sum())
            self.error_massive += float(error[keep].sum())
        return out.view(x.shape)

    @property
    def share(self) -> float:
        """The massive tokens' share of the squared quantization error so far."""
        return self.error_massive / self.error_total if self.error_total > 0 else 0.0

    @contextmanager
    def active(self) -> Iterator["ActivationQuant"]:
        handles = []
        for block in self.lm.adapter.blocks(self.lm.model):
            for module in block.modules():
                if self.lm.adapter.is_projection(module):
                    handles.append(module.register_forward_pre_hook(lambda m, args: (self._quantize(args[0]), *args[1:])))
        try:
            with instrumented(self.lm, transform=self._quantize):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def massive_positions(lm: LoadedModel, ids: torch.Tensor, protect: Protect) -> torch.Tensor:
    """[positions] True where any protected dim is massive (the protect list's criterion) at any block it lives in."""
    keep = torch.zeros(ids.shape[1], dtype=torch.bool)
    blocks = massive_blocks(protect)

    def mark(layer: int, site: str, hidden: torch.Tensor) -> None:
        nonlocal keep
        keep |= massive_at(hidden, protect)

    with torch.no_grad(), tap(lm.model, lm.adapter, [(b, lm.adapter.stream) for b in blocks], mark):
        forward_until(lm.model, lm.adapter, blocks[-1], input_ids=ids.to(lm.device), use_cache=False)
    return keep


def massive_blocks(protect: Protect) -> list[int]:
    """Every block any protected dim is massive in, in order."""
    return sorted({b for d in protect.massive_dims for b in d.blocks})


def massive_at(hidden: torch.Tensor, protect: Protect) -> torch.Tensor:
    """[positions] (on the host) True where any protected dim is massive in a one-text block output ``hidden``."""
    found = torch.zeros(hidden.shape[1], dtype=torch.bool)
    for d in protect.massive_dims:
        found |= massive_mask(hidden, d.dim, protect.criterion)[0].cpu()
    return found


# ---- the sweep ----


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """A sweep's options as ``settings`` give them, the defaults filled in, and its evaluation text and source."""

    grid: str
    engines: tuple[str, ...]
    block: int
    clip_z: float
    text: str
    source: str


def sweep_options(settings: ScanSettings, eval_text: str | None) -> SweepOptions:
    """The options of ``settings``' sweep (``quant_grid``, ``engines``, ``block_size``, ``clip_z``) on ``eval_text``
    (None: the shipped sample); one UsageError line now where an engine's library is missing, not after the sweep."""
    for name in settings.engines:
        engine(name)
    return SweepOptions(grid=settings.quant_grid, engines=tuple(settings.engines),
                        block=DEFAULT_BLOCK if settings.block_size is None else settings.block_size,
                        clip_z=DEFAULT_CLIP_Z if settings.clip_z is None else settings.clip_z, text=eval_text or default_eval_text(),
                        source="massact/data/eval.txt (Declaration of Independence, Gettysburg Address)" if eval_text is None
                        else "--eval-file")


def measure_quantization(
    lm: LoadedModel, protect: Protect, eval_text: str | None, settings: ScanSettings,
    progress: Callable[[str, int | None], Callable[[], None]] | None = None, earlier: Quantization | None = None,
) -> Quantization:
    """The sweep over the grid ``settings.quant_grid`` (its ``clip_z`` and ``block_size``; None: the defaults), and the
    rows of each real quantization engine in ``settings.engines`` (``massact.analysis.deploy.engines``), on the shipped
    evaluation text unless ``eval_text`` is given; ``progress`` as in ``massact.scan`` (one step per setting).
    ``earlier`` (a saved report's sweep) is returned as it is when it was measured on the same inputs
    (``sweep_inputs``): the same sweep again would give the same numbers."""
    options = sweep_options(settings, eval_text)
    inputs = sweep_inputs(lm, protect, options)
    if earlier is not None and earlier.inputs_sha256 == inputs:
        return earlier
    points = grid(options.grid, options.block)
    step = progress("quantization settings", len(points) + len(options.engines)) if progress else (lambda: None)
    result = sweep(lm, protect, options.text, options.source, options.grid, options.clip_z, options.block, step, points, options.engines)
    return finished(lm, protect, result, inputs)


def finished(lm: LoadedModel, protect: Protect, result: Quantization, inputs: str) -> Quantization:
    """A measured sweep with its inputs' digest (``sweep_inputs``) and, for a model read from a GGUF file, the note
    on the formats it was stored in."""
    note = gguf_source_note(lm, protect)
    if note:
        result.notes.insert(0, note)
    result.inputs_sha256 = inputs
    return result


def sweep_inputs(lm: LoadedModel, protect: Protect, options: SweepOptions) -> str:
    """The sha256 of everything a sweep's numbers depend on besides the weights, which the protect list's super
    weights and massive values stand for: the protect list, the evaluation text, dtype, device type, grid and engines."""
    inputs = {"protect": dataclasses.asdict(protect), "eval_text": options.text, "dtype": str(lm.dtype),
              "device": lm.device.type, "grid": options.grid, "clip_z": options.clip_z, "block": options.block}
    if options.engines:  # (a sweep without engines keeps the hash it always had)
        inputs["engines"] = list(options.engines)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def gguf_source_note(lm: LoadedModel, protect: Protect) -> str | None:
    """For a model loaded from a GGUF file (the default model is one): the formats its block projections were stored
    in, and that its super weights are what the file dequantizes to, so they survived that format."""
    from collections import Counter

    from gguf import GGUFReader

    from ...models.loading import default_gguf

    if lm.source is not None and not str(lm.source).lower().endswith(".gguf"):
        return None
    path = default_gguf() if lm.source is None else lm.source
    kinds = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    stored = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    weights = "; ".join(f"{w.parameter}[{w.row}, {w.col}] = {w.value:+.4f}" for w in protect.super_weights) or "none found"
    return (f"this model was loaded from a GGUF file whose block projections are stored as {stored}: every weight measured here "
            f"is what that file dequantizes to, so its super weights ({weights}) survived that format; the rows below "
            "quantize those weights again")


@dataclass(kw_only=True)
class SweepPlan:
    """What a sweep measures, fixed before any setting runs: the ``settings`` (the grid's), the strongest massive dim
    (``target``), read on its probe's ids at ``layers`` (its birth and peak blocks), the super weights ``held`` out
    (parameter name, index as stored), the block projections' ``names``, and the evaluation ``windows``."""

    settings: list[Setting]
    target: ProtectedDim
    probe: torch.Tensor
    layers: list[int]
    held: list[tuple[str, tuple[int, ...]]]
    names: set[str]
    windows: list[torch.Tensor]
    grid: str
    clip_z: float
    eval_source: str


def sweep_plan(lm: LoadedModel, protect: Protect, eval_text: str, eval_source: str, grid_name: str = "default",
               clip_z: float = DEFAULT_CLIP_Z, block: int = DEFAULT_BLOCK, settings: list[Setting] | None = None) -> SweepPlan:
    """The sweep of ``protect`` on ``lm`` over the grid (or ``settings``) on ``eval_text``; one UsageError line where
    there is nothing to measure, an option is out of range, or a super weight is no block projection of the model.
    Reads the model's structure only: its blocks' weights may be on the meta device."""
    if not protect.massive_dims:
        raise UsageError("nothing to measure: the model has no massive activations under the criterion")
    if block < 1 or not clip_z > 0:
        raise UsageError("--block-size must be at least 1 and --clip-z above 0")
    target = max(protect.massive_dims, key=lambda d: abs(d.peak_value))
    held = [(w.parameter, tuple(w.index)) for w in protect.super_weights]
    names = {name for name, _, _ in projections(lm)}
    missing = [name for name, _ in held if name not in names]
    if missing:
        raise UsageError(f"super weight {missing[0]} is not a block projection of this model (a protect list of another model?)")
    return SweepPlan(settings=settings if settings is not None else grid(grid_name, block), target=target,
                     probe=lm.tokenizer(target.probe_text, return_tensors="pt").input_ids,
                     layers=sorted({target.born_at, target.peak_block}), held=held, names=names,
                     windows=eval_windows(lm, eval_text), grid=grid_name, clip_z=clip_z, eval_source=eval_source)


def quant_row(plan: SweepPlan, setting: Setting, perplexity: float, baseline: float, values: dict[int, float],
              base_values: dict[int, float], share: float | None, seconds: float) -> QuantRow:
    """One setting's row: its perplexity against the float model's ``baseline``, the target's ``values`` at its birth
    and peak blocks against the float model's ``base_values``, and (activations) the massive tokens' error share."""
    birth, peak = plan.target.born_at, plan.target.peak_block
    return QuantRow(method=setting.method, setting=setting.label, variant=_variant_words(setting, plan.clip_z), perplexity=perplexity,
                    perplexity_ratio=perplexity / baseline, value_birth=values[birth], value_peak=values[peak],
                    kept_birth=_kept(values[birth], base_values[birth]), kept_peak=_kept(values[peak], base_values[peak]),
                    massive_error_share=share, seconds=round(seconds, 2))


def skipped_note(fmt: str, skipped: int) -> str:
    """Why ``skipped`` matrices stay in float under the llama.cpp format ``fmt``."""
    return (f"{fmt}: {skipped} matrices whose input dim is not a multiple of {gguf_block_size(fmt)} stay in float (llama.cpp "
            "falls back to another type for them)")


def quantization_from(lm: LoadedModel, plan: SweepPlan, protect: Protect, baseline: float, base_values: dict[int, float],
                      masks: list[torch.Tensor], rows: list[QuantRow], notes: list[str], engines: tuple[str, ...],
                      found: list[EngineRow], seconds: float) -> Quantization:
    """The sweep's result from its measured ``rows`` and engines' rows ``found`` (``masks``: each window's massive
    tokens)."""
    target = plan.target
    return Quantization(
        baseline_perplexity=baseline, eval_tokens=sum(w.shape[1] for w in plan.windows), eval_source=plan.eval_source, dim=target.dim,
        birth_layer=target.born_at, peak_layer=target.peak_block, position=target.probe_position,
        value_birth=base_values[target.born_at], value_peak=base_values[target.peak_block], matrices=len(plan.names),
        parameters=sum(p.numel() for _, p, _ in projections(lm)),
        super_weights=[[w.parameter, list(w.index), w.value] for w in protect.super_weights],
        massive_tokens=int(sum(int(m.sum()) for m in masks)), grid=plan.grid, clip_z=plan.clip_z, rows=rows,
        seconds=round(seconds, 1), notes=notes, engines=found,
        engine_words=[words for name in engines if (words := engine_words([r for r in found if r.engine == name]))],
    )


def sweep(
    lm: LoadedModel, protect: Protect, eval_text: str, eval_source: str, grid_name: str = "default", clip_z: float = DEFAULT_CLIP_Z,
    block: int = DEFAULT_BLOCK, step: Callable[[], None] = lambda: None, settings: list[Setting] | None = None,
    engines: tuple[str, ...] = (),
) -> Quantization:
    """Every setting of the grid (or ``settings``) on ``lm``: perplexity on ``eval_text``, and the strongest massive
    dim's value at its birth and peak block on its probe. ``step`` is called after each setting."""
    started = time.perf_counter()
    plan = sweep_plan(lm, protect, eval_text, eval_source, grid_name, clip_z, block, settings)
    target, windows = plan.target, plan.windows
    masks = [massive_positions(lm, w, protect) for w in windows]
    probe_mask = massive_positions(lm, plan.probe, protect)

    def read() -> dict[int, float]:
        return read_coordinate(lm, plan.probe, plan.layers, target.probe_position, target.dim)

    base_values = read()
    # Weight settings are scored on the windows in padded batches (one pass per few windows); activation settings
    # mark each window's own massive tokens, so they go one window at a time.
    evaluation = Evaluation(lm, next_token_windows(windows))
    baseline = evaluation.baseline
    rows: list[QuantRow] = []
    notes: list[str] = []

    def add_row(setting: Setting, ppl: float, values: dict[int, float], share: float | None, began: float) -> None:
        rows.append(quant_row(plan, setting, ppl, baseline, values, base_values, share, time.perf_counter() - began))

    for group in siblings(plan.settings):
        first, began = group[0], time.perf_counter()
        if first.method == "activation":
            quant = ActivationQuant(lm, first.granularity == "token", first.variant == "massive in float")
            with quant.active():
                ppl, share = _windowed_perplexity(lm, windows, masks, quant)
                quant.keep = probe_mask
                add_row(first, ppl, read(), share, began)
        else:
            quantize, skip = weight_quantizer(first)
            with quantized_weights(lm, quantize, plan.held if first.variant != "plain" else [],
                                   clip_z if first.variant == "held out + clip" else None, skip) as done:
                add_row(first, evaluation.score(), read(), None, began)
                for setting in group[1:]:  # the "held out" sibling of the plain setting
                    began = time.perf_counter()
                    done.hold_out(plan.held)
                    add_row(setting, evaluation.score(), read(), None, began)
            if done.skipped and not any(first.fmt in n for n in notes):
                notes.append(skipped_note(first.fmt, len(done.skipped)))
        for _ in group:  # after the weights are restored
            step()
    found: list[EngineRow] = []
    for name in engines:
        found += engine_rows(lm, protect, name, evaluation.score, lambda: read()[target.born_at], baseline, base_values[target.born_at])
        step()
    return quantization_from(lm, plan, protect, baseline, base_values, masks, rows, notes, engines, found,
                             time.perf_counter() - started)


def siblings(settings: list[Setting]) -> list[list[Setting]]:
    """``settings`` in order, a weight setting's "held out" variant right after its plain one grouped with it: the
    plain setting's quantized weights serve the held-out one but for the matrices holding a super weight."""
    groups: list[list[Setting]] = []
    for setting in settings:
        after_plain = groups and len(groups[-1]) == 1 and groups[-1][0] == dataclasses.replace(setting, variant="plain")
        if setting.method != "activation" and setting.variant == "held out" and after_plain:
            groups[-1].append(setting)
        else:
            groups.append([setting])
    return groups


def _windowed_perplexity(
    lm: LoadedModel, windows: list[torch.Tensor], masks: list[torch.Tensor], quant: ActivationQuant
) -> tuple[float, float]:
    """perplexity() one window at a time, each with its own massive tokens marked, recombined token-weighted; and
    the massive tokens' share of the squared quantization error over the evaluation text."""
    scores = []
    for ids, keep in zip(windows, masks):
        quant.keep = keep
        scores.append(perplexity(lm, [ids]))
    return windowed(windows, scores), quant.share


def windowed(windows: list[torch.Tensor], scores: list[float]) -> float:
    """Each window's own perplexity ``scores`` recombined token-weighted: exp of the mean next-token NLL over all."""
    total = sum(math.log(ppl) * (ids.shape[1] - 1) if math.isfinite(ppl) else float("inf") for ids, ppl in zip(windows, scores))
    mean = total / sum(ids.shape[1] - 1 for ids in windows)
    return math.exp(mean) if mean < 700 else float("inf")


def weight_quantizer(setting: Setting) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], bool]]:
    if setting.method == "gguf":
        size = gguf_block_size(setting.fmt)
        return (lambda w: gguf_roundtrip(w, setting.fmt)), (lambda w: w.shape[-1] % size != 0)
    return (lambda w: rtn(w, setting.bits, setting.granularity, setting.block)), (lambda w: False)


def _variant_words(setting: Setting, clip_z: float) -> str:
    return f"held out + clip z {clip_z:g}" if setting.variant == "held out + clip" else setting.variant


def _kept(value: float, base: float) -> float:
    return value / base if base else float("nan")
