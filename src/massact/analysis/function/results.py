"""What the function stage finds: the attention sinks on the massive tokens, and the compression valley."""

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
    values replaced; ``dependence``: whether the sink needs them, in words.

    Blocks that do not mix tokens by softmax attention (a hybrid's convolutions and linear attentions) have no
    attention probabilities: their rows are null, and ``softmax_layers`` lists the blocks that do (empty when every
    block does). ``positions``: per block, whether its mixer sees positions (empty when every block does; a NoPE
    block does not). Where the family gates attention (out = attention x sigmoid(gate), per head): ``gate_sink`` and
    ``gate_other``, per block and head, the mean gate at the sink tokens and at the other tokens. Where it has a
    learned sink logit per head: ``learned_sink``, the attention mass it takes, and ``first_token``, the mass on the
    first token, beside it. Where an indexer picks the keys each query attends to (DeepSeek sparse attention; the
    probabilities above are then over the picked keys): ``indexer_selected``, per block, the share of the (query, sink
    token) pairs, over the queries that can see a sink token, where the indexer picked the sink token (null at blocks
    without an indexer). ``mixing``: what these say, in words."""

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
    softmax_layers: list[int] = field(default_factory=list)
    positions: list[bool] = field(default_factory=list)
    gate_sink: list[list[float]] | None = None
    gate_other: list[list[float]] | None = None
    learned_sink: list[list[float]] | None = None
    first_token: list[list[float]] | None = None
    indexer_selected: list[float] | None = None
    mixing: str = ""


@dataclass(kw_only=True)
class CompressionValley:
    """The compression valley (Queipo-de-Llano et al. 2025) on a few kept ``texts`` (window indices): per block, the
    means over the texts of what ``analysis.function.valley`` measures on the block's output (the detection stream, raw
    values, rows not centered):

    - ``entropy``: the matrix-based entropy of the token representations, the Shannon entropy (Renyi order 1) of the
      eigenvalues of X X^T / tr(X X^T), over log(positions): 0 where one direction holds every token, 1 where the
      tokens are orthogonal and of one norm; ``entropy_without``: the same without the rows that carry a massive
      activation at that block (NaN where fewer than 2 rows remain in every text);
    - ``first_share``: the first token's share of the squared Frobenius norm, ||x_0||^2 / ||X||_F^2;
      ``first_share_without``: its share among the rows without a massive activation (NaN where it carries one in
      every text);
    - ``massive_tokens``: the rows (over the texts) where the scan's criterion calls some dim massive;
      ``massive_share``: their share of ||X||_F^2.

    The valley: ``valley``, the block of the lowest entropy (``valley_depth``: over the last block), ``drop``, the highest
    entropy at or before it minus its own; the same for the curve without the massive tokens (``valley_without``,
    ``valley_without_depth``, ``drop_without``; None where that curve has no value); ``gap``, the entropy without the
    massive tokens minus with them at the valley. ``birth``: the birth block of the strongest massive dim (None where
    nothing is massive), ``from_birth`` = valley - birth. Across blocks, the Pearson correlation of the entropy with
    the first token's share (``first_share_correlation``) and with the sink rate (``sink_rate_correlation``, where the
    sink section measured one); None for fewer than 3 blocks or a constant curve. ``summary``: what they say, in
    words."""

    texts: list[int]
    entropy: list[float]
    entropy_without: list[float]
    first_share: list[float]
    first_share_without: list[float]
    massive_tokens: list[int]
    massive_share: list[float]
    valley: int | None
    valley_depth: float | None
    drop: float | None
    valley_without: int | None
    valley_without_depth: float | None
    drop_without: float | None
    gap: float
    birth: int | None
    from_birth: int | None
    first_share_correlation: float | None
    sink_rate_correlation: float | None
    summary: str


# Jin et al. 2025's lambda: a query or key dim is massive where its L2 norm over the tokens is >= 5 x its head's mean.
QK_THRESHOLD = 5.0


@dataclass(kw_only=True)
class QkHeads:
    """One of a block's queries, keys or values, per head (keys and values per key/value head). With M_d the L2 norm
    over the measured tokens of a head's dim d: ``share``, the share of the head's sum of M_d^2 held by its ``top``
    largest dims (scale-free; a spread over every dim gives top / head_dim); ``ratio``, max M_d / mean M_d; ``dims``,
    the head's massive dims (M_d at least the threshold x mean M_d, Jin et al. 2025), largest first; for each of them
    ``pairs``, its rotary pair (the index of its frequency in the rotary embedding's inv_freq; None where the dim is
    not turned) and ``bands``, that pair's frequency band ("high", "mid", "low"; "" where not turned)."""

    share: list[float]
    ratio: list[float]
    dims: list[list[int]]
    pairs: list[list[int | None]] = field(default_factory=list)
    bands: list[list[str]] = field(default_factory=list)


@dataclass(kw_only=True)
class QkBlock:
    """One block: ``kind`` (RoPE, partial RoPE, learned, NoPE, latent, not read, linear, conv, ssm, none) and ``note``
    (why it is not measured); where its queries and keys are read: ``head_dim``, ``rotary_dims`` (how many of a head's
    dims the rotary positions turn: 0 without them) and the three ``QkHeads``."""

    layer: int
    kind: str
    note: str = ""
    head_dim: int = 0
    rotary_dims: int = 0
    queries: QkHeads | None = None
    keys: QkHeads | None = None
    values: QkHeads | None = None


@dataclass(kw_only=True)
class QkScore:
    """The model scored under one condition: ``perplexity`` on the evaluation text, and over the passkey trials the
    mean log-probability of the hidden number's tokens (``passkey_logprob``, summed over its tokens) and the share of
    trials whose greedy continuation is the number (``passkey_match``)."""

    label: str
    perplexity: float
    passkey_logprob: float
    passkey_match: float


@dataclass(kw_only=True)
class QkDisruption:
    """Jin et al.'s disruption test: the massive Q/K dims zeroed in the queries and keys at every position
    (``massive``), against as many other dims of the same heads (``control``, drawn with ``seed``), beside the model
    as it is (``base``). ``zeroed``: the (head, dim) entries zeroed, over the ``blocks``; ``trials`` passkey prompts of
    up to ``passkey_tokens`` tokens, perplexity over ``tokens`` tokens of the evaluation text."""

    blocks: list[int]
    zeroed: int
    seed: int
    trials: int
    passkey_tokens: int
    tokens: int
    base: QkScore
    massive: QkScore
    control: QkScore
    summary: str


@dataclass(kw_only=True)
class QkValues:
    """Massive values in the queries and keys (Jin et al. 2025), per block (``blocks``: every block, each with its
    kind) over ``texts`` texts and ``tokens`` tokens; ``top`` and ``threshold`` as ``QkHeads`` uses them; ``rule``: how
    the frequency bands are cut, in words; ``summary``: what they say. ``disruption``: the test, where the scan was
    verified and some dim is massive."""

    texts: int
    tokens: int
    top: int
    threshold: float
    rule: str
    blocks: list[QkBlock]
    summary: str
    disruption: QkDisruption | None = None
