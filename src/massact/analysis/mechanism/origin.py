"""The origin section: which sublayer writes (or removes) a massive activation, and for attention, which heads."""

from __future__ import annotations

import torch

from ...models.adapters.base import bias_of
from ...models.loading import LoadedModel
from ...settings import Criterion
from .results import HeadShare


def writer(direction: float, attn: float | None, mlp: float | None, ple: float | None = None) -> str:
    """The branch that made the change: the one pushing hardest in ``direction`` (+1 or -1): toward the value's sign
    where it is written, against it where it is erased. A block of one sublayer (the other None) has only that one;
    ``ple``: a per-layer input's branch, where the block has one (a tie goes to the earlier branch)."""
    branches = {name: value for name, value in (("attn", attn), ("mlp", mlp), ("ple", ple)) if value is not None}
    return max(branches, key=lambda name: branches[name] * direction)


def removal_cause(value: float, previous_median: float, criterion: Criterion) -> str:
    """Did the value fall ("value"), or would it still be massive against the previous block's median ("median")?"""
    return "median" if criterion.is_massive(value, previous_median) else "value"


def decomposition_gap(resid_in: float, attn: float | None, mlp: float | None, resid_out: float, ple: float = 0.0,
                      scale: float = 1.0) -> float:
    """|scale x (resid_in + attn + mlp + ple) - resid_out| relative to the largest term: 0 when the adapter maps the
    block right (a branch the block lacks, None, counts nothing; ``ple``: a per-layer input's branch; ``scale``: the
    block's output scale, 1 without one)."""
    terms = [resid_in, *(term for term in (attn, mlp) if term is not None), ple]
    largest = max(*map(abs, terms), abs(resid_out), 1e-12)
    return abs(scale * sum(terms) - resid_out) / largest


def head_split(lm: LoadedModel, layer: int, z: torch.Tensor, dim: int) -> list[HeadShare]:
    """attn_out[dim] = sum over heads h of W_O[dim, h-slice] . z[h-slice] (+ bias), largest |contribution| first.
    Where attn_out is a sum of the attention and other mixers (``Adapter.mixer_parts``), the heads split the
    attention's part alone (its output times its factor), and the shares are of that part."""
    here = lm.at(layer)
    o_proj = lm.adapter.module(lm.model, layer, here.attn_proj)
    factor = here.part_factor(lm.config, "attn_out", here.attention)
    row = factor * lm.adapter.weight_out_in(o_proj)[dim].detach().double().cpu()
    n_heads = lm.config.num_attention_heads
    per_head = (row * z.double()).view(n_heads, -1).sum(dim=1)
    bias = bias_of(o_proj)
    total = float(per_head.sum()) + (factor * float(bias[dim]) if bias is not None else 0.0)
    order = per_head.abs().argsort(descending=True).tolist()
    return [HeadShare(head=h, contribution=float(per_head[h]), share=float(per_head[h]) / total if total else float("nan")) for h in order]
