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
    A value that already overflowed (inf or nan in a float16 scan) counts as above the limit."""
    blocks, overflows = [], []
    for stats in layers:
        if not stats.top:
            continue
        top = stats.top[0]
        size = abs(top.value) if math.isfinite(top.value) else float("inf")
        blocks.append(BlockHeadroom(layer=stats.layer, max_abs=size, dim=top.dim, headroom=limit / size if size > 0 else float("inf"),
                                    overflows=not size <= limit))
        over: dict[int, float] = {}  # dim -> its largest value above the limit in this block (one entry per dim)
        for e in stats.top:
            if not abs(e.value) <= limit and (e.dim not in over or abs(e.value) > abs(over[e.dim])):
                over[e.dim] = e.value
        overflows += [[stats.layer, dim, value] for dim, value in over.items()]
    if not blocks:
        return Precision(float16_max=limit, blocks=[], overflows=[], largest=0.0, largest_layer=-1, largest_dim=-1, headroom=float("inf"),
                         bfloat16_step=float("nan"), float16_step=float("nan"), summary="no activations were scanned")
    worst = max(blocks, key=lambda b: b.max_abs)
    value = next(e.value for e in layers[worst.layer].top if e.dim == worst.dim)
    if overflows:
        layer, dim, big = overflows[0]
        shown = f"{abs(big):,.0f}" if math.isfinite(big) else "inf (it overflowed in this run)"
        summary = (f"this model cannot run in float16: dim {dim} at block {layer} reaches {shown}, above float16's "
                   f"{limit:,.0f}; {len({o[0] for o in overflows})} block(s) overflow; use bfloat16 or float32")
    else:
        summary = (f"float16 holds this model's activations on these texts: the largest, dim {worst.dim} at block {worst.layer} "
                   f"= {value:+,.1f}, is {worst.headroom:.2f}x below float16's {limit:,.0f}")
    step = rounding_step(value, torch.bfloat16)
    if math.isfinite(step):
        summary += (f"; at that value bfloat16's rounding step is {step:g} (float16's: "
                    f"{rounding_step(value, torch.float16):g})")
    return Precision(float16_max=limit, blocks=blocks, overflows=overflows, largest=abs(value), largest_layer=worst.layer,
                     largest_dim=worst.dim, headroom=worst.headroom, bfloat16_step=step,
                     float16_step=rounding_step(value, torch.float16), summary=summary)
