"""Precision headroom from a scan's layer statistics (no extra pass): can the model's activations be held in float16,
and how coarse is bfloat16 where the massive values sit?"""

from __future__ import annotations

import math

import torch

from ..detect.results import LayerStats
from .results import BlockHeadroom, Precision

FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65,504


def rounding_step(value: float, dtype: torch.dtype) -> float:
    """The gap between ``value`` and the next representable number of larger magnitude in ``dtype``:
    2^(floor(log2 |value|)) x eps (bfloat16: eps 2^-7, so 128 at 24,494; float16: eps 2^-10)."""
    size = abs(value)
    if size == 0 or not math.isfinite(size):
        return float("nan")
    info = torch.finfo(dtype)
    return 2.0 ** math.floor(math.log2(max(size, info.tiny))) * info.eps


def headroom(layers: list[LayerStats], limit: float = FLOAT16_MAX) -> Precision:
    """Per block, the largest |a| of its output against float16's largest finite value; the entries above it; the
    bfloat16 and float16 rounding steps at the largest value; and one sentence saying whether float16 can hold it.
    A value that already overflowed (inf in a float16 scan) counts as above the limit.

    A NaN is not a magnitude: it is neither the largest value nor above the limit. A block holding nothing but NaN
    among its largest entries has NaN for its largest |a| and headroom (and does not overflow); the sentence says
    where the NaN begin, and calls them an overflow's doing only where an inf comes at or before them."""
    blocks, overflows = [], []
    first_nan: tuple[int, int] | None = None  # (block, dim) of the first NaN entry
    first_inf: int | None = None  # the first block with an inf entry
    for stats in layers:
        if not stats.top:
            continue
        if first_nan is None:
            first_nan = next(((stats.layer, e.dim) for e in stats.top if math.isnan(e.value)), None)
        if first_inf is None and any(math.isinf(e.value) for e in stats.top):
            first_inf = stats.layer
        numbers = [e for e in stats.top if not math.isnan(e.value)]
        if not numbers:
            blocks.append(BlockHeadroom(layer=stats.layer, max_abs=float("nan"), dim=stats.top[0].dim, headroom=float("nan"),
                                        overflows=False))
            continue
        top = numbers[0]
        size = abs(top.value)
        blocks.append(BlockHeadroom(layer=stats.layer, max_abs=size, dim=top.dim, headroom=limit / size if size > 0 else float("inf"),
                                    overflows=size > limit))
        over: dict[int, float] = {}  # dim -> its largest value above the limit in this block (one entry per dim)
        for e in numbers:
            if abs(e.value) > limit and (e.dim not in over or abs(e.value) > abs(over[e.dim])):
                over[e.dim] = e.value
        overflows += [[stats.layer, dim, value] for dim, value in over.items()]
    measured = [b for b in blocks if not math.isnan(b.max_abs)]
    if not measured:
        summary = "no activations were scanned" if not blocks else _nan_sentence(first_nan, first_inf)
        return Precision(float16_max=limit, blocks=blocks, overflows=[], largest=0.0 if not blocks else float("nan"), largest_layer=-1,
                         largest_dim=-1, headroom=float("inf") if not blocks else float("nan"), bfloat16_step=float("nan"),
                         float16_step=float("nan"), summary=summary)
    worst = max(measured, key=lambda b: b.max_abs)
    value = next(e.value for e in layers[worst.layer].top if e.dim == worst.dim and not math.isnan(e.value))
    if overflows:
        layer, dim, big = overflows[0]
        shown = f"{abs(big):,.0f}" if math.isfinite(big) else "inf (it overflowed in this run)"
        summary = (f"this model cannot run in float16: dim {dim} at block {layer} reaches {shown}, above float16's "
                   f"{limit:,.0f}; {len({o[0] for o in overflows})} block(s) overflow; use bfloat16 or float32")
    else:
        summary = (f"float16 holds this model's activations on these texts: the largest, dim {worst.dim} at block {worst.layer} "
                   f"= {value:+,.1f}, is {worst.headroom:.2f}x below float16's {limit:,.0f}")
    if first_nan is not None and first_inf is not None and first_inf <= first_nan[0]:  # the NaN follow the overflow
        summary += "; " + _nan_sentence(first_nan, first_inf)
    elif first_nan is not None:  # the headroom above was measured on the values that are numbers: say so, and where the NaN are
        summary = _nan_sentence(first_nan, first_inf) + "; of the values that are numbers, " + summary.replace("this model", "the model")
    step = rounding_step(value, torch.bfloat16)
    if math.isfinite(step):
        summary += (f"; at that value bfloat16's rounding step is {step:g} (float16's: "
                    f"{rounding_step(value, torch.float16):g})")
    return Precision(float16_max=limit, blocks=blocks, overflows=overflows, largest=abs(value), largest_layer=worst.layer,
                     largest_dim=worst.dim, headroom=worst.headroom, bfloat16_step=step,
                     float16_step=rounding_step(value, torch.float16), summary=summary)


def _nan_sentence(first_nan: tuple[int, int] | None, first_inf: int | None) -> str:
    """Where the activations stop being numbers, and whether an overflow before them explains it."""
    if first_nan is None:
        return "no activation is a number"
    layer, dim = first_nan
    where = f"the activations hold NaN (not a number) from block {layer} on (first at dim {dim})"
    if first_inf is not None and first_inf <= layer:
        return f"{where}, after the overflow to inf at block {first_inf}"
    return f"{where}: no format holds a NaN and it is not a value beyond float16's range (the warnings say what made it)"
