"""What one block's attention heads are, for reading their queries and keys: the kind of mixer and of positions, the
modules that hold the queries, keys and values, and the rotary frequency of each rotated dim pair (``qk_layout``).

Rotary positions as transformers applies them (``rotate_half``): a head's first ``2 n`` dims are turned, dim ``d`` and
dim ``d + n`` as one pair at the angle ``position x inv_freq[d]`` (``d < n``); the dims after them (partial rotary:
Phi's ``partial_rotary_factor``) are not turned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .architecture import _rotary, rotary_share

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapters.base import Adapter, Cut

# The kinds of a block as the Q/K section names them: softmax attention with rotary positions over every head dim
# (RoPE) or over some (partial RoPE), with learned absolute positions, or with none (NoPE); softmax attention whose
# queries and keys are not read per head (latent attention, fused projections); the other token mixers; no mixer.
KINDS = ("RoPE", "partial RoPE", "learned", "NoPE", "latent", "not read", "linear", "conv", "ssm", "none")


@dataclass(frozen=True, kw_only=True)
class QkLayout:
    """One block's heads: ``kind`` (``KINDS``) and ``note`` (why a block is not read, in words); the paths in the block
    of the modules whose outputs hold the queries and keys (None where not read) and the value vectors' ``Cut``;
    ``frequencies``, the rotary ``inv_freq`` of each turned pair (None without rotary positions)."""

    kind: str
    note: str = ""
    queries: str | None = None
    keys: str | None = None
    values: Cut | None = None
    frequencies: torch.Tensor | None = None


def qk_layout(adapter: Adapter, model: nn.Module, layer: int) -> QkLayout:
    """The heads of block ``layer`` of ``model`` as its ``adapter`` declares them."""
    from .adapters.base import layer_types, text_config

    config = text_config(model)
    here = adapter.at(config, layer)
    if here.mixer is None:
        return QkLayout(kind="none", note="no token mixer: the block is its MLP alone")
    if here.mixer != "attention":
        words = {"linear": "linear attention", "conv": "short convolution", "ssm": "state-space scan"}[here.mixer]
        return QkLayout(kind=here.mixer, note=f"{words}: no softmax over query-key scores")
    paths = adapter.query_key_paths(model, layer)
    if paths is None:
        rope, nope = getattr(config, "qk_rope_head_dim", None), getattr(config, "qk_nope_head_dim", None)
        if rope and nope is not None:
            return QkLayout(kind="latent", note=f"latent attention: {rope} decoupled rope dims beside {nope} dims without positions "
                                                "per query head; its queries and keys are not read per head")
        return QkLayout(kind="not read", note=f"the {adapter.family} adapter does not read queries and keys per head")
    query, key = paths
    frequencies = rotary_frequencies(model, layer_types(config, layer)) if here.positions and _rotary(model) else None
    if frequencies is not None:
        kind = "RoPE" if rotary_share(config, layer) >= 1.0 else "partial RoPE"
    else:
        kind = "NoPE" if not here.positions or not _learned_positions(model) else "learned"
    return QkLayout(kind=kind, queries=query, keys=key, values=here.values, frequencies=frequencies)


def rotary_frequencies(model: nn.Module, layer_type: str) -> torch.Tensor | None:
    """The rotary embedding's ``inv_freq`` (one per turned pair) for blocks of ``layer_type`` (transformers keeps one
    buffer per layer type, ``<type>_inv_freq``, where the types differ), else its one ``inv_freq``."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            buffers = dict(module.named_buffers(recurse=False))
            found = buffers.get(f"{layer_type}_inv_freq", buffers.get("inv_freq"))
            if found is not None:
                return found.detach().float().cpu()
    return None


def _learned_positions(model: nn.Module) -> bool:
    from .adapters.base import text_config
    from .architecture import _learned

    return _learned(model, text_config(model))
