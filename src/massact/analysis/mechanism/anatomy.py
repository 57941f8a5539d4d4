"""The MLP anatomy section: the MLP's checkpoints at one position, where top1/median explodes, and what the activation does."""

from __future__ import annotations

import torch

from ...models.adapters.base import ScaledInput
from .results import ActivationImpact, Checkpoint, NeuronActivation

SUPPRESSED = 0.1  # a neuron is suppressed when the activation leaves under 10% of its pre-activation magnitude


def checkpoint_order(gated: bool) -> list[tuple[str, str | None]]:
    """(checkpoint, the checkpoint it is compared with). The activation's input is the gate when gated, else up."""
    if gated:
        return [("mlp_in", None), ("mlp_gate", "mlp_in"), ("mlp_up", "mlp_in"), ("mlp_act", "mlp_gate"), ("mlp_out", "mlp_act")]
    return [("mlp_in", None), ("mlp_up", "mlp_in"), ("mlp_act", "mlp_up"), ("mlp_out", "mlp_act")]


def checkpoints(vectors: dict[str, torch.Tensor], gated: bool) -> list[Checkpoint]:
    """Statistics of |v| at each checkpoint; ``vectors`` maps site to a 1-D tensor at the position."""
    found: dict[str, Checkpoint] = {}
    for name, previous in checkpoint_order(gated):
        v = vectors[name].double()
        magnitude = v.abs()
        top = int(magnitude.argmax())
        maximum, median = float(magnitude[top]), float(magnitude.median())
        ratio = maximum / median if median > 0 else float("inf")
        before = found.get(previous)
        change = maximum - before.max if before else None
        found[name] = Checkpoint(
            name=name,
            size=v.numel(),
            max=maximum,
            argmax=top,
            value=float(v[top]),
            median=median,
            ratio=ratio,
            previous=previous,
            change=change,
            change_pct=100 * change / before.max if before and before.max else None,
            jump=ratio / before.ratio if before and before.ratio else None,
        )
    return list(found.values())


def explosion_point(points: list[Checkpoint]) -> str:
    """The checkpoint whose top1/median grows most over the checkpoint before it."""
    return max((p for p in points if p.jump is not None), key=lambda p: p.jump).name


def activation_impact(
    function: torch.nn.Module, pre: torch.Tensor, up: torch.Tensor | None, neurons: list[int]
) -> ActivationImpact:
    """Compare every neuron's value before and after the activation function, not only the maxima."""
    with torch.no_grad():
        post = function(pre.float()).double()
    pre = pre.double()
    product = post * up.double() if up is not None else post
    top = [
        NeuronActivation(neuron=i, before=float(pre[i]), after=float(post[i]), up=float(up[i]) if up is not None else None,
                         product=float(product[i]))
        for i in neurons
    ]
    return ActivationImpact(
        function=function.name if isinstance(function, ScaledInput) else type(function).__name__,
        neurons=pre.numel(),
        suppressed=int((post.abs() < SUPPRESSED * pre.abs()).sum()),
        flipped=int((pre * post < 0).sum()),
        kept_mass=float(post.abs().sum() / pre.abs().sum()),
        median_before=float(pre.abs().median()),
        median_after=float(post.abs().median()),
        top=top,
    )
