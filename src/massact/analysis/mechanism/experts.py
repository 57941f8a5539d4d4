"""Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"): the few
experts whose outputs are far larger than every other expert's, found from each expert's largest |output| over the
corpus (the scan keeps it: ``massact.capture.experts``), by the paper's rule.

An expert is a super expert when its maximum is above the ``quantile`` (99.5%) of every (block, expert) maximum, above
``fraction`` (a tenth) of the largest, and its block in the first ``depth`` (three quarters) of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class SuperExpert:
    """An expert of block ``layer`` whose largest |output| over the corpus (before its router weight) is
    ``max_output``."""

    layer: int
    expert: int
    max_output: float


@dataclass(kw_only=True)
class SuperExpertRule:
    """The rule's three numbers (settings ``super_expert_quantile``, ``_fraction``, ``_depth``) and the threshold they
    gave: max(the quantile of all maxima, fraction x the largest), in blocks before depth x the block count."""

    quantile: float
    fraction: float
    depth: float
    threshold: float
    last_block: int


@dataclass(kw_only=True)
class ExpertPruning:
    """The model with ``pruned`` experts ([block, expert] pairs) never routed to (the router chooses among the
    others; a softmax renormalises over them): ``kind`` "super" (the super experts) or "random" (as many experts of the
    same blocks, chosen with a fixed seed among the others). ``perplexity`` on the evaluation text (and its ratio to
    the unmodified model's); ``massive_dims``: the report's massive dims still massive at their blocks and carriers;
    per block, the mean attention on the sink tokens before and after (``sink_before``, ``sink_after``; null where a
    block has no softmax attention) and ``sink_decay`` = 1 - after / before, summed over the blocks that had a sink
    (every softmax block where none had one): the paper's attention-sink decay."""

    kind: str
    pruned: list[list[int]]
    perplexity: float | None
    perplexity_ratio: float | None
    massive_dims: list[int]
    sink_decay: float | None = None
    sink_before: list[float] = field(default_factory=list)
    sink_after: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class SuperExperts:
    """``found``: the super experts by the rule, largest first; ``profile``: every (block, expert) maximum [blocks,
    experts] (null for a dense block or an expert never routed to); ``shared``: per block the shared expert's maximum
    (null without one), listed apart; ``pruning``: what pruning the super experts and a random control does (with
    verification)."""

    found: list[SuperExpert]
    profile: list[list[float]]
    shared: list[float]
    rule: SuperExpertRule
    pruning: list[ExpertPruning] = field(default_factory=list)


def find(routed: torch.Tensor, shared: torch.Tensor, quantile: float, fraction: float, depth: float) -> SuperExperts:
    """The super experts of a [blocks, experts] profile of maxima (-inf where none) by the rule."""
    n_layers = routed.shape[0]
    values = routed[torch.isfinite(routed)].double()
    last = max(0, int(depth * n_layers) - 1) if n_layers else 0
    threshold = max(float(torch.quantile(values, quantile)), fraction * float(values.max())) if len(values) else float("inf")
    found = [SuperExpert(layer=int(layer), expert=int(expert), max_output=float(routed[layer, expert]))
             for layer, expert in (routed >= threshold).nonzero().tolist() if layer <= last]
    found.sort(key=lambda s: -s.max_output)
    nan = lambda t: torch.where(torch.isfinite(t), t, torch.full_like(t, float("nan"))).tolist()  # noqa: E731
    return SuperExperts(found=found, profile=nan(routed), shared=nan(shared),
                        rule=SuperExpertRule(quantile=quantile, fraction=fraction, depth=depth, threshold=threshold, last_block=last))


def control(found: list[SuperExpert], experts: int, seed: int = 0) -> list[list[int]]:
    """As many experts as ``found`` in each of their blocks, chosen at random (a fixed ``seed``) among the others."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for layer in sorted({s.layer for s in found}):
        taken = {s.expert for s in found if s.layer == layer}
        others = [e for e in range(experts) if e not in taken]
        order = torch.randperm(len(others), generator=generator).tolist()[: len(taken)]
        chosen += [[layer, others[i]] for i in sorted(order)]
    return chosen
