"""Why the writing neurons fire at the massive position and nowhere else: their pre-activations split into upstream
sources, a chain followed back from the massive value to the token, and whether the token or the position carries it."""

from __future__ import annotations

from collections import Counter

import torch

from ...capture.attention import block_attention, eager_attention
from ...capture.hooks import forward_until, tap
from ...capture.probe import block_output
from ...capture.routing import MoeBlock, route
from ...models.loading import LoadedModel
from ...settings import Criterion, ScanSettings
from ..detect.results import Findings, Massive
from ..mechanism.results import Attribution, ExpertAttribution, HeadShare, Lifeline, Mechanism
from .decompose import AtPosition, Split, Target, mean_max, ranked_sources, split, units
from .patching import patch_sources
from .results import Carriers, ChainLink, NeuronTrigger, PreActivationSplit, RouterTrigger, SourcePart, Trigger
from .streams import stream_split

CHAIN_DEPTH = 3  # links followed back from the writing neuron (an option of scan)
TOP_NEURONS = 3  # neurons split per writing block: those that give 90% of its output, at most this many
WRITING = ("birth", "growth")


def pre_activation_split(piece: Split, position: int) -> PreActivationSplit:
    """The report's view of a split: every source here against elsewhere, largest |difference| first."""
    parts = []
    for label, part in piece.parts.items():
        term = piece.terms.get(label)
        mean, largest = mean_max(part, position)
        here = float(part[position])
        parts.append(SourcePart(source=label, layer=term.layer if term else None, site=term.site if term else "bias", here=here,
                                others_mean=mean, others_max=largest, difference=here - mean if mean == mean else here))
    parts.sort(key=lambda p: -abs(p.difference))
    mean, largest = mean_max(piece.value, position)
    scale_mean, _ = mean_max(piece.scale, position)
    return PreActivationSplit(site=piece.target.site, value=float(piece.value[position]), others_mean=mean, others_max=largest,
                              scale=float(piece.scale[position]), scale_others=scale_mean, sources=parts, error=piece.error)


def neuron_site(lm: LoadedModel, layer: int, expert: bool = False, shared: bool = False) -> str:
    """The pre-activation that decides whether a neuron of block ``layer`` (of its MLP, of its routed experts:
    ``expert``, or of its shared expert: ``shared``) fires: the gate in a gated MLP, else the one pre-activation."""
    return "mlp_gate" if _gated(lm, layer, expert, shared) else "mlp_up"


def _gated(lm: LoadedModel, layer: int, expert: bool = False, shared: bool = False) -> bool:
    """Whether block ``layer``'s neurons are gated: its shared expert's (``shared``), its routed experts'
    (``expert``), else its dense MLP's (in a dense block, or beside the experts)."""
    here = lm.at(layer)
    if shared:
        return here.moe.shared.gated
    return here.moe.experts.gated if expert else here.gated


def _pre_activations(lm: LoadedModel, layer: int, expert: bool = False, shared: bool = False) -> tuple[str, ...]:
    """The pre-activation sites of block ``layer``'s neurons (of its routed experts: ``expert``, of its shared
    expert: ``shared``): gate and up where gated, else up."""
    return ("mlp_gate", "mlp_up") if _gated(lm, layer, expert, shared) else ("mlp_up",)


def _link(depth: int, kind: str, layer, index, piece: Split | None, position: int, source: str | None, feeds: float | None,
          parent: Split | None) -> ChainLink:
    value = others = site = None
    if piece is not None:
        site, value, (others, _) = piece.target.site, float(piece.value[position]), mean_max(piece.value, position)
    here = source_others = None
    if parent is not None and source is not None:
        here, (source_others, _) = float(parent.parts[source][position]), mean_max(parent.parts[source], position)
    return ChainLink(depth=depth, kind=kind, layer=layer, index=index, site=site, value=value, value_others=others, source=source,
                     feeds=feeds, source_here=here, source_others=source_others)


def follow(lm: LoadedModel, input_ids: torch.Tensor, position: int, first: Split, at: AtPosition, depth: int,
           tokens: list[str], cache: dict) -> list[ChainLink]:
    """From the writing neuron back toward the token: at each step the top source of the current neuron's
    pre-activation, then that source's own top neuron (or head, with where it attends), whose pre-activation is split
    in turn, up to ``depth`` steps. Ends at the embedding, at a head, or at an MLP that is not split."""
    chain = [_link(0, "neuron", first.target.layer, first.target.neuron, first, position, None, None, None)]
    chain[0].expert, chain[0].shared = first.target.expert, first.target.shared
    current = first
    for step in range(1, depth + 1):
        label = ranked_sources(current, position)[0]
        term = current.terms[label]
        if term.layer is None:  # the embedding: the chain reaches the token itself
            chain.append(_link(step, label, None, None, None, position, label, float(current.parts[label][position]), current))
            break
        found, _ = units(lm, term, float(current.factors[label][position]), at)
        if not found:
            chain.append(_link(step, "mlp", term.layer, None, None, position, label, float(current.parts[label][position]), current))
            break
        sign = 1.0 if float(current.parts[label][position]) >= 0 else -1.0
        unit = max(found, key=lambda u: u.contribution * sign)
        if unit.kind == "head":
            link = _link(step, "head", term.layer, unit.index, None, position, label, unit.contribution, current)
            link.attends = attends(lm, input_ids, term.layer, unit.index, position, tokens)
            chain.append(link)
            break
        target = Target(term.layer, unit.index, neuron_site(lm, term.layer))
        pieces, at = cached_split(lm, input_ids, [target], position, cache)
        chain.append(_link(step, "neuron", term.layer, unit.index, pieces[0], position, label, unit.contribution, current))
        current = pieces[0]
    return chain


def cached_split(lm: LoadedModel, input_ids: torch.Tensor, targets: list[Target], position: int,
                 cache: dict) -> tuple[list[Split], AtPosition]:
    """``split``, computing only the targets not split before at this text and position."""
    text_key = (tuple(input_ids[0].tolist()), position)
    missing = [t for t in targets if (text_key, t.neuron, *t.key) not in cache]
    if missing:
        pieces, at = (stream_split if lm.adapter.hyper is not None else split)(lm, input_ids, missing, position)
        for piece in pieces:
            cache[(text_key, piece.target.neuron, *piece.target.key)] = (piece, at)
    found = [cache[(text_key, t.neuron, *t.key)] for t in targets]
    merged = AtPosition({key: vector for _, at in found for key, vector in at.vectors.items()})
    return [piece for piece, _ in found], merged


@torch.no_grad()
def attends(lm: LoadedModel, input_ids: torch.Tensor, layer: int, head: int, position: int, tokens: list[str], top: int = 3) -> list[list]:
    """[key position, token, probability] of the head's strongest keys from the query at ``position`` (an eager pass
    up to the head's block: its probabilities are those of a whole pass, no block looking ahead)."""
    kept = {}
    with eager_attention(lm), block_attention(lm, layer, lambda found: kept.update(maps=found.maps[layer])):
        forward_until(lm.model, lm.adapter, layer, input_ids=input_ids.to(lm.device), use_cache=False)
    row = kept["maps"][0, head, position].float().cpu()
    order = row.argsort(descending=True)[:top].tolist()
    return [[key, tokens[key], float(row[key])] for key in order]


def probe_layer(line: Lifeline, medians: list[float], criterion: Criterion) -> int:
    """Where the carriers' probes read: the block where the carrier is most clearly massive, its value the most times
    its threshold (``medians``: each block's, of the lifeline's stream)."""
    return max(range(len(line.steps)), key=lambda at: abs(line.steps[at].value) / criterion.threshold(medians[at]))


def last_block(line: Lifeline, input_ids: torch.Tensor, medians: list[float], criterion: Criterion) -> int:
    """The deepest block any pass of the lifeline's trigger runs to, on its carrier's text ``input_ids``: its writing
    blocks' (whose neurons are split and patched, whose router is read), its birth block's (where a head writes it),
    its peak block's (the patches read the value there) and, on a text of two tokens or more, the carriers' probe
    block. A chain goes back from a writing neuron to earlier blocks only."""
    layers = [line.born_at, line.peak_layer] + [step.layer for step in line.steps if step.phase in WRITING]
    if input_ids.shape[1] >= 2:
        layers.append(probe_layer(line, medians, criterion))
    return max(layers)


def carriers(lm: LoadedModel, line: Lifeline, massive: list[Massive], windows: int, input_ids: torch.Tensor,
             medians: list[float], criterion: Criterion) -> Carriers | None:
    """Token or position: the scan's places for the dim, and two probes at the peak block on the carrier's text with
    another token put in the carrier's place (the next token of the text; the one before at its end), which moves the
    carrier token one position on. With hyper-connections the probes read the lifeline's stream, against ``medians``
    of that stream."""
    ids = input_ids[0]
    if len(ids) < 2:
        return None
    places = {(m.text, m.position): m.token for m in massive if m.dim == line.dim}
    first = Counter(token for (_, position), token in places.items() if position == 0)
    other = Counter(token for (_, position), token in places.items() if position > 0)
    p = line.position
    layer = probe_layer(line, medians, criterion)
    other_token = ids[p + 1] if p + 1 < len(ids) else ids[p - 1]
    probe = torch.cat([ids[:p], other_token.view(1), ids[p:]]).unsqueeze(0)
    hidden = block_output(lm, probe, layer, line.stream)
    swapped, moved = float(hidden[p, line.dim]), float(hidden[p + 1, line.dim])
    swapped_massive, moved_massive = criterion.is_massive(swapped, medians[layer]), criterion.is_massive(moved, medians[layer])
    verdict = {(True, False): "position", (False, True): "token", (True, True): "both",
               (False, False): "context"}[swapped_massive, moved_massive]
    return Carriers(texts=windows, first_position_texts=sum(first.values()), first_tokens=[[t, n] for t, n in first.most_common()],
                    other_positions=[[t, n] for t, n in other.most_common(8)], probe_layer=layer,
                    swapped_token=lm.tokenizer.decode([int(other_token)]), swapped=swapped, swapped_massive=swapped_massive,
                    moved=moved, moved_massive=moved_massive, verdict=verdict)


def trigger(
    lm: LoadedModel, line: Lifeline, writers: list[Attribution], experts: list[ExpertAttribution], heads: list[HeadShare] | None,
    input_ids: torch.Tensor, tokens: list[str], massive: list[Massive], windows: int, medians: list[float], criterion: Criterion,
    depth: int, cache: dict, patch: bool = False,
) -> Trigger:
    """The trigger of one dim at its main carrier. ``writers``: the neuron attributions of its birth and growth
    blocks at the carrier; ``experts``: the same where the block is a mixture of experts (the top expert's neurons,
    and why the router picks that expert); ``heads``: the head split where attention writes the birth instead. With
    ``patch``, the top sources of the first writing neuron are patched (see ``massact.analysis.patching``)."""
    p = line.position
    targets, roles = [], {}
    for a in writers:
        toward = [n for n in a.neurons if n.contribution * a.output > 0][: min(max(a.neurons_for_90pct, 1), TOP_NEURONS)]
        for n in toward:
            roles[a.layer, n.neuron, None, False] = a.role
            targets += [Target(a.layer, n.neuron, site) for site in _pre_activations(lm, a.layer)]
    router = None
    for e in experts:  # the top expert's neurons: a routed expert's, or the shared expert's where it writes most
        expert, shared = e.moe.top_expert, e.moe.top_expert is None
        toward = [n for n in e.moe.neurons if n.contribution * e.moe.output > 0][:TOP_NEURONS]
        for n in toward:
            roles[e.layer, n.neuron, expert, shared] = e.role
            targets += [Target(e.layer, n.neuron, site, expert, shared)
                        for site in _pre_activations(lm, e.layer, expert=not shared, shared=shared)]
        if not shared:
            router = router or router_trigger(lm, input_ids, e.layer, expert, p)
    warnings = []
    neurons: list[NeuronTrigger] = []
    chain: list[ChainLink] = []
    patches = []
    if targets:
        pieces, at = cached_split(lm, input_ids, targets, p, cache)
        for (layer, neuron, expert, shared), role in roles.items():
            splits = [pre_activation_split(x, p) for x in pieces
                      if (x.target.layer, x.target.neuron, x.target.expert, x.target.shared) == (layer, neuron, expert, shared)]
            neurons.append(NeuronTrigger(layer=layer, neuron=neuron, role=role, splits=splits, expert=expert, shared=shared))
            inside = " shared expert" if shared else "" if expert is None else f" expert {expert}"
            where = f"block {layer}{inside} neuron {neuron}"
            warnings += [f"{where} {s.site}: its sources miss it by {s.error:.1e}" for s in splits if s.error > 1e-4]
        first = next(x for x in pieces
                     if x.target.site == neuron_site(lm, x.target.layer, x.target.expert is not None, x.target.shared))
        chain = follow(lm, input_ids, p, first, at, depth, tokens, cache)
        patches = patch_sources(lm, input_ids, first, line, medians, criterion) if patch else []
    elif heads:  # attention writes it: the chain starts, and ends, at the writing head
        link = ChainLink(depth=0, kind="head", layer=line.born_at, index=heads[0].head, site=None, value=None, value_others=None,
                         source=None, feeds=heads[0].contribution, source_here=None, source_others=None)
        link.attends = attends(lm, input_ids, line.born_at, heads[0].head, p, tokens)
        chain = [link]
    return Trigger(dim=line.dim, text=line.text, position=p, token=line.token, neurons=neurons, chain=chain,
                   carriers=carriers(lm, line, massive, windows, input_ids, medians, criterion),
                   warnings=warnings, patching=patches, router=router)


@torch.no_grad()
def router_trigger(lm: LoadedModel, input_ids: torch.Tensor, layer: int, expert: int, position: int) -> RouterTrigger:
    """The writing expert's router logit at the massive position against the text's other tokens, from the block's
    input at every position (one pass up to the block), routed as the model routes."""
    kept = {}
    with tap(lm.model, lm.adapter, [(layer, lm.at(layer).router_site)], lambda _, __, hidden: kept.update(x=hidden[0].detach())):
        forward_until(lm.model, lm.adapter, layer, input_ids=input_ids.to(lm.device), use_cache=False)
    routing = route(MoeBlock.at(lm, layer), kept["x"])
    logits = routing.logits[:, expert].cpu()
    others = torch.cat([logits[:position], logits[position + 1 :]])
    chosen = (routing.indices == expert).any(-1).cpu()
    rest = torch.cat([chosen[:position], chosen[position + 1 :]])
    return RouterTrigger(layer=layer, expert=expert, logit=float(logits[position]),
                         others_mean=float(others.mean()) if len(others) else float("nan"),
                         others_max=float(others.max()) if len(others) else float("nan"),
                         rank=1 + int((routing.logits[position] > routing.logits[position, expert]).sum()),
                         others_routed=float(rest.float().mean()) if len(rest) else float("nan"))


def triggers(lm: LoadedModel, inputs: dict[int, torch.Tensor], findings: Findings, mechanism: Mechanism, settings: ScanSettings,
             windows: int) -> list[Trigger]:
    """One trigger per lifeline of the ``mechanism``, from the writers it found at its carrier (origin, attribution,
    experts), each chain followed ``settings.chain_depth`` links back; dims written by the same neurons at the same
    place share their splits. The carriers' probes read the scan's massive entries over its ``windows`` (the number of
    windows scanned). With ``settings.verify``, each trigger's top sources are patched."""
    tokens, massive, criterion = findings.tokens, findings.massive, findings.criterion
    origin, attribution, experts = mechanism.origin, mechanism.attribution, mechanism.experts
    depth, patch = settings.chain_depth, settings.verify
    cache: dict = {}
    found = []
    for line in mechanism.lifelines:
        at_carrier = lambda item, line=line: (item.dim, item.text, item.position) == (line.dim, line.text, line.position)
        writers = [a for a in attribution if at_carrier(a) and a.role in WRITING]
        routed = [e for e in experts if at_carrier(e) and e.role in WRITING]
        birth = next((o for o in origin if at_carrier(o) and o.role == "birth"), None)
        heads = birth.heads if birth is not None and birth.writer == "attn" else None
        medians = findings.stream_medians(line.stream)  # with hyper-connections, the followed stream's
        found.append(trigger(lm, line, writers, routed, heads, inputs[line.text], tokens[line.text], massive,
                             windows, medians, criterion, depth, cache, patch))
    return found
