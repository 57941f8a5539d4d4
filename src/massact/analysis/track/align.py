"""Pure functions: each checkpoint's report as a summary, the summaries aligned into one timeline (emergence,
events in order, role moves), and two checkpoints as a diff with the weight change at each super weight.

Massive dims are matched by index: dim 507 at one checkpoint is dim 507 at the next. A role move (the massive dim
changes, the writer neuron stays) is flagged, not merged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..deploy.results import Precision
from ..detect.results import DimSummary, Findings, LayerStats, Massive
from ..function.results import AttentionSinks
from ..mechanism.results import Attribution, Lifeline, Mechanism, Origin
from .results import BlockState, CheckpointState, Diff, DimState, DimTrack, RoleMove, Track, TrackSuperWeight, WeightChange

TOP_NEURONS = 3  # writer neurons kept per dim and checkpoint: enough to see the writer stay or change


def label(step: int | None, spec: str) -> str:
    """How the text names a checkpoint: "step 4000", or the spec where no step is known."""
    return f"step {step}" if step is not None else spec


def summarize(findings: Findings, mechanism: Mechanism, attention: AttentionSinks | None, precision: Precision | None,
              step: int | None, spec: str) -> CheckpointState:
    """One checkpoint's scan as the track sees it: its massive dims (each at its birth block, with its writer, neurons,
    super weight and phases), its blocks, its sink (``attention``: the causal stage's), its headroom and super experts.
    The checkpoint is ``step`` (None where unknown) of ``spec``; the caller names its report folder."""
    dims, massive, layers = findings.dims, findings.massive, findings.layers
    origin, attribution, lifelines, super_experts = mechanism.origin, mechanism.attribution, mechanism.lifelines, mechanism.super_experts
    return CheckpointState(
        step=step, spec=spec, label=label(step, spec), report=None,
        dims=[_dim_state(summary, massive, origin, attribution, lifelines) for summary in dims],
        blocks=block_states(layers, massive),
        sink_rate=None if attention is None else attention.overall_rate,
        first_sink_layer=None if attention is None else attention.first_sink_layer,
        headroom=None if precision is None else precision.headroom,
        super_experts=[] if super_experts is None else [[x.layer, x.expert] for x in super_experts.found],
    )


def block_states(layers: list[LayerStats], massive: list[Massive]) -> list[BlockState]:
    """Per block: top1 |a|, median |a|, ratio, massive entries (as listed in the report) and the top dim."""
    counts = {layer.layer: 0 for layer in layers}
    for entry in massive:
        counts[entry.layer] += 1
    return [BlockState(layer=layer.layer, top1=abs(layer.top[0].value) if layer.top else 0.0, median=layer.median,
                       ratio=layer.ratio, massive=counts[layer.layer], top_dim=layer.top[0].dim if layer.top else None)
            for layer in layers]


def _dim_state(summary: DimSummary, massive: list[Massive], origin: list[Origin], attribution: list[Attribution],
               lifelines: list[Lifeline]) -> DimState:
    dim = summary.dim
    entries = [m for m in massive if m.dim == dim]
    birth = next((o for o in origin if o.dim == dim and o.layer == summary.born_at and o.role == "birth"), None)
    at_birth = next((a for a in attribution if a.dim == dim and a.layer == summary.born_at), None)
    lifeline = next((line for line in lifelines if line.dim == dim), None)
    weight = None if at_birth is None else at_birth.super_weight
    return DimState(
        dim=dim, value=summary.max_value, ratio=max(m.ratio for m in entries), born_at=summary.born_at,
        writer=None if birth is None else birth.writer,
        neurons=[] if at_birth is None else [n.neuron for n in at_birth.neurons[:TOP_NEURONS]],
        super_weight=None if weight is None else TrackSuperWeight(matrix=weight.matrix, row=weight.row, col=weight.col,
                                                                  value=weight.value, rank=weight.rank),
        phases=[] if lifeline is None else [f"{p.name} {p.first}-{p.last}" for p in lifeline.phases],
    )


def dim_value(state: CheckpointState, dim: int, listed: Mapping[int, float] | None = None) -> float | None:
    """The dim's largest |a| at a checkpoint: as a massive dim, else among the listed largest entries
    (``listed``: dim -> |a|), else None (not among what the report keeps)."""
    found = next((d for d in state.dims if d.dim == dim), None)
    if found is not None:
        return abs(found.value)
    return None if listed is None else listed.get(dim)


def align(states: Sequence[CheckpointState], settings: dict, listed: Sequence[Mapping[int, float]] | None = None) -> Track:
    """The checkpoints (in training order) as one timeline. ``listed``: per checkpoint, dim -> the largest |a| the
    report lists for it in any block (so a dim's value shows before it is massive)."""
    listed = listed or [{} for _ in states]
    dims = sorted({d.dim for state in states for d in state.dims})
    tracks = []
    for dim in dims:
        first = next(state for state in states if any(d.dim == dim for d in state.dims))
        tracks.append(DimTrack(
            dim=dim, emerged_at=first.step if first.step is not None else first.spec,
            values=[dim_value(state, dim, seen) for state, seen in zip(states, listed)],
            born_at=[next((d.born_at for d in state.dims if d.dim == dim), None) for state in states],
        ))
    moves = role_moves(states)
    return Track(checkpoints=list(states), dims=tracks, events=events(states, moves), moves=moves, settings=settings)


def _writer_key(state: DimState) -> tuple[str, int] | None:
    """What writes the dim: the super weight's matrix and column (the writer neuron), or None where none is known."""
    if state.super_weight is not None:
        return state.super_weight.matrix, state.super_weight.col
    return None


def role_moves(states: Sequence[CheckpointState]) -> list[RoleMove]:
    """Between consecutive checkpoints: a dim that stops being massive and one that starts, written by the same
    neuron of the same matrix (the role moved to another dim)."""
    moves = []
    for before, after in zip(states, states[1:]):
        old = {d.dim: d for d in before.dims}
        new = {d.dim: d for d in after.dims}
        for gone in (d for dim, d in old.items() if dim not in new):
            for came in (d for dim, d in new.items() if dim not in old):
                key = _writer_key(gone)
                if key is not None and key == _writer_key(came):
                    moves.append(RoleMove(label_before=before.label, label_after=after.label, before=gone.dim, after=came.dim,
                                          shared=f"neuron {key[1]} of {key[0]}"))
    return moves


def events(states: Sequence[CheckpointState], moves: Sequence[RoleMove] = ()) -> list[str]:
    """What changes from one checkpoint to the next, in order, as sentences: the sink forming or going, a dim becoming
    massive (and where it is born), its birth block moving, its top super weight changing, a dim ceasing to be
    massive, a role move."""
    found: list[str] = []
    previous: CheckpointState | None = None
    for state in states:
        found += _sink_events(previous, state)
        found += _super_expert_events(previous, state)
        before = {} if previous is None else {d.dim: d for d in previous.dims}
        for dim in state.dims:
            old = before.get(dim.dim)
            weight = _coordinate(dim)
            if old is None:
                found.append(f"dim {dim.dim} becomes massive at {state.label} ({dim.value:+,.1f}, {dim.ratio:,.0f}x), "
                             f"born at block {dim.born_at}"
                             + (f", super weight {weight}" if weight else ""))
                continue
            if old.born_at != dim.born_at:
                found.append(f"dim {dim.dim}: its birth moves from block {old.born_at} to block {dim.born_at} at {state.label}")
            if weight and weight != _coordinate(old):
                found.append(f"dim {dim.dim}: {weight} is its top super weight from {state.label}")
        now = {d.dim for d in state.dims}
        found += [f"dim {dim} is no longer massive at {state.label}" for dim in sorted(set(before) - now)]
        found += [f"the role of dim {m.before} moves to dim {m.after} at {m.label_after} (same writer: {m.shared})"
                  for m in moves if m.label_after == state.label]
        previous = state
    return found


def _super_expert_events(previous: CheckpointState | None, state: CheckpointState) -> list[str]:
    """Super experts that appear or go between two checkpoints (whether post-training keeps them)."""
    before = {tuple(x) for x in previous.super_experts} if previous is not None else set()
    now = {tuple(x) for x in state.super_experts}
    return ([f"expert {e} of block {layer} is a super expert from {state.label}" for layer, e in sorted(now - before)]
            + [f"expert {e} of block {layer} is no longer a super expert at {state.label}" for layer, e in sorted(before - now)])


def _coordinate(dim: DimState) -> str:
    weight = dim.super_weight
    return "" if weight is None else f"{weight.matrix} [{weight.row}, {weight.col}]"


def _sink_events(previous: CheckpointState | None, state: CheckpointState) -> list[str]:
    had = previous is not None and previous.first_sink_layer is not None
    if state.first_sink_layer is not None and not had:
        return [f"the sink forms at {state.label} (first sink block {state.first_sink_layer}, sink rate {state.sink_rate:.0%})"]
    if had and state.first_sink_layer is None and state.sink_rate is not None:
        return [f"the sink is gone at {state.label}"]
    if had and state.first_sink_layer != previous.first_sink_layer:
        return [f"the first sink block moves from {previous.first_sink_layer} to {state.first_sink_layer} at {state.label}"]
    return []


def weight_change(dim: int, weight: TrackSuperWeight, before: torch.Tensor, after: torch.Tensor) -> WeightChange:
    """The change at ``weight``'s coordinate from matrix ``before`` to ``after`` (the same parameter at two
    checkpoints), against the mean |change| over the whole matrix."""
    delta = (after.float() - before.float()).abs()
    mean = float(delta.mean())
    old, new = float(before[weight.row, weight.col]), float(after[weight.row, weight.col])
    return WeightChange(dim=dim, matrix=weight.matrix, row=weight.row, col=weight.col, before=old, after=new, change=new - old,
                        matrix_mean_change=mean, relative=abs(new - old) / mean if mean > 0 else None)


def diff(before: CheckpointState, after: CheckpointState, matrices: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Diff:
    """Two checkpoints compared: the massive dims that persist, appear and vanish, the sink, and the weight change
    at every super weight of either checkpoint (``matrices``: parameter name -> (before, after) tensors)."""
    old, new = {d.dim: d for d in before.dims}, {d.dim: d for d in after.dims}
    weights: dict[tuple[str, int, int], WeightChange] = {}
    for dim in [*before.dims, *after.dims]:
        weight = dim.super_weight
        if weight is not None and weight.matrix in matrices and (weight.matrix, weight.row, weight.col) not in weights:
            weights[weight.matrix, weight.row, weight.col] = weight_change(dim.dim, weight, *matrices[weight.matrix])
    changes = list(weights.values())
    same_dims = old.keys() == new.keys() and all(old[d].born_at == new[d].born_at for d in old)
    unchanged = same_dims and all(c.change == 0 and c.matrix_mean_change == 0 for c in changes) and \
        _same_sink(before, after)
    return Diff(before=before.label, after=after.label, persist=sorted(old.keys() & new.keys()),
                appear=sorted(new.keys() - old.keys()), vanish=sorted(old.keys() - new.keys()),
                sink=_sink_diff(before, after), weights=changes, unchanged=unchanged)


def _same_sink(a: CheckpointState, b: CheckpointState) -> bool:
    return a.first_sink_layer == b.first_sink_layer and (a.sink_rate == b.sink_rate or a.sink_rate is None and b.sink_rate is None)


def _sink_diff(a: CheckpointState, b: CheckpointState) -> str:
    if a.sink_rate is None or b.sink_rate is None:
        return "not measured (run with --verify to measure the sink)"
    if a.first_sink_layer is None and b.first_sink_layer is None:
        return f"no sink in either (sink rate {a.sink_rate:.0%} -> {b.sink_rate:.0%})"
    if a.first_sink_layer is None or b.first_sink_layer is None:
        return f"the sink {'forms' if a.first_sink_layer is None else 'is gone'} (sink rate {a.sink_rate:.0%} -> {b.sink_rate:.0%})"
    return (f"the sink persists: first sink block {a.first_sink_layer} -> {b.first_sink_layer}, "
            f"sink rate {a.sink_rate:.0%} -> {b.sink_rate:.0%}")


def listed_values(layers: list[LayerStats]) -> dict[int, float]:
    """dim -> its largest |a| among every block's listed top entries (what the report keeps of dims not massive)."""
    found: dict[int, float] = {}
    for layer in layers:
        for entry in layer.top:
            if math.isfinite(entry.value):
                found[entry.dim] = max(found.get(entry.dim, 0.0), abs(entry.value))
    return found


def monitor_state(record: dict, spec: str) -> CheckpointState:
    """A monitor JSONL record (see ``massact.track.monitor``) as a checkpoint of the timeline: its blocks, and each
    dim that is the top dim of a block with massive entries, born at the first such block."""
    blocks = [BlockState(**{key: math.nan if value is None and key != "top_dim" else value for key, value in block.items()})
              for block in record["blocks"]]
    dims: dict[int, DimState] = {}
    for block in blocks:
        if block.massive and block.top_dim is not None:
            state = dims.setdefault(block.top_dim, DimState(dim=block.top_dim, value=0.0, ratio=0.0, born_at=block.layer))
            if block.top1 > abs(state.value):
                state.value, state.ratio = block.top1, block.ratio
    step = record["step"]
    return CheckpointState(step=step, spec=spec, label=label(step, spec), dims=list(dims.values()), blocks=blocks)
