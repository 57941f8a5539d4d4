"""Attention sinks: how much attention later queries put on the tokens that carry massive activations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..models.loading import LoadedModel
from .results import AttentionSinks

SINK_SHARE = 0.5  # a block "has a sink" when its heads, on average, put at least half their attention there


@contextmanager
def eager_attention(lm: LoadedModel) -> Iterator[None]:
    """Attention probabilities exist only in the eager implementation: switch to it for this pass alone."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def sink_share(attention: torch.Tensor, sinks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """attention: [heads, queries, keys] (causal). Mean over queries after the first sink of the probability put on
    the sink positions, and the share a uniform spread over the visible keys would give. Both [heads]."""
    first = min(sinks)
    queries = torch.arange(first + 1, attention.shape[1], device=attention.device)
    if len(queries) == 0:
        empty = torch.full((attention.shape[0],), float("nan"))
        return empty, empty
    sink_index = torch.tensor(sinks, device=attention.device)
    mass = attention[:, queries][:, :, sink_index]  # [heads, queries, sinks]
    visible = sink_index.unsqueeze(0) <= queries.unsqueeze(1)  # [queries, sinks]
    share = (mass * visible).sum(-1).mean(-1)
    uniform = (visible.sum(-1).float() / (queries + 1).float()).mean()
    return share.float().cpu(), uniform.expand(attention.shape[0]).float().cpu()


@torch.no_grad()
def attention_sinks(lm: LoadedModel, inputs: list[torch.Tensor], sinks: dict[int, list[int]], birth: int | None) -> AttentionSinks:
    """Average per block and head over the texts that have massive tokens (``sinks``: text -> positions)."""
    totals, uniforms, counted = None, None, 0
    with eager_attention(lm):
        for text, positions in sinks.items():
            attentions = lm.model(input_ids=inputs[text].to(lm.device), output_attentions=True, use_cache=False).attentions
            pairs = [sink_share(a[0].float(), positions) for a in attentions]
            share = torch.stack([p[0] for p in pairs])
            if torch.isnan(share).any():
                continue
            uniform = torch.stack([p[1] for p in pairs])
            totals = share if totals is None else totals + share
            uniforms = uniform if uniforms is None else uniforms + uniform
            counted += 1
    if not counted:
        return AttentionSinks(0, [], [], [], None, birth, "no text has a massive token with later tokens to attend to it")
    share, uniform = totals / counted, uniforms / counted
    per_layer = share.mean(dim=1)
    sink_layers = [layer for layer, value in enumerate(per_layer.tolist()) if value >= SINK_SHARE]
    first = sink_layers[0] if sink_layers else None
    if first is None:
        summary = f"no block's heads put {SINK_SHARE:.0%} of their attention on the massive tokens on average"
    else:
        timing = ""
        if birth is not None:
            timing = (
                "right after the birth block" if first == birth + 1
                else f"{first - birth} blocks after the birth block {birth}" if first > birth
                else f"before the birth block {birth}: the sink does not wait for the massive activation"
            )
        summary = (
            f"the sink forms at block {first} ({timing}); {len(sink_layers)} of {len(per_layer)} blocks put on average "
            f">= {SINK_SHARE:.0%} of their attention on the massive tokens, against a uniform share of "
            f"{float(uniform.mean()):.1%}"
        )
    return AttentionSinks(counted, share.tolist(), uniform.tolist(), sink_layers, first, birth, summary)
