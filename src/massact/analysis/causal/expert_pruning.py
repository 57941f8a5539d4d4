"""Super experts verified by pruning (Su et al. 2025): the model with its super experts never routed to, against a
control that prunes as many random experts of the same blocks (seeded): the perplexity, the massive dims left, and the
attention on the sink tokens before and after."""

from __future__ import annotations

import math
from functools import partial

import torch

from ...capture.routing import MoeBlock, pruned_experts
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..detect.results import Findings
from ..evaluation.embeddings import EmbeddingEvaluation
from ..evaluation.windows import Evaluation
from ..function.sinks import SinkPass, sink_blocks, sink_pass, sink_texts
from ..mechanism.results import ExpertPruning, Mechanism
from ..mechanism.super_experts import control
from .verification import InMemory, Lane, Measured, Read


def prune_super_experts(lm: LoadedModel, inputs: dict[int, torch.Tensor], evaluation: Evaluation | EmbeddingEvaluation,
                        findings: Findings, mechanism: Mechanism, settings: ScanSettings) -> list[ExpertPruning]:
    """A row for the mechanism's super experts pruned and one for the random control (none where no super expert was
    found), scored on ``evaluation``. Each says which of the scan's massive dims stay massive at their main carriers
    (the mechanism's lifelines) and what happens to the attention on the sink tokens (``sink_tokens`` of the findings;
    a head attends to a sink above ``settings.sink_epsilon``)."""
    lanes = pruning_lanes(lm, findings, mechanism, scored=isinstance(evaluation, Evaluation))
    if not lanes:
        return []
    epsilon = settings.sink_epsilon
    sinks = sink_texts(findings)[0]
    before = sink_pass(lm, inputs, sinks, epsilon) if sinks else None
    measure = InMemory(lm, inputs, evaluation, findings, "")
    rows = []
    for pairs, lane in lanes:
        measured = measure.measure(lane)
        with lane.context():
            after = sink_pass(lm, inputs, sinks, epsilon) if before is not None else None
        rows.append(pruning_from(lane, pairs, measured, evaluation.baseline if lane.scored else None, findings, before, after))
    return rows


def pruning_lanes(lm: LoadedModel, findings: Findings, mechanism: Mechanism, scored: bool) -> list[tuple[list[list[int]], Lane]]:
    """The [block, expert] pairs and lane of the super experts pruned (role "super") and of as many random experts of
    the same blocks (seeded; "random"), each
    from the first block it prunes in, reading every massive dim at its main carrier at every block it persists in;
    none where the mechanism found no super expert."""
    found = mechanism.super_experts
    if found is None or not found.found:
        return []
    experts = MoeBlock.at(lm, found.found[0].layer).n_experts
    reads = tuple(Read(text=line.text, layers=tuple(summary.persists), position=line.position, dim=summary.dim)
                  for summary, line in zip(findings.dims, mechanism.lifelines))
    lanes = []
    for kind, pairs in (("super", sorted([s.layer, s.expert] for s in found.found)), ("random", control(found.found, experts))):
        by_layer: dict[int, list[int]] = {}
        for layer, expert in pairs:
            by_layer.setdefault(layer, []).append(expert)
        lanes.append((pairs, Lane(role=kind, name=f"prune {kind} experts {pairs}", target=f"prune {sorted(by_layer.items())}",
                          context=partial(pruned_experts, lm, by_layer), start=min(by_layer), reads=reads, scored=scored)))
    return lanes


def pruning_from(lane: Lane, pairs: list[list[int]], measured: Measured, baseline: float | None, findings: Findings,
                 before: SinkPass | None, after: SinkPass | None) -> ExpertPruning:
    """The pruning row of a measured lane: its score against ``baseline``, the dims still massive at some block where
    they were (against the findings' medians), and the sink attention ``before`` and ``after`` (None: not measured)."""
    perplexity = measured.perplexity
    left = [read.dim for read in lane.reads
            if any(findings.criterion.is_massive(measured.values[read][layer], findings.medians[layer]) for layer in read.layers)]
    per_block = lambda found: [float(v) for v in found.share.nanmean(dim=1)] if found is not None else []
    sink_before, sink_after = per_block(before), per_block(after)
    # Over the blocks that had a sink (all softmax blocks where none had one): where the sink is, not diluted.
    blocks = sink_blocks(before.rate) if before is not None else []
    measured_blocks = [(b, a) for layer, (b, a) in enumerate(zip(sink_before, sink_after))
                       if not (math.isnan(b) or math.isnan(a)) and (layer in blocks or not blocks)]
    total = sum(b for b, _ in measured_blocks)
    decay = 1 - sum(a for _, a in measured_blocks) / total if measured_blocks and total > 0 else None
    return ExpertPruning(kind=lane.role, pruned=pairs, perplexity=perplexity,
                         perplexity_ratio=perplexity / baseline if perplexity is not None and baseline else None,
                         massive_dims=left, sink_decay=decay, sink_before=sink_before, sink_after=sink_after)
