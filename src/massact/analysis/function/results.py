"""What the function stage finds: the attention sinks on the massive tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class SinkToken:
    """A position the attention pass treats as a sink token, with the dims that make it one and why."""

    text: int
    position: int
    token: str
    dims: list[int]
    reason: str



@dataclass(kw_only=True)
class SinkIntervention:
    """The sink measured again with the massive values replaced (``label``: zero or mean) at ``blocks``: per block the
    sink rate, the mean attention on the sink tokens, and whether a block that had a sink still has one (None where
    it had none)."""

    name: str
    label: str
    blocks: list[int]
    rate: list[float]
    share: list[float]
    survives: list[bool | None]



@dataclass(kw_only=True)
class AttentionSinks:
    """Per block and head: the attention probability the queries put on the sink tokens (``share``; later queries
    in a causal model, every query in an encoder), against what a uniform spread over the visible tokens would put
    there (``uniform``). ``rate``: per block, the sink rate of Gu et al. 2024, the share of (text, head) pairs whose
    ``share`` exceeds ``epsilon``; a block has a sink (``sink_layers``) when the rate is at least 50%.
    ``value_ratio``: mean |v| of the sink tokens' value vectors / median |v| of the others; ``output_share``: |sink
    part of the head output| / |head output| (sums over queries); ``noop_heads``: per block, heads with >= 50% of
    their attention on the sink and a value ratio under 0.5. ``interventions``: the same pass with the massive
    values replaced; ``dependence``: whether the sink needs them, in words."""

    texts: int
    share: list[list[float]]
    uniform: list[list[float]]
    sink_layers: list[int]
    first_sink_layer: int | None
    birth_layer: int | None
    summary: str
    epsilon: float = 0.3
    causal: bool = True
    rule: str = ""
    tokens: list[SinkToken] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    overall_rate: float | None = None
    value_ratio: list[list[float]] | None = None
    output_share: list[list[float]] | None = None
    noop_heads: list[int] = field(default_factory=list)
    values: str = ""
    interventions: list[SinkIntervention] = field(default_factory=list)
    dependence: str = ""
