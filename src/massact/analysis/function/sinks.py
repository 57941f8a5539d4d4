"""Attention sinks measured the standard way: how much attention the heads put on the tokens that carry the massive
activations, the sink rate of Gu et al. 2024, the sink tokens' value vectors and the share of each head's output
they give (no-op heads, Bondarenko et al. 2023), and whether the sink survives when the massive values are replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ...models.loading import LoadedModel
from ...capture.edits import replace_massive
from ..detect.scan import pad_batch
from .results import AttentionSinks, SinkIntervention, SinkToken
from ..results import Report

SINK_SHARE = 0.5  # a block "has a sink" when at least half of its heads are sink heads (sink rate >= 50%)
SINK_EPSILON = 0.3  # Gu et al. 2024: a head is a sink head when its average attention on the token exceeds this
NOOP_ATTENTION = 0.5  # a no-op head puts at least half its attention on the sink ...
NOOP_VALUE = 0.5  # ... whose value vectors are under half the median value norm of the other tokens
SINK_TEXTS = 64  # texts in each attention pass
SINK_BATCH = 8  # of those texts per forward pass


@contextmanager
def eager_attention(lm: LoadedModel) -> Iterator[None]:
    """Attention probabilities exist only in the eager implementation: switch to it for this pass alone."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


# Where each family's value vectors are: the projection (path in the block) and how to cut the values out of its
# output, given (output, query heads, key/value heads). GPT-NeoX and Falcon interleave q, k, v per head in one fused
# projection whose layout depends on the config: not covered.
_VALUES: dict[str, tuple[str, Callable[[torch.Tensor, int, int], torch.Tensor]]] = {
    "GPT-2": ("attn.c_attn", lambda t, heads, kv: t.chunk(3, dim=-1)[2]),  # fused q | k | v
    "Llama": ("self_attn.v_proj", lambda t, heads, kv: t),
    "Gemma-2/3": ("self_attn.v_proj", lambda t, heads, kv: t),
    "Mixtral/Qwen-MoE": ("self_attn.v_proj", lambda t, heads, kv: t),
    "Phi-2": ("self_attn.v_proj", lambda t, heads, kv: t),
    "Phi-3": ("self_attn.qkv_proj", lambda t, heads, kv: t[..., -kv * (t.shape[-1] // (heads + 2 * kv)):]),  # q | k | v
    "GPT-J": ("attn.v_proj", lambda t, heads, kv: t),
    "OPT": ("self_attn.v_proj", lambda t, heads, kv: t),
    "BERT": ("attention.self.value", lambda t, heads, kv: t),
}


def value_source(lm: LoadedModel) -> str | None:
    """The module path (in each block) the value vectors are read from, or None where the family is not covered."""
    entry = _VALUES.get(lm.adapter.family)
    return entry[0] if entry else None


def sink_tokens(report: Report) -> tuple[list[SinkToken], str]:
    """The positions that carry a massive dim persistently, per text, and the rule in words.

    A position is a sink candidate in a text when its dim is massive there in at least half of the blocks where that
    dim is massive at all. Blocks where the dim is massive at more than half of the text's positions do not count
    for that text: they mark no token in particular (a dim that crosses the threshold everywhere in one or two blocks
    must not make every position a sink). Each dim's main carrier, the (text, position) of its largest |value|, is
    always included.
    """
    blocks: dict[int, set[int]] = {}
    marked: dict[tuple[int, int, int], set[int]] = {}  # (dim, text, block) -> positions
    for m in report.massive:
        blocks.setdefault(m.dim, set()).add(m.layer)
        marked.setdefault((m.dim, m.text, m.layer), set()).add(m.position)
    counts: dict[tuple[int, int, int], int] = {}  # (dim, text, position) -> selective blocks where it is massive
    for (dim, text, _), positions in marked.items():
        if len(positions) > len(report.tokens[text]) / 2:
            continue
        for position in positions:
            counts[dim, text, position] = counts.get((dim, text, position), 0) + 1
    reasons: dict[tuple[int, int], dict[int, str]] = {}  # (text, position) -> dim -> why
    for (dim, text, position), count in counts.items():
        if count >= len(blocks[dim]) / 2:
            reasons.setdefault((text, position), {})[dim] = f"dim {dim} massive in {count} of its {len(blocks[dim])} blocks"
    for dim in blocks:
        main = max((m for m in report.massive if m.dim == dim), key=lambda m: abs(m.value))
        reasons.setdefault((main.text, main.position), {})[dim] = f"main carrier of dim {dim} ({main.value:+,.1f} at block {main.layer})"
    tokens = [SinkToken(text=text, position=position, token=report.tokens[text][position], dims=sorted(why), reason="; ".join(why[d] for d in sorted(why)))
              for (text, position), why in sorted(reasons.items())]
    rule = ("a position counts as a sink token when its dim is massive there in at least half of the blocks where that dim "
            "is massive (blocks where the dim is massive at more than half of a text's positions do not count); each dim's "
            "main carrier (its largest |value|) always counts")
    return tokens, rule


def head_metrics(attention: torch.Tensor, values: torch.Tensor | None, sinks: list[int], causal: bool) -> dict[str, torch.Tensor]:
    """One block of one text. attention: [heads, queries, keys]; values: [positions, heads, head_dim] (each query
    head's value vectors) or None. Per head ([heads] each):

    - ``share``: attention probability on the sink tokens, averaged over the queries that see a sink (every query
      in an encoder; in a causal model those after the first sink, each counting the sinks it can see);
    - ``uniform``: the same for a uniform spread over the visible keys;
    - ``value_ratio``: mean |v| of the sink tokens / median |v| of the other tokens;
    - ``output_share``: sum over queries of |sink part of the head output| / sum of |head output|, where the head
      output is sum_k attention[q, k] v_k and its sink part the same sum over the sink tokens.
    Empty queries give NaN.
    """
    heads, n_queries, n_keys = attention.shape
    first = min(sinks)
    queries = torch.arange(first + 1 if causal else 0, n_queries, device=attention.device)
    nan = torch.full((heads,), float("nan"))
    if len(queries) == 0:
        return dict(share=nan, uniform=nan, value_ratio=nan, output_share=nan)
    sink_index = torch.tensor(sinks, device=attention.device)
    visible = sink_index.unsqueeze(0) <= queries.unsqueeze(1) if causal else torch.ones(len(queries), len(sinks), dtype=torch.bool, device=attention.device)
    mass = attention[:, queries][:, :, sink_index] * visible  # [heads, queries, sinks]
    seen = (queries + 1).float() if causal else torch.full((len(queries),), float(n_keys), device=attention.device)
    found = dict(share=mass.sum(-1).mean(-1).float().cpu(),
                 uniform=(visible.sum(-1).float() / seen).mean().expand(heads).float().cpu(),
                 value_ratio=nan, output_share=nan)
    if values is None:
        return found
    v = values.transpose(0, 1).float()  # [heads, positions, head_dim]
    norms = v.norm(dim=-1)
    others = torch.ones(n_keys, dtype=torch.bool, device=v.device)
    others[sink_index] = False
    if others.any():
        found["value_ratio"] = (norms[:, sink_index].mean(-1) / norms[:, others].median(dim=-1).values).cpu()
    rows = attention[:, queries].float()  # [heads, queries, keys]
    whole = rows @ v  # [heads, queries, head_dim]
    sink_part = mass.float() @ v[:, sink_index]
    found["output_share"] = (sink_part.norm(dim=-1).sum(-1) / whole.norm(dim=-1).sum(-1)).cpu()
    return found


@dataclass
class SinkPass:
    """Per block and head, averaged over the texts: the ``head_metrics``; ``rate``: per block, the share of (text,
    head) pairs whose ``share`` exceeds epsilon (the sink rate)."""

    texts: int
    share: torch.Tensor
    uniform: torch.Tensor
    rate: torch.Tensor
    value_ratio: torch.Tensor | None
    output_share: torch.Tensor | None


@torch.no_grad()
def attention_and_values(
    lm: LoadedModel, input_ids: torch.Tensor, context: Callable[[], AbstractContextManager] = nullcontext,
    attention_mask: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], dict[int, torch.Tensor]]:
    """One forward pass over ``input_ids`` [batch, positions] with eager attention (under ``context``, e.g. an
    intervention): every block's attention probabilities [batch, heads, queries, keys], and its value vectors
    [batch, positions, query heads, head_dim] read at the family's value projection (grouped-query attention: each
    query head gets its key/value head's values; empty where the family is not covered). With right padding
    (``attention_mask``) each text's rows and columns up to its length are what it gives alone."""
    source = _VALUES.get(lm.adapter.family)
    config = lm.model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    values: dict[int, torch.Tensor] = {}
    handles = []
    if source is not None:
        path, cut = source
        for layer in range(len(lm.adapter.blocks(lm.model))):
            module = lm.adapter.module(lm.model, layer, path)
            handles.append(module.register_forward_hook(
                lambda m, args, output, layer=layer: values.__setitem__(layer, cut(output.detach(), heads, kv))))
    mask = None if attention_mask is None else attention_mask.to(lm.device)
    try:
        with eager_attention(lm), context():
            attentions = lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask, output_attentions=True, use_cache=False).attentions
    finally:
        for handle in handles:
            handle.remove()
    for layer, flat in values.items():  # [batch, positions, kv x head_dim] -> [batch, positions, query heads, head_dim]
        values[layer] = flat.view(*flat.shape[:2], kv, -1).repeat_interleave(heads // kv, dim=2)
    return attentions, values


@torch.no_grad()
def sink_pass(
    lm: LoadedModel, inputs: dict[int, torch.Tensor], sinks: dict[int, list[int]], epsilon: float,
    context: Callable[[torch.Tensor | None], AbstractContextManager] = lambda valid: nullcontext(),
) -> SinkPass | None:
    """The ``head_metrics`` of every block over the texts (``sinks``: text -> its sink positions), SINK_BATCH texts
    per forward pass (``context(attention mask)``: the intervention for one such pass). None when no text has a
    query that sees a sink."""
    causal = not lm.adapter.encoder
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    above, counted = None, 0
    texts = list(sinks)
    for start in range(0, len(texts), SINK_BATCH):
        group = texts[start:start + SINK_BATCH]
        ids, mask = pad_batch([inputs[text] for text in group])
        valid = mask if len(group) > 1 else None
        attentions, values = attention_and_values(lm, ids, lambda: context(valid), valid)
        for row, text in enumerate(group):
            n = inputs[text].shape[1]
            metrics = [head_metrics(attention[row, :, :n, :n], values[layer][row, :n] if layer in values else None, sinks[text], causal)
                       for layer, attention in enumerate(attentions)]
            share = torch.stack([m["share"] for m in metrics])
            if torch.isnan(share).any():
                continue
            counted += 1
            above = (share > epsilon).float() if above is None else above + (share > epsilon).float()
            for key in ("share", "uniform", "value_ratio", "output_share"):
                stacked = torch.stack([m[key] for m in metrics])
                ok = ~torch.isnan(stacked)
                sums[key] = sums.get(key, 0) + torch.where(ok, stacked, 0.0)
                counts[key] = counts.get(key, 0) + ok.float()
    if not counted:
        return None
    mean = {key: sums[key] / counts[key] for key in sums}  # NaN where no text gave a value
    has_values = bool((counts["value_ratio"] > 0).any())
    return SinkPass(counted, mean["share"], mean["uniform"], (above / counted).mean(dim=1),
                    mean["value_ratio"] if has_values else None, mean["output_share"] if has_values else None)


def sink_blocks(rate: torch.Tensor) -> list[int]:
    """Blocks where at least half of the heads are sink heads."""
    return [layer for layer, value in enumerate(rate.tolist()) if value >= SINK_SHARE]


def noop_heads(found: SinkPass) -> list[int]:
    """Per block, the heads with at least NOOP_ATTENTION of their attention on the sink tokens and a sink value
    vector under NOOP_VALUE x the median of the others: they attend to the sink and take little from it."""
    if found.value_ratio is None:
        return []
    noop = (found.share >= NOOP_ATTENTION) & (found.value_ratio < NOOP_VALUE)
    return noop.sum(dim=1).tolist()


def sink_analysis(
    lm: LoadedModel, report: Report, inputs: dict[int, torch.Tensor], epsilon: float = SINK_EPSILON,
    replacements: dict[str, dict[int, dict[int, float]]] | None = None,
) -> AttentionSinks:
    """The sink tokens, the sink metrics over (up to SINK_TEXTS of) their texts, and the same metrics with the
    massive activations replaced at their birth blocks (``replacements``: label -> block -> dim -> value)."""
    birth = min((d.born_at for d in report.dims), default=None)
    tokens, rule = sink_tokens(report)
    sinks: dict[int, list[int]] = {}
    for token in tokens:
        sinks.setdefault(token.text, []).append(token.position)
    sinks = dict(sorted(sinks.items())[:SINK_TEXTS])
    tokens = [t for t in tokens if t.text in sinks]
    causal = not lm.adapter.encoder
    source = value_source(lm)
    values = (f"value vectors read at each block's {source}" if source else
              f"value vectors of the {lm.adapter.family} family are not read (fused, interleaved q/k/v): no value norms or no-op heads")
    base = sink_pass(lm, inputs, sinks, epsilon)
    if base is None:
        return AttentionSinks(texts=0, share=[], uniform=[], sink_layers=[], first_sink_layer=None, birth_layer=birth, summary="no text has a massive token with later tokens to attend to it",
                              epsilon=epsilon, causal=causal, rule=rule, tokens=tokens, values=values)
    found_blocks = sink_blocks(base.rate)
    changed = []
    for label, by_block in (replacements or {}).items():
        def context(valid: torch.Tensor | None, by_block=by_block) -> AbstractContextManager:
            stack = ExitStack()
            for layer, dims in by_block.items():
                stack.enter_context(replace_massive(lm, layer, dims, report.criterion, valid))
            return stack

        under = sink_pass(lm, inputs, sinks, epsilon, context)
        if under is None:
            continue
        rate = under.rate.tolist()
        survives = [rate[layer] >= SINK_SHARE if layer in found_blocks else None for layer in range(len(rate))]
        dims = sorted({dim for by_dim in by_block.values() for dim in by_dim})
        changed.append(SinkIntervention(name=f"set massive dims {dims} to {label} at block(s) {sorted(by_block)}", label=label,
                                        blocks=sorted(by_block), rate=rate, share=under.share.mean(dim=1).tolist(), survives=survives))
    summary = _summary(base, found_blocks, birth, epsilon)
    return AttentionSinks(
        texts=base.texts, share=base.share.tolist(), uniform=base.uniform.tolist(), sink_layers=found_blocks, first_sink_layer=found_blocks[0] if found_blocks else None, birth_layer=birth,
        summary=summary, epsilon=epsilon, causal=causal, rule=rule, tokens=tokens, rate=base.rate.tolist(),
        overall_rate=float(base.rate.mean()),
        value_ratio=base.value_ratio.tolist() if base.value_ratio is not None else None,
        output_share=base.output_share.tolist() if base.output_share is not None else None,
        noop_heads=noop_heads(base), values=values, interventions=changed,
        dependence=dependence(found_blocks, birth, changed),
    )


def _summary(base: SinkPass, found_blocks: list[int], birth: int | None, epsilon: float) -> str:
    heads = base.share.shape[1]
    uniform = float(base.uniform.mean())
    if not found_blocks:
        return (f"no block has a sink: in no block do half of the heads put more than {epsilon:.0%} of their attention on the "
                f"sink tokens (overall sink rate {float(base.rate.mean()):.1%}; a uniform spread gives {uniform:.1%})")
    first = found_blocks[0]
    timing = ""
    if birth is not None:
        timing = (" (right after the birth block)" if first == birth + 1
                  else f" ({first - birth} blocks after the birth block {birth})" if first > birth
                  else " (at the birth block itself)" if first == birth
                  else f" ({birth - first} block{'s' if birth - first > 1 else ''} before the birth block {birth})")
    return (f"the sink forms at block {first}{timing}; {len(found_blocks)} of {len(base.rate)} blocks have a sink (at least half of "
            f"their {heads} heads put more than {epsilon:.0%} of their attention on the sink tokens); overall sink rate "
            f"{float(base.rate.mean()):.1%}, mean attention on the sink tokens {float(base.share.mean()):.1%} against a uniform "
            f"share of {uniform:.1%}")


def dependence(found_blocks: list[int], birth: int | None, changed: list[SinkIntervention]) -> str:
    """Does the sink need the massive activation? From the sink blocks after the birth block (those the replacement
    can reach) under the zero replacement, with the mean replacement beside it."""
    if not found_blocks or birth is None:
        return ""
    zero = next((c for c in changed if c.label == "zero"), None)
    if zero is None:
        return ""
    reached = [layer for layer in found_blocks if layer > birth]
    before = [layer for layer in found_blocks if layer <= birth]
    if not reached:
        return (f"the sink forms before it and does not need it: every sink block ({_spans(found_blocks)}) runs before the "
                f"massive activation is written at block {birth}")
    lost = [layer for layer in reached if not zero.survives[layer]]
    mean = next((c for c in changed if c.label == "mean"), None)
    kept_mean = f"; set to their mean, {sum(bool(mean.survives[l]) for l in reached)} of {len(reached)} keep it" if mean else ""
    counts = f"with the massive values set to zero, {len(lost)} of the {len(reached)} sink blocks after block {birth} lose their sink{kept_mean}"
    if 2 * len(lost) > len(reached):
        if before:
            return (f"the sink forms before the massive activation (block {before[0]}, birth at block {birth}), but after it the "
                    f"sink depends on the massive activation: {counts}")
        return f"the sink depends on the massive activation: {counts}"
    if before:
        return f"the sink forms before it and does not need it: it is there from block {before[0]}, and {counts}"
    return f"the sink does not need the massive activation: {counts}"


def _spans(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
