"""Super experts verified by pruning (Su et al. 2025): the model with its super experts never routed to, against a
control that prunes as many random experts of the same blocks (seeded): the perplexity, the massive dims left, and the
attention on the sink tokens before and after."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...capture.edits import read_coordinate
from ...capture.routing import MoeBlock, pruned_experts
from ...models.loading import LoadedModel
from ...settings import Criterion, ScanSettings
from ..detect.results import DimSummary, Findings, Massive
from ..evaluation.embeddings import EmbeddingEvaluation
from ..evaluation.windows import Evaluation
from ..function.sinks import SINK_TEXTS, sink_blocks, sink_pass, sink_tokens
from ..mechanism.results import ExpertPruning, Lifeline, Mechanism
from ..mechanism.super_experts import control


def prune_super_experts(lm: LoadedModel, inputs: dict[int, torch.Tensor], evaluation: Evaluation | EmbeddingEvaluation,
                        findings: Findings, mechanism: Mechanism, settings: ScanSettings) -> list[ExpertPruning]:
    """A row for the mechanism's super experts pruned and one for the random control (none where no super expert was
    found), scored on ``evaluation``. Each says which of the scan's massive dims stay massive at their main carriers
    (the mechanism's lifelines) and what happens to the attention on the sink tokens (``sink_tokens`` of the findings;
    a head attends to a sink above ``settings.sink_epsilon``)."""
    found, epsilon = mechanism.super_experts, settings.sink_epsilon
    dims, lifelines, medians, criterion = findings.dims, mechanism.lifelines, findings.medians, findings.criterion
    massive, tokens = findings.massive, findings.tokens
    if found is None or not found.found:
        return []
    experts = MoeBlock.at(lm, found.found[0].layer).n_experts
    kinds = [("super", sorted([s.layer, s.expert] for s in found.found)), ("random", control(found.found, experts))]
    sinks = _sinks(massive, tokens)
    before = sink_pass(lm, inputs, sinks, epsilon) if sinks else None
    left = lambda: _massive_left(lm, inputs, dims, lifelines, medians, criterion)
    return [_pruning(lm, inputs, evaluation, epsilon, kind, pairs, sinks, before, left) for kind, pairs in kinds]


def _sinks(massive: list[Massive], tokens: dict[int, list[str]]) -> dict[int, list[int]]:
    """The sink positions per text, as the sink section measures them (up to SINK_TEXTS texts)."""
    found: dict[int, list[int]] = {}
    for token in sink_tokens(massive, tokens)[0]:
        found.setdefault(token.text, []).append(token.position)
    return dict(sorted(found.items())[:SINK_TEXTS])


def _pruning(lm: LoadedModel, inputs: dict[int, torch.Tensor], evaluation, epsilon: float, kind: str, pairs: list[list[int]],
             sinks: dict[int, list[int]], before, massive_left: Callable[[], list[int]]) -> ExpertPruning:
    by_layer: dict[int, list[int]] = {}
    for layer, expert in pairs:
        by_layer.setdefault(layer, []).append(expert)
    start = min(by_layer)
    with pruned_experts(lm, by_layer):
        perplexity = evaluation.score(start, key=f"prune {sorted(by_layer.items())}") if isinstance(evaluation, Evaluation) else None
        left = massive_left()
        after = sink_pass(lm, inputs, sinks, epsilon) if before is not None else None
    baseline = evaluation.baseline if isinstance(evaluation, Evaluation) else None
    per_block = lambda found: [float(v) for v in found.share.nanmean(dim=1)] if found is not None else []
    sink_before, sink_after = per_block(before), per_block(after)
    # Over the blocks that had a sink (all softmax blocks where none had one): where the sink is, not diluted.
    blocks = sink_blocks(before.rate) if before is not None else []
    measured = [(b, a) for layer, (b, a) in enumerate(zip(sink_before, sink_after))
                if not (math.isnan(b) or math.isnan(a)) and (layer in blocks or not blocks)]
    decay = 1 - sum(a for _, a in measured) / sum(b for b, _ in measured) if measured and sum(b for b, _ in measured) > 0 else None
    return ExpertPruning(kind=kind, pruned=pairs, perplexity=perplexity,
                         perplexity_ratio=perplexity / baseline if perplexity is not None and baseline else None,
                         massive_dims=left, sink_decay=decay, sink_before=sink_before, sink_after=sink_after)


def _massive_left(lm: LoadedModel, inputs: dict[int, torch.Tensor], dims: list[DimSummary], lifelines: list[Lifeline],
                  medians: list[float], criterion: Criterion) -> list[int]:
    """The scan's massive dims still massive, under whatever intervention is active, at some block where they were,
    at their main carriers."""
    left = []
    for summary, line in zip(dims, lifelines):
        values = read_coordinate(lm, inputs[line.text], summary.persists, line.position, summary.dim)
        if any(criterion.is_massive(values[layer], medians[layer]) for layer in summary.persists):
            left.append(summary.dim)
    return left
