"""The mechanism at each block that writes or erases a massive dim: the sublayer that does it (with its norm and heads),
and for an MLP its anatomy, neurons and super weight (or, in a mixture of experts, its experts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...capture.probe import ATTN_Z, block_output, probe_block, stream_dims
from ...capture.routing import MoeBlock
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..detect.results import DimSummary, Findings, Massive
from . import anatomy as anatomy_step
from .attribution import contributions, down_row, mlp_weight_stats, super_weight
from .expert_attribution import attribute_moe
from .lifeline import phase_direction, step_sign, writers
from .norms import norm_factors
from .origin import decomposition_gap, head_split, removal_cause, writer
from .results import Anatomy, Attribution, BirthState, ExpertAttribution, Lifeline, NormFactors, Origin, StreamOrigin, TokenValues


@dataclass
class Event:
    """A (dim, text, position, block) to explain: a block the lifeline names as a writer or eraser of the dim (role:
    its phase), or where the scan stops calling it massive ("removal"). ``direction`` is +1 where the block should
    push the value up, -1 down: the writer is the branch pushing hardest that way."""

    dim: int
    text: int
    position: int
    layer: int
    role: str
    direction: float


def pick_events(dims: list[DimSummary], massive: list[Massive], lines: list[Lifeline]) -> list[Event]:
    """Per dim: every block its lifeline names as a writer or eraser, at the main carrier (not where a post-LN block's
    LayerNorms do it: the lifeline's norm step is their whole story); and each block where the scan stops calling it
    massive that the lifeline has not named, at the strongest entry just before it."""
    events = []
    for summary, line in zip(dims, lines):
        for layer, phase in writers(line):
            if line.steps[layer].writer in ("norm", "scale"):  # no branch to open: the norms or the output scale did it
                continue
            direction = phase_direction(phase, step_sign(line, layer), line.precursor)
            events.append(Event(summary.dim, line.text, line.position, layer, phase, direction))
        named = {layer for layer, _ in writers(line)}
        for removed in summary.removed_at:
            if removed in named:
                continue
            strongest = max((m for m in massive if m.dim == summary.dim and m.layer == removed - 1), key=lambda m: abs(m.value))
            events.append(Event(summary.dim, strongest.text, strongest.position, removed, "removal", -1.0 if strongest.value >= 0 else 1.0))
    return events


def explain(
    lm: LoadedModel, events: list[Event], probes: Probes, findings: Findings, settings: ScanSettings, warnings: list[str],
) -> tuple[list[Origin], list[Anatomy], list[Attribution], list[ExpertAttribution]]:
    """The mechanism at each event: the writer, and for an MLP writer its anatomy and neurons (or experts), from the
    events' blocks probed (``probe_events``, or a streamed pass), the ``settings.top_neurons`` largest neurons kept;
    checks that fail their second computation are appended to ``warnings``. Only the weights of the events' blocks
    are read."""
    tokens, layers, criterion, top_neurons = findings.tokens, findings.layers, findings.criterion, settings.top_neurons
    origins, anatomies, attributions, experts = [], [], [], []
    tolerance = _tolerance(lm)
    for event in events:
        positions, vectors = probes[event.text, event.layer]
        at = {site: v[positions.index(event.position)] for site, v in vectors.items()}
        cause = None
        if event.role == "removal":
            cause = removal_cause(float(at[lm.adapter.stream][event.dim]), layers[event.layer - 1].median, criterion)
        origin = explain_origin(lm, event, at, tokens, cause)
        if origin.resid_mid is not None:  # post-LN: resid_sum = resid_mid + mlp
            gap = decomposition_gap(origin.resid_mid, None, origin.mlp, origin.resid_out)
        else:
            gap = decomposition_gap(origin.resid_in, origin.attn, origin.mlp, origin.resid_out, origin.ple or 0.0,
                                    origin.scale if origin.scale is not None else 1.0)
        if gap > tolerance:
            warnings.append(f"block {event.layer}: the block's branches differ from its output by {gap:.1e} (relative)")
        if origin.norm is not None and origin.norm.error > tolerance:
            warnings.append(f"block {event.layer} dim {event.dim}: the norm's factors miss its output by {origin.norm.error:.1e}")
        origins.append(origin)
        if origin.writer == "mlp" and cause != "median":  # when the median grew, nothing wrote the change
            found, anatomy = _open_writer(lm, event, at, tokens, top_neurons, tolerance, warnings)
            if anatomy is None:
                experts.append(found)
            else:
                attributions.append(found)
                anatomies.append(anatomy)

    return origins, anatomies, attributions, experts


# (text, block) -> (the positions probed, {site: [len(positions), width]}): what ``probe_block`` reads for the events.
Probes = dict[tuple[int, int], tuple[list[int], dict[str, torch.Tensor]]]


def probe_events(lm: LoadedModel, events: list[Event], inputs: dict[int, torch.Tensor]) -> Probes:
    """Every (text, block) of ``events`` probed at its events' positions: one forward pass each (``inputs``: the kept
    windows' token ids)."""
    return {(text, layer): (positions, probe_block(lm, inputs[text], layer, positions))
            for (text, layer), positions in event_positions(events).items()}


def event_positions(events: list[Event]) -> dict[tuple[int, int], list[int]]:
    """(text, block) -> the positions its events are at, sorted: one probe each."""
    return {(text, layer): sorted({e.position for e in events if (e.text, e.layer) == (text, layer)})
            for text, layer in dict.fromkeys((e.text, e.layer) for e in events)}


def _tolerance(lm: LoadedModel) -> float:
    """How far a second computation may miss in the model's dtype before a warning says so."""
    return 1e-3 if lm.dtype == torch.float32 else 2e-2


def _open_writer(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens: list[list[str]], top: int, tolerance: float,
                 warnings: list[str], token_id: int | None = None) -> tuple[Attribution | ExpertAttribution, Anatomy | None]:
    """The MLP that wrote ``event``, opened: its experts and their neurons (a mixture: anatomy None; ``token_id`` for a
    hash router), or its neurons and anatomy (dense). Where experts sit beside the dense MLP, the part that pushed
    hardest in the event's direction is opened, with its own norm's factors. A split that misses the output by more
    than ``tolerance`` appends a warning."""
    here, moe = lm.at(event.layer), MoeBlock.at(lm, event.layer)
    beside = here.beside
    if moe is not None and (beside is None or _routed_wrote(event, at)):
        split = attribute_moe(moe, lm.adapter.family, at[here.router_site], event.dim, top, token_id=token_id)
        if split.error > tolerance:
            warnings.append(f"block {event.layer} dim {event.dim}: the experts' contributions miss the output by {split.error:.1e}")
        found = ExpertAttribution(**_place(event, tokens), moe=split)
        if beside is not None:
            found.norm = _norm_factors(lm, event.layer, beside.routed_norm, at["moe_raw"], at["moe_out"], event.dim)
        return found, None
    attribution = attribute(lm, event, at, tokens, top)
    if attribution.error > tolerance:
        warnings.append(f"block {event.layer} dim {event.dim}: neuron contributions miss the output by {attribution.error:.1e}")
    if beside is not None:
        attribution.norm = _norm_factors(lm, event.layer, beside.dense_norm, at["dense_raw"], at["dense_out"], event.dim)
    return attribution, open_mlp(lm, event, at, tokens, [n.neuron for n in attribution.neurons])


def _routed_wrote(event: Event, at: dict[str, torch.Tensor]) -> bool:
    """Beside a dense MLP: whether the experts' part of mlp_raw (moe_out) pushes harder in the event's direction than
    the dense MLP's (dense_out)."""
    return float(at["moe_out"][event.dim]) * event.direction > float(at["dense_out"][event.dim]) * event.direction


def explain_streams(
    lm: LoadedModel, lines: list[Lifeline], origins: list[StreamOrigin], inputs: dict[int, torch.Tensor], findings: Findings,
    settings: ScanSettings,
) -> tuple[list[Anatomy], list[Attribution], list[ExpertAttribution], list[str]]:
    """With hyper-connections: at each block a lifeline names as a writer where the stream origin's carrier is the
    MLP (its output through its write weight), the MLP opened (``open_stream``). One probe pass per (text, block,
    position); last, a warning for each check that fails its second computation."""
    warnings: list[str] = []
    probes: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
    opened = []
    for line, layer, phase, origin in stream_openings(lines, origins):
        place = (line.text, layer, line.position)
        if place not in probes:
            probes[place] = {site: v[0] for site, v in probe_block(lm, inputs[line.text], layer, [line.position]).items()}
        opened.append(open_stream(lm, line, layer, phase, origin, probes[place], inputs, findings, settings, warnings))
    return *split_opened(opened), warnings


def split_opened(opened: list[tuple[Attribution | ExpertAttribution, Anatomy | None]]
                ) -> tuple[list[Anatomy], list[Attribution], list[ExpertAttribution]]:
    """``open_stream``'s results split as the mechanism keeps them, each in their order: the anatomies, the neuron
    attributions (dense MLPs) and the expert attributions (mixtures)."""
    anatomies = [anatomy for _, anatomy in opened if anatomy is not None]
    return anatomies, [f for f, anatomy in opened if anatomy is not None], [f for f, anatomy in opened if anatomy is None]


def stream_openings(lines: list[Lifeline], origins: list[StreamOrigin]) -> list[tuple[Lifeline, int, str, StreamOrigin]]:
    """(lifeline, block, phase, origin) of each block a lifeline names as a writer where its stream origin's carrier
    is the MLP, in the lifelines' order and each in depth order."""
    by_place = {(o.layer, o.stream, o.dim, o.text, o.position): o for o in origins}
    found = []
    for line in lines:
        for layer, phase in writers(line):
            origin = by_place.get((layer, line.stream, line.dim, line.text, line.position))
            if origin is not None and origin.carrier == "mlp":
                found.append((line, layer, phase, origin))
    return found


def open_stream(lm: LoadedModel, line: Lifeline, layer: int, phase: str, origin: StreamOrigin, at: dict[str, torch.Tensor],
                inputs: dict[int, torch.Tensor], findings: Findings, settings: ScanSettings,
                warnings: list[str]) -> tuple[Attribution | ExpertAttribution, Anatomy | None]:
    """With hyper-connections: the MLP that writes ``line``'s value at block ``layer`` (``at``: the block's sites at
    the carrier, as ``probe_block`` reads them), opened: its anatomy and neurons (dense; anatomy None for a mixture:
    its experts and their neurons), of the MLP's output; each carries the write weight into the followed stream
    (value in stream s = ... + w_mlp[s] x mlp_out), the amplifier between the neurons' sum and the stream. A check
    that fails its second computation appends a warning."""
    write = next(term.weight for term in origin.terms if term.source == "mlp")
    event = Event(line.dim, line.text, line.position, layer, phase, phase_direction(phase, step_sign(line, layer), line.precursor))
    found, anatomy = _open_writer(lm, event, at, findings.tokens, settings.top_neurons, _tolerance(lm), warnings,
                                  token_id=int(inputs[line.text][0, line.position]))
    found.stream, found.write = line.stream, write
    found.landed = write * (found.moe.actual if anatomy is None else found.output)
    return found, anatomy


def explain_origin(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, cause: str | None) -> Origin:
    adapter, dim = lm.at(event.layer), event.dim
    resid_in, resid_out = float(at["resid_in"][dim]), float(at[adapter.stream][dim])
    # A block of one sublayer has no other branch: None, not a zero it never wrote.
    attn, mlp = (float(at[s][dim]) if s in at else None for s in ("attn_out", "mlp_out"))
    resid_mid = float(at["resid_mid"][dim]) if adapter.post_ln else None
    ple = float(at["ple_out"][dim]) if adapter.per_layer_input is not None else None
    scale = lm.adapter.scale_of(lm.model, event.layer) if adapter.output_scale is not None else None
    # Post-LN: the attention half lands as resid_mid = LN(resid_in + attn) and the sum is resid_mid + mlp.
    who = writer(event.direction, resid_mid if adapter.post_ln else attn, mlp, ple)
    raw = {site: float(at[adapter.raw(site)][dim]) if adapter.reshapes(site) else None for site in ("attn_out", "mlp_out")}
    norm = None
    if adapter.post_ln:  # how the block's last LayerNorm scales the massive sum into the block output
        norm = _norm_factors(lm, event.layer, adapter.sites["resid_sum"][0], at["resid_sum"], at["resid_out"], dim)
    elif who == "ple" and adapter.per_layer_input.norm is not None:  # the per-layer input lands through its own norm
        norm = _norm_factors(lm, event.layer, adapter.per_layer_input.norm, at["ple_raw"], at["ple_out"], dim)
    elif f"{who}_out" in adapter.branch_norms:
        branch = f"{who}_out"
        norm = _norm_factors(lm, event.layer, adapter.branch_norms[branch], at[adapter.raw(branch)], at[branch], dim)
    # Heads are split only where attention really wrote the change: not when the median grew past the value.
    # (a convolution or a linear attention has no heads whose outputs sum like softmax heads, and a grouped output
    # projection does not read the heads side by side: not split)
    split_heads = who == "attn" and cause != "median" and adapter.mixer == "attention" and adapter.heads_at_out
    heads = head_split(lm, event.layer, at[ATTN_Z], dim) if split_heads else None
    parts = {site: float(at[site][dim]) if adapter.beside is not None else None for site in ("dense_out", "moe_out")}
    return Origin(**_place(event, tokens), writer=who, resid_in=resid_in, attn=attn, mlp=mlp, resid_out=resid_out, cause=cause,
                  heads=heads, attn_raw=raw["attn_out"], mlp_raw=raw["mlp_out"], resid_mid=resid_mid, norm=norm, ple=ple,
                  ple_raw=float(at["ple_raw"][dim]) if "ple_raw" in adapter.sites else None, scale=scale,
                  mlp_dense=parts["dense_out"], mlp_routed=parts["moe_out"])


def _norm_factors(lm: LoadedModel, layer: int, path: str, raw: torch.Tensor, landed: torch.Tensor, dim: int) -> NormFactors:
    module = lm.adapter.module(lm.model, layer, path)
    return norm_factors(module, lm.adapter.param_name(lm.model, layer, path), raw, landed, dim)


def birth_state(lm: LoadedModel, inputs: dict[int, torch.Tensor], *, dims: list[DimSummary], origin: list[Origin],
                massive: list[Massive], tokens: dict[int, list[str]]) -> BirthState | None:
    """The hidden state at the birth of the strongest massive dim, where its strongest entry sits (its birth
    ``origin``), with the dims ``massive`` there."""
    if not dims:
        return None
    strongest = max(dims, key=lambda d: abs(d.max_value))
    birth = next(o for o in origin if o.dim == strongest.dim and o.role == "birth")
    return _state(lm, inputs, birth.layer, birth.text, "", massive, tokens)


def stream_birth_state(lm: LoadedModel, inputs: dict[int, torch.Tensor], *, dims: list[DimSummary], lifelines: list[Lifeline],
                       massive: list[Massive], tokens: dict[int, list[str]]) -> BirthState | None:
    """With hyper-connections: the stream the strongest massive dim's lifeline follows, at its birth block on its
    carrier's text (``stream_birth``), with the dims ``massive`` in that stream there."""
    if not dims:
        return None
    layer, text, stream = stream_birth(dims, lifelines)
    return _state(lm, inputs, layer, text, stream, massive, tokens)


def stream_birth(dims: list[DimSummary], lifelines: list[Lifeline]) -> tuple[int, int, str]:
    """With hyper-connections: (block, text, stream) of the birth state: the birth block of the strongest massive
    dim's lifeline, on its carrier's text, in the stream it follows."""
    strongest = max(dims, key=lambda d: abs(d.max_value))
    line = next(line for line in lifelines if line.dim == strongest.dim)
    return line.born_at, line.text, line.stream


def _state(lm: LoadedModel, inputs: dict[int, torch.Tensor], layer: int, text: int, stream: str, massive: list[Massive],
           tokens: dict[int, list[str]]) -> BirthState:
    """|a| of block ``layer``'s output on ``text`` (in ``stream``, with hyper-connections), and the dims massive there."""
    return state_of(block_output(lm, inputs[text], layer, stream), layer, text, stream, massive, tokens)


def state_of(output: torch.Tensor, layer: int, text: int, stream: str, massive: list[Massive],
             tokens: dict[int, list[str]]) -> BirthState:
    """The birth state from block ``layer``'s ``output`` on ``text`` ([positions, d_model], as ``block_output`` reads
    it): its |a|, and the dims massive there."""
    there = sorted({m.dim for m in massive if m.layer == layer and m.text == text and m.stream == stream})
    rows = [[float(f"{v:.4g}") for v in row] for row in output.abs().tolist()]
    return BirthState(layer=layer, text=text, tokens=tokens[text], dims=there, magnitude=rows)


TOKEN_TEXTS = 6  # texts in the token view: the carriers of the dims first, then the first ones
TOKEN_DIMS = 4  # the strongest dims
TOKEN_POSITIONS = 64  # the first tokens of each text


def token_values(lm: LoadedModel, inputs: dict[int, torch.Tensor], *, dims: list[DimSummary],
                 lifelines: list[Lifeline], read: dict[int, torch.Tensor] | None = None) -> TokenValues | None:
    """Each of the strongest massive dims at every block and token of a few texts (their carriers' first, from
    ``lifelines``), one forward pass per text: what the HTML page colours its tokens by. About TOKEN_TEXTS x TOKEN_DIMS
    x blocks x TOKEN_POSITIONS numbers. ``read``: each text's ``stream_dims`` read elsewhere (a streamed pass, for
    the texts and dims ``token_view``'s plan names); None: read here."""
    if not dims:
        return None
    strongest, texts = token_view(dims, [(line.dim, line.text) for line in lifelines], inputs)
    # with hyper-connections each dim in the stream its lifeline follows
    streams = [next(line.stream for line in lifelines if line.dim == dim) for dim in strongest] if lm.adapter.hyper is not None else []
    values = []
    for text in texts:
        # The whole text runs (a bidirectional model's first tokens see the rest); its first tokens are kept.
        stream = read[text] if read is not None else stream_dims(lm, inputs[text], strongest,
                                                                 [int(s[1:]) for s in streams] if streams else None)
        stream = stream[:, :TOKEN_POSITIONS]  # [blocks, positions, dims]
        values.append([[[float(f"{v:.3g}") for v in row] for row in stream[:, :, d].tolist()] for d in range(len(strongest))])
    return TokenValues(dims=strongest, texts=texts, values=values, streams=streams)


def token_view(dims: list[DimSummary], carriers: list[tuple[int, int]], inputs: dict[int, torch.Tensor]) -> tuple[list[int], list[int]]:
    """The token view's dims (the TOKEN_DIMS strongest) and texts (their carriers' first, then the first kept ones,
    TOKEN_TEXTS in all), from each dim's main carrier text (``carriers``: (dim, text) in the dims' order)."""
    strongest = [d.dim for d in sorted(dims, key=lambda d: -abs(d.max_value))[:TOKEN_DIMS]]
    first = [text for dim, text in carriers if dim in strongest]
    return strongest, list(dict.fromkeys(first + sorted(inputs)))[:TOKEN_TEXTS]


def _place(event: Event, tokens: list[list[str]]) -> dict:
    return dict(layer=event.layer, text=event.text, position=event.position, token=tokens[event.text][event.position],
                dim=event.dim, role=event.role)


def attribute(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, top: int) -> Attribution:
    here = lm.at(event.layer)
    weight_row, bias = down_row(here, lm.model, event.layer, event.dim)
    output = float(at[here.dense_site][event.dim])  # the neurons make the raw output; a norm or a scale may follow
    neurons, error, for_90 = contributions(at["mlp_act"], weight_row, bias, output, top)
    return Attribution(
        **_place(event, tokens),
        output=output,
        bias=bias,
        error=error,
        neurons=neurons,
        neurons_for_90pct=for_90,
        super_weight=super_weight(here, lm.model, event.layer, event.dim, neurons[0].neuron),
        weights=mlp_weight_stats(here, lm.model, event.layer),
        landed=float(at["mlp_out"][event.dim]) if here.reshapes("mlp_out") else None,
    )


def open_mlp(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, neurons: list[int]) -> Anatomy:
    here = lm.at(event.layer)
    points = anatomy_step.checkpoints({**at, "mlp_out": at[here.dense_site]}, here.gated)
    function = lm.adapter.activation(lm.model, event.layer)
    pre = at["mlp_gate"] if here.gated else at["mlp_up"]
    impact = anatomy_step.activation_impact(function, pre, at["mlp_up"] if here.gated else None, neurons)
    return Anatomy(
        **_place(event, tokens),
        checkpoints=points,
        explosion_point=anatomy_step.explosion_point(points),
        activation_impact=impact,
    )


