"""Attention as the model computes it, read in one eager pass: each softmax block's attention probabilities, its
value vectors, where the family gates its attention output, each head's gate, and where an indexer picks the keys each
query sees (DeepSeek sparse attention), the keys it picked.

Only the eager implementation returns attention probabilities; transformers returns them for the softmax blocks only
(a hybrid's convolution or linear-attention blocks have none), in block order, so they are matched to the blocks the
adapter calls softmax attention (``softmax_layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..models.loading import LoadedModel


@contextmanager
def eager_attention(lm: LoadedModel) -> Iterator[None]:
    """Attention probabilities exist only in the eager implementation: switch to it for this pass alone."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def softmax_layers(lm: LoadedModel) -> list[int]:
    """The blocks whose token mixer is softmax attention (every block but a hybrid's convolutions and linear
    attentions)."""
    return [layer for layer in range(len(lm.adapter.blocks(lm.model))) if lm.at(layer).mixer == "attention"]


@dataclass
class AttentionPass:
    """One eager pass, by block: ``maps`` the attention probabilities [batch, heads, queries, keys] of every softmax
    block; ``values`` each query head's value vectors [batch, positions, heads, head_dim] where the family's are read;
    ``gates`` each head's mean output gate sigmoid(gate) [batch, positions, heads] where the family gates attention;
    ``selected`` where a block's indexer picks its keys: [batch, queries, keys], True at the keys it picked (the only
    keys the query attends to)."""

    maps: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    gates: dict[int, torch.Tensor]
    selected: dict[int, torch.Tensor] = field(default_factory=dict)


def _picked(indices: torch.Tensor, keys: int) -> torch.Tensor:
    """An indexer's top-k key positions [batch, queries, k] as a mask [batch, queries, keys], True where picked."""
    mask = torch.zeros(*indices.shape[:2], keys, dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, indices.long(), True)


@contextmanager
def _reading(lm: LoadedModel, layers: list[int], found: AttentionPass, maps: bool = False) -> Iterator[None]:
    """While open, each pass through the ``layers`` fills ``found``: the value vectors, gates and indexer picks where
    the family has them, and with ``maps`` the attention probabilities, read at the module transformers records them
    from (``_can_record_outputs["attentions"]``)."""
    config = lm.config
    handles = []
    # declared on the model, or only on its base model (Qwen4-exp's text model under its causal LM)
    records = getattr(lm.model, "_can_record_outputs", None) or getattr(lm.adapter.base(lm.model), "_can_record_outputs", None)
    recorded = (records or {}).get("attentions")
    if isinstance(recorded, type):  # a bare class: transformers reads the probabilities at its output's index 1
        target, index = recorded, 1
    else:
        target, index = getattr(recorded, "target_class", None), getattr(recorded, "index", 1)
    for layer in layers:
        here = lm.at(layer)
        if here.values is not None:
            module = lm.adapter.module(lm.model, layer, here.values.path)
            handles.append(module.register_forward_hook(
                lambda m, args, output, layer=layer, cut=here.values: found.values.__setitem__(layer, cut.take(output.detach(), config))))
        if here.gate is not None:
            module = lm.adapter.module(lm.model, layer, here.gate.path)
            handles.append(module.register_forward_hook(
                lambda m, args, output, layer=layer, cut=here.gate:
                    found.gates.__setitem__(layer, torch.sigmoid(cut.take(output.detach(), config).float()).mean(-1))))
        if here.indexer is not None:
            module = lm.adapter.module(lm.model, layer, here.indexer)
            # no cache: the keys are the text's own positions, as many as the queries
            handles.append(module.register_forward_hook(
                lambda m, args, output, layer=layer: found.selected.__setitem__(layer, _picked(output.detach(), output.shape[-2]))))
        if maps:
            if target is None:
                raise RuntimeError(f"{type(lm.model).__name__} records no attention probabilities")
            block = lm.adapter.blocks(lm.model)[layer]
            for module in (m for m in block.modules() if isinstance(m, target)):
                handles.append(module.register_forward_hook(
                    lambda m, args, output, layer=layer: found.maps.__setitem__(layer, output[index].detach())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_query_head(found: AttentionPass, heads: int) -> AttentionPass:
    """Grouped-query attention: each query head gets its key/value head's values ([batch, positions, kv, head_dim]
    -> [batch, positions, query heads, head_dim])."""
    for layer, grouped in found.values.items():
        found.values[layer] = grouped.repeat_interleave(heads // grouped.shape[2], dim=2)
    return found


@torch.no_grad()
def attention_pass(
    lm: LoadedModel, input_ids: torch.Tensor, context: Callable[[], AbstractContextManager] = nullcontext,
    attention_mask: torch.Tensor | None = None,
) -> AttentionPass:
    """One forward pass over ``input_ids`` [batch, positions] with eager attention (under ``context``, e.g. an
    intervention). With right padding (``attention_mask``) each text's rows and columns up to its length are what it
    gives alone. Grouped-query attention: each query head gets its key/value head's values."""
    layers = softmax_layers(lm)
    found = AttentionPass(maps={}, values={}, gates={})
    mask = None if attention_mask is None else attention_mask.to(lm.device)
    with _reading(lm, layers, found), eager_attention(lm), context():
        maps = lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask, output_attentions=True, use_cache=False).attentions
    if len(maps) != len(layers):
        raise RuntimeError(f"{len(maps)} attention maps for the {len(layers)} softmax blocks {layers}: the adapter's mixers are wrong")
    found.maps = dict(zip(layers, maps))
    return _per_query_head(found, lm.config.num_attention_heads)


@contextmanager
def block_attention(lm: LoadedModel, layer: int, keep: Callable[[AttentionPass], None]) -> Iterator[None]:
    """While open, each pass through softmax block ``layer`` (eager attention, as a streamed model runs) calls
    ``keep`` with that block's ``AttentionPass`` (its maps, values, gates and indexer picks, as ``attention_pass``
    gives them), once the block is done."""
    found = AttentionPass(maps={}, values={}, gates={})

    def done(module, args, output) -> None:
        keep(_per_query_head(found, lm.config.num_attention_heads))
        found.maps, found.values, found.gates, found.selected = {}, {}, {}, {}

    handle = lm.adapter.blocks(lm.model)[layer].register_forward_hook(done)
    try:
        with _reading(lm, [layer], found, maps=True):
            yield
    finally:
        handle.remove()
