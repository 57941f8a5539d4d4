"""Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"): the few
experts whose outputs are far larger than every other expert's, found from each expert's largest |output| over the
corpus (the scan keeps it: ``massact.capture.expert_maxima``), by the paper's rule.

An expert is a super expert when its maximum is above the ``quantile`` (99.5%) of every (block, expert) maximum, above
``fraction`` (a tenth) of the largest, and its block in the first ``depth`` (three quarters) of the model.
"""

from __future__ import annotations

import torch

from .results import SuperExpert, SuperExpertRule, SuperExperts


def find_super_experts(routed: torch.Tensor, shared: torch.Tensor, quantile: float, fraction: float, depth: float) -> SuperExperts:
    """The super experts of a [blocks, experts] profile of maxima (-inf where none) by the rule."""
    n_layers = routed.shape[0]
    values = routed[torch.isfinite(routed)].double()
    last = max(0, int(depth * n_layers) - 1) if n_layers else 0
    threshold = max(float(torch.quantile(values, quantile)), fraction * float(values.max())) if len(values) else float("inf")
    found = [SuperExpert(layer=int(layer), expert=int(expert), max_output=float(routed[layer, expert]))
             for layer, expert in (routed >= threshold).nonzero().tolist() if layer <= last]
    found.sort(key=lambda s: -s.max_output)
    nan = lambda t: torch.where(torch.isfinite(t), t, torch.full_like(t, float("nan"))).tolist()
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
