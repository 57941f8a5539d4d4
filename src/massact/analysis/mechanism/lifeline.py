"""The whole life of a massive dim at its main carrier: what every block adds and takes off, and the phases that
makes (precursor, birth, growth, hold, erasure), each with the sublayer responsible."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...capture.hooks import tap
from ...capture.streams import probe_streams
from ...models.loading import LoadedModel
from ...settings import Criterion
from ..detect.results import DimSummary, Findings, Massive
from .origin import removal_cause
from .results import WRITERS, WRITING, Lifeline, LifelineStep, Phase
from .streams import stream_terms

PHASE_SHARE = 0.1  # a block grows or erases the value when it adds or takes off 10% of the peak (of the precursor before birth)
HOLD_SHARE = 0.5  # after birth, a quiet block holds the value while it stays above half of its largest value so far
_DOWN = ("precursor erasure", "erasure")  # phases that take the value off


def phase_direction(phase: str, sign: int, precursor: float) -> float:
    """+1 or -1: the way a block of ``phase`` pushes the value (``sign``: the value's sign at that block, after any
    reversal, the new one). A precursor's phases follow the precursor's sign; erasures push against the sign."""
    toward = (1 if precursor >= 0 else -1) if phase.startswith("precursor") else sign
    return -toward if phase in _DOWN else toward


def step_sign(line: Lifeline, layer: int) -> int:
    """The value's sign at ``layer`` after birth: ``line.sign``, turned over by each reversal up to that block."""
    turns = sum(1 for step in line.steps[: layer + 1] if step.phase == "reversal")
    return line.sign * (-1) ** turns


def _writer(step: LifelineStep, post_ln: bool, direction: float) -> str:
    """The term that moved the value most in ``direction``: attn, mlp, a per-layer input (ple), or what is left of the
    change: both LayerNorms together (post-LN), or the block's output scale (scale); with hyper-connections, the stream mixing (mix)."""
    branches = step.attn + step.mlp + (step.ple or 0.0)
    rest = step.change - branches
    parts = {"attn": step.attn, "mlp": step.mlp, "norm": rest if post_ln else 0.0, "ple": step.ple or 0.0,
             "scale": rest if step.scale is not None else 0.0,
             "mix": step.mix if step.mix is not None else 0.0}
    return max(WRITERS, key=lambda name: parts[name] * direction)


def main_carrier(massive: list[Massive], dim: int) -> Massive:
    """The entry where ``dim`` is largest over every block and text: its lifeline is followed at that place."""
    return max((m for m in massive if m.dim == dim), key=lambda m: (abs(m.value), -m.text, -m.position, -m.layer))


def lifeline_sites(lm: LoadedModel) -> tuple[str, ...]:
    """The sites a lifeline reads: the block's input, both branches as they land, the stream, the block output, in
    post-LN blocks the sum before the first LayerNorm and its output, and a per-layer input's branch where it writes
    (a block reads those it has)."""
    extra = ("attn_sum", "resid_mid") if lm.adapter.post_ln else ("ple_out",) if "ple_out" in lm.adapter.sites else ()
    return tuple(dict.fromkeys(("resid_in", "attn_out", "mlp_out", lm.adapter.stream, "resid_out") + extra))


@torch.no_grad()
def read_lifelines(lm: LoadedModel, input_ids: torch.Tensor, position: int, dims: list[int]) -> dict[str, torch.Tensor]:
    """{site: [n_layers, len(dims)] float64 on CPU}: every block's value of each lifeline site at (position, dims) of
    one text, in one forward pass; 0 at a block without that branch (a block of one sublayer writes nothing there)."""
    n_layers = len(lm.adapter.blocks(lm.model))
    sites = lifeline_sites(lm)
    kept: dict[tuple[int, str], torch.Tensor] = {}
    index = torch.tensor(dims)

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        kept[layer, site] = hidden[0, position].index_select(0, index.to(hidden.device)).double()

    requests = [(layer, site) for layer in range(n_layers) for site in sites if site in lm.at(layer).sites]
    with tap(lm.model, lm.adapter, requests, keep):
        lm.model(input_ids=input_ids.to(lm.device), use_cache=False)
    none = torch.zeros(len(dims), dtype=torch.float64)
    return {site: torch.stack([kept[layer, site].cpu() if (layer, site) in kept else none for layer in range(n_layers)])
            for site in sites}


def build_lifeline(
    values: dict[str, list[float]], stream: str, medians: list[float], criterion: Criterion, summary: DimSummary, carrier: Massive,
    post_ln: bool, scales: list[float] | None = None,
) -> Lifeline:
    """The lifeline of one dim from its per-block site values (``values[site][layer]``, see ``read_lifelines``);
    ``scales``: each block's output scale, where the blocks have one (value = scale x (resid_in + the branches))."""
    n = len(medians)
    value = values[stream]
    embedding = values["resid_in"][0]
    steps, error, previous = [], 0.0, embedding
    for layer in range(n):
        attn, mlp, resid_in = values["attn_out"][layer], values["mlp_out"][layer], values["resid_in"][layer]
        # Post-LN: the block's first LayerNorm moves the value between the attention sum and the MLP's input.
        norm = values["resid_mid"][layer] - values["attn_sum"][layer] if post_ln else None
        ple = values["ple_out"][layer] if "ple_out" in values else None
        scale = scales[layer] if scales is not None else None
        mix = values["mix"][layer] if "mix" in values else None  # hyper-connections: the stream-mixing's change
        terms = [resid_in, attn, mlp] + ([norm] if post_ln else []) + [part for part in (ple, mix) if part is not None]
        error = max(error, abs(sum(terms) * (scale or 1.0) - value[layer]) / max(*map(abs, terms), abs(value[layer]), 1e-12))
        massive = criterion.is_massive(value[layer], medians[layer])
        step = LifelineStep(layer=layer, resid_in=resid_in, attn=attn, mlp=mlp, value=value[layer], resid_out=values["resid_out"][layer],
                            change=value[layer] - previous, writer="", median=medians[layer], massive=massive, phase="", norm=norm,
                            ple=ple, scale=scale, mix=mix)
        # What changed the value since the previous block: the branches, and in post-LN blocks both LayerNorms (the
        # previous block's last one, which made resid_in, and this block's first). A phase judges it again below.
        step.writer = _writer(step, post_ln, 1.0 if step.change >= 0 else -1.0)
        steps.append(step)
        previous = value[layer]

    born = summary.born_at
    # The value's sign is its sign where it is first massive at this carrier (the birth block, or after it when this
    # carrier grows massive later): an eraser that overshoots through zero must not turn the sign over.
    first = next((s.layer for s in steps[born:] if s.massive), born)
    sign = 1 if value[first] >= 0 else -1
    peak_layer = max(range(born, n), key=lambda layer: value[layer] * sign)
    peak = value[peak_layer]
    before = max(range(born), key=lambda layer: abs(value[layer]), default=None)
    precursor = value[before] if before is not None else 0.0
    has_precursor = abs(precursor) >= criterion.min_abs
    running, current = 0.0, sign
    for step in steps:
        if step.layer < born:
            toward = step.change * (1 if precursor >= 0 else -1)
            if has_precursor and toward >= PHASE_SHARE * abs(precursor):
                step.phase = "precursor"
            elif has_precursor and toward <= -PHASE_SHARE * abs(precursor):
                step.phase = "precursor erasure"
        elif step.layer == born:
            step.phase = "birth"
        elif step.massive and step.value * current < 0:  # massive again, with the other sign: a new life
            step.phase, current, running = "reversal", -current, 0.0
        elif step.change * current >= PHASE_SHARE * abs(peak):
            step.phase = "growth"
        elif step.change * current <= -PHASE_SHARE * abs(peak):
            step.phase = "erasure"
        else:
            step.phase = "hold" if step.value * current >= HOLD_SHARE * running else "after"
        if step.layer >= born:
            running = max(running, step.value * current)
        if step.phase in WRITING:  # judged in the phase's own direction, as the origin judges the same block
            step.writer = _writer(step, post_ln, phase_direction(step.phase, current, precursor))

    causes = [removal_cause(value[r], medians[r - 1], criterion) for r in summary.removed_at]
    return Lifeline(
        dim=summary.dim, text=carrier.text, position=carrier.position, token=carrier.token, sign=sign, born_at=born, peak=peak,
        peak_layer=peak_layer, precursor=precursor, precursor_layer=before if has_precursor else None, steps=steps,
        phases=phases(steps, embedding), removed_at=list(summary.removed_at), removal_causes=causes,
        erased_at=[s.layer for s in steps if s.phase == "erasure"], embedding=embedding, error=error,
    )


def phases(steps: list[LifelineStep], embedding: float) -> list[Phase]:
    """Runs of consecutive blocks with one phase (and, where it writes, one writer), with their total change."""
    runs: list[Phase] = []
    for step in steps:
        if not step.phase:
            continue
        writer = step.writer if step.phase not in ("hold", "after") else ""
        last = runs[-1] if runs else None
        if last and last.name == step.phase and last.writer == writer and last.last == step.layer - 1 and step.phase != "birth":
            last.last, last.change, last.value_after = step.layer, last.change + step.change, step.value
        else:
            before = steps[step.layer - 1].value if step.layer else embedding
            runs.append(Phase(name=step.phase, first=step.layer, last=step.layer, writer=writer, change=step.change, value_before=before,
                              value_after=step.value))
    return runs


def writers(line: Lifeline) -> list[tuple[int, str]]:
    """(block, phase) of every block the lifeline names as a main writer or eraser, in depth order."""
    return [(step.layer, step.phase) for step in line.steps if step.phase in WRITING]


def origin_layers(line: Lifeline) -> list[int]:
    """With hyper-connections: the blocks whose stream origin is read for ``line``: every block it names as a writer,
    and the block after birth (where the mixing carries it on)."""
    after = {line.born_at + 1} if line.born_at + 1 < len(line.steps) else set()
    return sorted({layer for layer, _ in writers(line)} | after)


def stream_carrier(findings: Findings, dim: int) -> tuple[Massive, int]:
    """With hyper-connections: the entry ``dim``'s lifeline is followed at (where it is largest among the streams
    themselves, else among every entry) and the stream it is followed in."""
    carrier = main_carrier([m for m in findings.massive if m.stream != "read"] or findings.massive, dim)
    return carrier, int(carrier.stream[1:]) if carrier.stream != "read" else 0


def stream_carrier_groups(findings: Findings) -> dict[tuple[int, int], list[int]]:
    """With hyper-connections: (text, position) of each dim's ``stream_carrier`` -> the dims it carries, each group
    read in one pass."""
    groups: dict[tuple[int, int], list[int]] = {}
    for summary in findings.dims:
        carrier, _ = stream_carrier(findings, summary.dim)
        groups.setdefault((carrier.text, carrier.position), []).append(summary.dim)
    return groups


_STREAM_SITES = ("resid_in", "attn_out", "mlp_out", "resid_out")  # what a stream lifeline reads of a block, at its dims


def stream_lifeline_reads(probe: dict[str, torch.Tensor], dims: list[int]) -> dict[str, torch.Tensor]:
    """What the stream lifelines of ``dims`` read of one block's ``probe_streams``: its sites at ``dims`` (the last
    axis narrowed to them, in that order: column i is ``dims[i]``) and its write and mixing weights."""
    index = torch.tensor(dims)
    return {name: value.index_select(-1, index) if name in _STREAM_SITES else value for name, value in probe.items()
            if name in _STREAM_SITES or name.endswith(("_write", "_mix"))}


def stream_lifelines(lm: LoadedModel, findings: Findings, inputs: dict[int, torch.Tensor],
                     reads: Mapping[tuple[int, int], dict[int, dict[str, torch.Tensor]]] | None = None) -> list[Lifeline]:
    """With hyper-connections: one lifeline per massive dim, followed in the stream of its main carrier (the entry
    where it is largest among the streams themselves), against that stream's medians. Per block the stream's value is
    its input value + the mixing's change + the attention's and the MLP's writes into it
    (``massact.analysis.mechanism.streams``). Dims that share a carrier share its forward pass. ``reads``: each
    carrier group's (``stream_carrier_groups``) ``stream_lifeline_reads`` of every block, read elsewhere, e.g. by a
    streamed pass; None: read here."""
    n_layers = len(lm.adapter.blocks(lm.model))
    found: dict[int, Lifeline] = {}
    for (text, position), group in stream_carrier_groups(findings).items():
        if reads is not None:
            read = reads[text, position]
        else:
            probes = probe_streams(lm, inputs[text], list(range(n_layers)), [position])
            read = {layer: stream_lifeline_reads(probe, group) for layer, probe in probes.items()}
        for column, dim in enumerate(group):
            summary = next(s for s in findings.dims if s.dim == dim)
            carrier, stream = stream_carrier(findings, dim)
            values: dict[str, list[float]] = {name: [] for name in ("resid_in", "attn_out", "mlp_out", "mix", "resid_out")}
            for layer in range(n_layers):
                terms = {term.source: term.value for term in stream_terms(read[layer], stream, column)}
                own = float(read[layer]["resid_in"][0, stream, column])
                values["resid_in"].append(own)
                values["attn_out"].append(terms.pop("attn"))
                values["mlp_out"].append(terms.pop("mlp"))
                values["mix"].append(sum(terms.values()) - own)
                values["resid_out"].append(float(read[layer]["resid_out"][0, stream, column]))
            line = build_lifeline(values, "resid_out", findings.stream_medians(f"s{stream}"), findings.criterion, summary, carrier,
                                  post_ln=False)
            line.stream = f"s{stream}"
            found[dim] = line
    return [found[summary.dim] for summary in findings.dims]


def carrier_groups(findings: Findings) -> dict[tuple[int, int], list[int]]:
    """(text, position) of each main carrier -> the massive dims it carries: the lifelines read in one pass each."""
    groups: dict[tuple[int, int], list[int]] = {}
    for summary in findings.dims:
        carrier = main_carrier(findings.massive, summary.dim)
        groups.setdefault((carrier.text, carrier.position), []).append(summary.dim)
    return groups


def lifelines(lm: LoadedModel, findings: Findings, inputs: dict[int, torch.Tensor],
              reads: Mapping[tuple[int, int], dict[str, torch.Tensor]] | None = None) -> list[Lifeline]:
    """One lifeline per massive dim of ``findings``; dims that share a main carrier share its forward pass (``inputs``:
    the kept windows' token ids). ``reads``: each carrier group's site values (``carrier_groups``, as
    ``read_lifelines`` gives them) read elsewhere, e.g. by a streamed pass; None: read here."""
    dims, massive, medians, criterion = findings.dims, findings.massive, findings.medians, findings.criterion
    carriers = {summary.dim: main_carrier(massive, summary.dim) for summary in dims}
    n_layers = len(lm.adapter.blocks(lm.model))
    scaled = any(lm.at(layer).output_scale is not None for layer in range(n_layers))
    scales = [lm.adapter.scale_of(lm.model, layer) for layer in range(n_layers)] if scaled else None
    found: dict[int, Lifeline] = {}
    for (text, position), group in carrier_groups(findings).items():
        read = reads[text, position] if reads is not None else read_lifelines(lm, inputs[text], position, group)
        for column, dim in enumerate(group):
            summary = next(s for s in dims if s.dim == dim)
            values = {site: tensor[:, column].tolist() for site, tensor in read.items()}
            found[dim] = build_lifeline(values, lm.adapter.stream, medians, criterion, summary, carriers[dim],
                                        lm.adapter.post_ln, scales)
    return [found[summary.dim] for summary in dims]
