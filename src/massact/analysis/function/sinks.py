"""Attention sinks measured the standard way: how much attention the heads put on the tokens that carry the massive
activations, the sink rate of Gu et al. 2024, the sink tokens' value vectors and the share of each head's output
they give (no-op heads, Bondarenko et al. 2023), and whether the sink survives when the massive values are replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from ...capture.attention import AttentionPass, attention_pass, softmax_layers
from ...capture.batches import pad_batch
from ...capture.edits import replace_massive
from ...models.loading import LoadedModel
from ..detect.results import Findings, Massive
from .results import AttentionSinks, SinkIntervention, SinkToken

SINK_SHARE = 0.5  # a block "has a sink" when at least half of its heads are sink heads (sink rate >= 50%)
SINK_EPSILON = 0.3  # Gu et al. 2024: a head is a sink head when its average attention on the token exceeds this
NOOP_ATTENTION = 0.5  # a no-op head puts at least half its attention on the sink ...
NOOP_VALUE = 0.5  # ... whose value vectors are under half the median value norm of the other tokens
SINK_TEXTS = 64  # texts in each attention pass
SINK_BATCH = 8  # of those texts per forward pass


def sink_tokens(massive: list[Massive], tokens: dict[int, list[str]]) -> tuple[list[SinkToken], str]:
    """The positions that carry a massive dim persistently, per text (``massive``: the scan's massive entries;
    ``tokens``: its kept windows' tokens, by window index), and the rule in words.

    A position is a sink candidate in a text when its dim is massive there in at least half of the blocks where that
    dim is massive at all. Blocks where the dim is massive at more than half of the text's positions do not count
    for that text: they mark no token in particular (a dim that crosses the threshold everywhere in one or two blocks
    must not make every position a sink). Each dim's main carrier, the (text, position) of its largest |value|, is
    always included. Where no activation is massive, each text's first token is measured instead (where sinks form
    in most models): the sink is then measured without a massive activation.
    """
    if not massive:
        firsts = [SinkToken(text=text, position=0, token=tokens[text][0], dims=[], reason="first token") for text in sorted(tokens)]
        return firsts, "no activation is massive: each text's first token is measured as the sink token"
    blocks: dict[int, set[int]] = {}
    marked: dict[tuple[int, int, int], set[int]] = {}  # (dim, text, block) -> positions
    for m in massive:
        blocks.setdefault(m.dim, set()).add(m.layer)
        marked.setdefault((m.dim, m.text, m.layer), set()).add(m.position)
    counts: dict[tuple[int, int, int], int] = {}  # (dim, text, position) -> selective blocks where it is massive
    for (dim, text, _), positions in marked.items():
        if len(positions) > len(tokens[text]) / 2:
            continue
        for position in positions:
            counts[dim, text, position] = counts.get((dim, text, position), 0) + 1
    reasons: dict[tuple[int, int], dict[int, str]] = {}  # (text, position) -> dim -> why
    for (dim, text, position), count in counts.items():
        if count >= len(blocks[dim]) / 2:
            reasons.setdefault((text, position), {})[dim] = f"dim {dim} massive in {count} of its {len(blocks[dim])} blocks"
    for dim in blocks:
        main = max((m for m in massive if m.dim == dim), key=lambda m: abs(m.value))
        reasons.setdefault((main.text, main.position), {})[dim] = f"main carrier of dim {dim} ({main.value:+,.1f} at block {main.layer})"
    found = [SinkToken(text=text, position=position, token=tokens[text][position], dims=sorted(why),
                       reason="; ".join(why[d] for d in sorted(why))) for (text, position), why in sorted(reasons.items())]
    rule = ("a position counts as a sink token when its dim is massive there in at least half of the blocks where that dim "
            "is massive (blocks where the dim is massive at more than half of a text's positions do not count); each dim's "
            "main carrier (its largest |value|) always counts")
    return found, rule


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
    visible = (sink_index.unsqueeze(0) <= queries.unsqueeze(1) if causal
               else torch.ones(len(queries), len(sinks), dtype=torch.bool, device=attention.device))
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


def indexed_share(selected: torch.Tensor, sinks: list[int], causal: bool) -> float:
    """One block of one text: of the (query, sink token) pairs where the query can see the sink token (the queries
    ``head_metrics`` averages over), the share where the indexer picked the sink token among the query's keys
    (``selected``: [queries, keys], True at the picked keys). NaN without such a pair."""
    first = min(sinks)
    queries = torch.arange(first + 1 if causal else 0, selected.shape[0], device=selected.device)
    sink_index = torch.tensor(sinks, device=selected.device)
    visible = (sink_index.unsqueeze(0) <= queries.unsqueeze(1) if causal
               else torch.ones(len(queries), len(sinks), dtype=torch.bool, device=selected.device))
    if not bool(visible.any()):
        return float("nan")
    picked = selected[queries][:, sink_index] & visible
    return float(picked.sum() / visible.sum())


@dataclass
class SinkPass:
    """Per block and head, averaged over the texts: the ``head_metrics`` (NaN rows at blocks without softmax
    attention); ``rate``: per block, the share of (text, head) pairs whose ``share`` exceeds epsilon (the sink rate;
    NaN without softmax). Where the family has them: ``gate_sink`` and ``gate_other`` per block and head, the mean
    output gate sigmoid(gate) at the sink tokens and at the other tokens (NaN rows where a block has no gate);
    ``learned_sink``, the attention mass a learned sink logit takes (1 - the probabilities' sum over the tokens), and
    ``first_token``, the mass on position 0, beside it. ``indexed``: per block, the share of the (query, sink token)
    pairs where the block's indexer picked the sink token (NaN at blocks without one; None where no block has one)."""

    texts: int
    share: torch.Tensor
    uniform: torch.Tensor
    rate: torch.Tensor
    value_ratio: torch.Tensor | None
    output_share: torch.Tensor | None
    gate_sink: torch.Tensor | None = None
    gate_other: torch.Tensor | None = None
    learned_sink: torch.Tensor | None = None
    first_token: torch.Tensor | None = None
    indexed: torch.Tensor | None = None


class _Means:
    """Sums and counts of [blocks, heads] values over texts, NaN entries left out: the mean, NaN where none came."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, key: str, values: torch.Tensor) -> None:
        ok = ~torch.isnan(values)
        self.sums[key] = self.sums.get(key, 0) + torch.where(ok, values, 0.0)
        self.counts[key] = self.counts.get(key, 0) + ok.float()

    def mean(self, key: str) -> torch.Tensor | None:
        """The mean, or None when no text gave a value anywhere."""
        if key not in self.counts or not bool((self.counts[key] > 0).any()):
            return None
        return self.sums[key] / self.counts[key]


def _gate_means(gate: torch.Tensor, sinks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the mean gate [positions, heads] at the sink positions and at the other positions."""
    others = torch.ones(len(gate), dtype=torch.bool, device=gate.device)
    others[sinks] = False
    nan = torch.full((gate.shape[1],), float("nan"))
    return gate[sinks].mean(0).cpu(), gate[others].mean(0).cpu() if others.any() else nan


def text_metrics(found: AttentionPass, layer: int, row: int, n: int, sinks: list[int], causal: bool,
                 learned: bool) -> dict[str, torch.Tensor | float]:
    """One softmax block of one text of a batch (row ``row``, its first ``n`` positions real; ``sinks``: its sink
    positions): the ``head_metrics``, and where the family has them, the mean output gate at the sink and at the
    other tokens (``gate_sink``, ``gate_other``), the learned sink's mass and the first token's beside it, and the
    share of the (query, sink token) pairs its indexer picked (``indexed``)."""
    maps = found.maps[layer][row, :, :n, :n]
    metrics: dict[str, torch.Tensor | float] = dict(head_metrics(maps, found.values[layer][row, :n] if layer in found.values else None,
                                                                 sinks, causal))
    if layer in found.gates:
        metrics["gate_sink"], metrics["gate_other"] = _gate_means(found.gates[layer][row, :n], sinks)
    if learned:  # each query's probabilities sum to 1 minus what the learned sink took
        probabilities = maps.float()
        metrics["learned_sink"] = 1 - probabilities.sum(-1).mean(-1)
        metrics["first_token"] = probabilities[:, 1:, 0].mean(-1)
    if layer in found.selected:
        metrics["indexed"] = indexed_share(found.selected[layer][row, :n, :n], sinks, causal)
    return metrics


class SinkSums:
    """The texts' ``text_metrics`` summed into a ``SinkPass``: ``add`` one text's (softmax block -> metrics), in the
    texts' order; a text with a block where no query sees a sink is left out."""

    def __init__(self, lm: LoadedModel, epsilon: float):
        self.n_layers, self.heads = len(lm.adapter.blocks(lm.model)), lm.config.num_attention_heads
        self.softmax = softmax_layers(lm)
        self.epsilon = epsilon
        self.means = _Means()
        self.above: torch.Tensor | None = None
        self.counted = 0

    def _per_block(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        out = torch.full((self.n_layers, self.heads), float("nan"))
        for layer, row in rows.items():
            out[layer] = row.float().cpu() if isinstance(row, torch.Tensor) else row
        return out

    def add(self, metrics: dict[int, dict[str, torch.Tensor | float]]) -> None:
        share = self._per_block({layer: m["share"] for layer, m in metrics.items()})
        if torch.isnan(share[self.softmax]).any():
            return
        self.counted += 1
        above = (share > self.epsilon).float()
        self.above = above if self.above is None else self.above + above
        for key in ("share", "uniform", "value_ratio", "output_share"):
            self.means.add(key, self._per_block({layer: m[key] for layer, m in metrics.items()}))
        for key in ("gate_sink", "gate_other", "learned_sink", "first_token"):
            present = {layer: m[key] for layer, m in metrics.items() if key in m}
            if present:
                self.means.add(key, self._per_block(present))
        indexed = {layer: m["indexed"] for layer, m in metrics.items() if "indexed" in m}
        if indexed:
            picked = torch.full((self.n_layers,), float("nan"))
            for layer, value in indexed.items():
                picked[layer] = value
            self.means.add("indexed", picked)

    def result(self) -> SinkPass | None:
        """The pass; None when no text had a query that sees a sink."""
        if not self.counted:
            return None
        rate = (self.above / self.counted).mean(dim=1)
        rate[[layer for layer in range(self.n_layers) if layer not in self.softmax]] = float("nan")
        mean = self.means.mean
        return SinkPass(self.counted, mean("share"), mean("uniform"), rate, mean("value_ratio"), mean("output_share"),
                        mean("gate_sink"), mean("gate_other"), mean("learned_sink"), mean("first_token"), mean("indexed"))


def sink_groups(sinks: dict[int, list[int]]) -> list[list[int]]:
    """The sink texts (text -> its sink positions) in the batches of SINK_BATCH texts a pass reads them in."""
    texts = list(sinks)
    return [texts[start:start + SINK_BATCH] for start in range(0, len(texts), SINK_BATCH)]


@torch.no_grad()
def sink_pass(
    lm: LoadedModel, inputs: dict[int, torch.Tensor], sinks: dict[int, list[int]], epsilon: float,
    context: Callable[[torch.Tensor | None], AbstractContextManager] = lambda valid: nullcontext(),
) -> SinkPass | None:
    """The ``head_metrics`` of every softmax block over the texts (``sinks``: text -> its sink positions), SINK_BATCH
    texts per forward pass (``context(attention mask)``: the intervention for one such pass), and the gates and
    learned sinks where the family has them. None when no text has a query that sees a sink."""
    causal = not lm.adapter.encoder
    softmax = softmax_layers(lm)
    learned = any(lm.at(layer).sinks for layer in softmax)
    sums = SinkSums(lm, epsilon)
    for group in sink_groups(sinks):
        ids, mask = pad_batch([inputs[text] for text in group])
        valid = mask if len(group) > 1 else None
        found = attention_pass(lm, ids, lambda valid=valid: context(valid), valid)
        for row, text in enumerate(group):
            n = inputs[text].shape[1]
            sums.add({layer: text_metrics(found, layer, row, n, sinks[text], causal, learned) for layer in softmax})
    return sums.result()


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
    lm: LoadedModel, inputs: dict[int, torch.Tensor], findings: Findings, epsilon: float = SINK_EPSILON,
    replacements: dict[str, dict[int, dict[int, float]]] | None = None,
) -> AttentionSinks:
    """The sink tokens (``sink_tokens`` of the scan's massive entries and tokens in ``findings``), the sink metrics over
    (up to SINK_TEXTS of) their texts, a head attending to a sink above ``epsilon``, and the same metrics with the
    massive activations replaced at their birth blocks (``replacements``: label -> block -> dim -> value, written where
    the findings' criterion calls a value massive)."""
    sinks = sink_texts(findings)[0]
    base = sink_pass(lm, inputs, sinks, epsilon) if softmax_layers(lm) else None
    under = {}
    for label, by_block in (replacements or {}).items() if base is not None else ():
        under[label] = sink_pass(lm, inputs, sinks, epsilon, partial(replaced_massive, lm, by_block, findings.criterion))
    return sinks_from(lm, findings, epsilon, base, replacements or {}, under)


def sink_texts(findings: Findings) -> tuple[dict[int, list[int]], list[SinkToken], str]:
    """The sink positions per text (up to SINK_TEXTS texts, the first ones), those texts' sink tokens, and the rule
    that picked them (``sink_tokens``)."""
    sink_list, rule = sink_tokens(findings.massive, findings.tokens)
    sinks: dict[int, list[int]] = {}
    for token in sink_list:
        sinks.setdefault(token.text, []).append(token.position)
    sinks = dict(sorted(sinks.items())[:SINK_TEXTS])
    return sinks, [t for t in sink_list if t.text in sinks], rule


def replaced_massive(lm: LoadedModel, by_block: dict[int, dict[int, float]], criterion, valid: torch.Tensor | None
                     ) -> AbstractContextManager:
    """The massive values replaced at each block of ``by_block`` (block -> dim -> value), each text of a padded batch
    judged on its own positions (``valid``: the attention mask, or None)."""
    stack = ExitStack()
    for layer, by_dim in by_block.items():
        stack.enter_context(replace_massive(lm, layer, by_dim, criterion, valid))
    return stack


def sinks_from(lm: LoadedModel, findings: Findings, epsilon: float, base: SinkPass | None,
               replacements: dict[str, dict[int, dict[int, float]]], under: dict[str, SinkPass | None]) -> AttentionSinks:
    """The sink section from the unmodified pass ``base`` (None: none measured) and the passes ``under`` each
    replacement (label -> its pass)."""
    dims = findings.dims
    birth = min((d.born_at for d in dims), default=None)
    _, sink_list, rule = sink_texts(findings)
    causal = not lm.adapter.encoder
    softmax = softmax_layers(lm)
    source = next((lm.at(layer).values.path for layer in softmax if lm.at(layer).values is not None), None)
    values = (f"value vectors read at each block's {source}" if source else
              f"value vectors of the {lm.adapter.family} family are not read (fused, interleaved q/k/v): no value norms or no-op heads")
    n_layers = len(lm.adapter.blocks(lm.model))
    layout = dict(softmax_layers=softmax if len(softmax) < n_layers else [],
                  positions=[lm.at(layer).positions for layer in range(n_layers)] if not all(
                      lm.at(layer).positions for layer in range(n_layers)) else [])
    if base is None:
        why = "no block mixes tokens by softmax attention" if not softmax else "no text has a sink token with later tokens to attend to it"
        return AttentionSinks(texts=0, share=[], uniform=[], sink_layers=[], first_sink_layer=None, birth_layer=birth, summary=why,
                              epsilon=epsilon, causal=causal, rule=rule, tokens=sink_list, values=values, **layout)
    found_blocks = sink_blocks(base.rate)
    changed = []
    for label, by_block in replacements.items():
        if under.get(label) is None:
            continue
        rate = under[label].rate.tolist()
        survives = [rate[layer] >= SINK_SHARE if layer in found_blocks else None for layer in range(len(rate))]
        replaced = sorted({dim for by_dim in by_block.values() for dim in by_dim})
        changed.append(SinkIntervention(name=f"set massive dims {replaced} to {label} at block(s) {sorted(by_block)}", label=label,
                                        blocks=sorted(by_block), rate=rate, share=under[label].share.mean(dim=1).tolist(),
                                        survives=survives))
    summary = _summary(base, found_blocks, birth, epsilon)
    listed = lambda tensor: tensor.tolist() if tensor is not None else None
    return AttentionSinks(
        texts=base.texts, share=base.share.tolist(), uniform=base.uniform.tolist(), sink_layers=found_blocks,
        first_sink_layer=found_blocks[0] if found_blocks else None, birth_layer=birth,
        summary=summary, epsilon=epsilon, causal=causal, rule=rule, tokens=sink_list, rate=base.rate.tolist(),
        overall_rate=float(base.rate.nanmean()),
        value_ratio=listed(base.value_ratio), output_share=listed(base.output_share),
        noop_heads=noop_heads(base), values=values, interventions=changed,
        dependence=dependence(found_blocks, birth, changed),
        gate_sink=listed(base.gate_sink), gate_other=listed(base.gate_other), learned_sink=listed(base.learned_sink),
        first_token=listed(base.first_token), indexer_selected=listed(base.indexed),
        mixing=mixing_words(lm, base, found_blocks, birth, bool(dims)), **layout,
    )


def _summary(base: SinkPass, found_blocks: list[int], birth: int | None, epsilon: float) -> str:
    heads = base.share.shape[1]
    uniform = float(base.uniform.nanmean())
    measured = int((~torch.isnan(base.rate)).sum())
    blocks = f"{measured} {'' if measured == len(base.rate) else 'softmax-attention '}block{'s' if measured != 1 else ''}"
    if not found_blocks:
        return (f"no block has a sink: in none of the {blocks} do half of the heads put more than {epsilon:.0%} of their "
                f"attention on the sink tokens (overall sink rate {float(base.rate.nanmean()):.1%}; a uniform spread gives {uniform:.1%})")
    first = found_blocks[0]
    timing = ""
    if birth is not None:
        timing = (" (right after the birth block)" if first == birth + 1
                  else f" ({first - birth} blocks after the birth block {birth})" if first > birth
                  else " (at the birth block itself)" if first == birth
                  else f" ({birth - first} block{'s' if birth - first > 1 else ''} before the birth block {birth})")
    return (f"the sink forms at block {first}{timing}; {len(found_blocks)} of {blocks} have a sink (at least half of "
            f"their {heads} heads put more than {epsilon:.0%} of their attention on the sink tokens); overall sink rate "
            f"{float(base.rate.nanmean()):.1%}, mean attention on the sink tokens {float(base.share.nanmean()):.1%} against a uniform "
            f"share of {uniform:.1%}")


def mixing_words(lm: LoadedModel, base: SinkPass, found_blocks: list[int], birth: int | None, massive: bool) -> str:
    """What a hybrid's other mixers, NoPE blocks, output gates and learned sinks do to the sink, in words ("" for a
    model whose every block is softmax attention with positions, no gate and no learned sink)."""
    n_layers = len(base.rate)
    softmax = softmax_layers(lm)
    words = []
    if len(softmax) < n_layers:
        mixing = [layer for layer in range(n_layers) if layer not in softmax and lm.at(layer).mixer is not None]
        alone = n_layers - len(softmax) - len(mixing)  # blocks without a token mixer: an MLP alone
        others = " and ".join(sorted({MIXER_WORDS[lm.at(layer).mixer] for layer in mixing}))
        verbs = ("mixes", "has") if len(mixing) == 1 and alone else ("mix", "have")
        parts = [f"{len(mixing)} {verbs[0]} tokens by {others} and {verbs[1]} no attention probabilities"] if mixing else []
        parts += [f"{alone} {'is an MLP' if alone == 1 else 'are MLPs'} alone, with no token mixer"] if alone else []
        # One kind of other block: "the other 2 mix tokens by ..."; both: "of the other 3, 1 mixes ..., 2 are ...".
        rest = (f"the other {parts[0]}" if len(parts) == 1
                else f"of the other {n_layers - len(softmax)}, {', '.join(parts)}")
        words.append(f"sink metrics are measured on the softmax-attention {_blocks(softmax)}; {rest}")
    nope = [layer for layer in softmax if not lm.at(layer).positions]
    if nope:
        roped = [layer for layer in softmax if lm.at(layer).positions]
        rate = lambda layers: float(base.rate[layers].nanmean()) if layers else float("nan")
        share = lambda layers: float(base.share[layers].nanmean()) if layers else float("nan")
        where = "" if birth is None else (f"; the massive value is born in block {birth}, which "
                                          f"{'uses no positions' if birth in nope else 'uses positions'}")
        words.append(f"{_blocks(nope)} use{'s' if len(nope) == 1 else ''} no positions (NoPE): sink rate {rate(nope):.0%}, mean attention "
                     f"on the sink tokens {share(nope):.1%}, against {rate(roped):.0%} and {share(roped):.1%} in the blocks with "
                     f"positions{where}")
    if base.gate_sink is not None:
        gated = [layer for layer in softmax if not bool(torch.isnan(base.gate_sink[layer]).all())]
        sink, other = float(base.gate_sink[gated].nanmean()), float(base.gate_other[gated].nanmean())
        lowest = min(gated, key=lambda layer: float(base.gate_sink[layer].nanmean()))
        words.append(f"gated attention (output x sigmoid(gate), per head): at the sink tokens the gate averages {sink:.3f} against "
                     f"{other:.3f} at the other tokens (lowest at block {lowest}: {float(base.gate_sink[lowest].nanmean()):.3f}); "
                     f"{'a sink is there' if found_blocks else 'no block has a sink'}, and "
                     f"{'massive activations are there' if massive else 'no activation is massive'}")
    if base.learned_sink is not None:
        taken, first = float(base.learned_sink[softmax].nanmean()), float(base.first_token[softmax].nanmean())
        most = float(base.learned_sink[softmax].nan_to_num(-1).max())
        words.append(f"learned sinks (a logit per head that joins the softmax): they take {taken:.1%} of the attention on average "
                     f"(up to {most:.1%} for one head), the first token {first:.1%}; with them, the model "
                     f"{'still' if massive else 'does not'} grow{'s' if massive else ''} a massive activation, and "
                     f"{'still has' if found_blocks else 'has no'} token sink")
    if base.indexed is not None:
        indexed = [layer for layer in softmax if not bool(torch.isnan(base.indexed[layer]))]
        picked = float(base.indexed[indexed].mean())
        fewest = min(indexed, key=lambda layer: float(base.indexed[layer]))
        words.append(f"sparse attention (an indexer picks the keys each query attends to, and the attention is measured over "
                     f"those keys): the indexer picks the sink tokens for {picked:.1%} of the queries that can see them on average "
                     f"over {_blocks(indexed)} (fewest at block {fewest}: {float(base.indexed[fewest]):.1%})")
    return "; ".join(words)


MIXER_WORDS = {"attention": "softmax attention", "linear": "linear attention", "conv": "short convolutions",
               "ssm": "state-space scans"}


def _blocks(layers: list[int]) -> str:
    """'block 3' or 'blocks 1, 3'."""
    return f"block{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


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
    kept_mean = f"; set to their mean, {sum(bool(mean.survives[layer]) for layer in reached)} of {len(reached)} keep it" if mean else ""
    counts = (f"with the massive values set to zero, {len(lost)} of the {len(reached)} sink blocks after block {birth} lose their "
              f"sink{kept_mean}")
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
