"""The neuron attribution and super weight section: split a massive MLP output into neuron contributions and find the super weight."""

from __future__ import annotations

import torch

from ...models.adapters.base import Adapter, bias_of
from .results import NeuronContribution, SuperWeight, WeightStats


def contributions(
    activations: torch.Tensor, weight_row: torch.Tensor, bias: float, output: float, top: int
) -> tuple[list[NeuronContribution], float, int]:
    """output[dim] = sum_i act_i x W[dim, i] + bias. Returns the ``top`` neurons by |contribution|,
    the relative error of the sum against the recorded output, and how many neurons (strongest toward the
    output's sign first) it takes to reach 90% of output - bias."""
    act, weight = activations.double(), weight_row.double()
    parts = act * weight
    total = float(parts.sum()) + bias
    error = abs(total - output) / max(abs(output), 1e-12)
    order = parts.abs().argsort(descending=True)[:top].tolist()
    neurons = [
        NeuronContribution(neuron=i, activation=float(act[i]), weight=float(weight[i]), contribution=float(parts[i]),
                           share=float(parts[i]) / output if output else float("nan"))
        for i in order
    ]
    sign = 1.0 if output - bias >= 0 else -1.0
    running = (parts * sign).sort(descending=True).values.cumsum(0)
    reached = (running >= 0.9 * abs(output - bias)).nonzero()
    return neurons, error, int(reached[0]) + 1 if len(reached) else parts.numel()


def super_weight(adapter: Adapter, model: torch.nn.Module, layer: int, dim: int, neuron: int) -> SuperWeight:
    """The down projection's entry from ``neuron`` into ``dim``, with its rank among all |entries| of the matrix."""
    down = adapter.module(model, layer, adapter.mlp_down)
    value = adapter.weight_out_in(down)[dim, neuron].detach()
    rank = int((down.weight.detach().abs() > value.abs()).sum()) + 1
    row, col = adapter.stored_index(down, dim, neuron)
    return SuperWeight(matrix=adapter.param_name(model, layer, adapter.mlp_down), row=row, col=col, value=float(value), rank=rank,
                       entries=down.weight.numel())


def mlp_weight_stats(adapter: Adapter, model: torch.nn.Module, layer: int) -> list[WeightStats]:
    """max |w| with its (row, col) as stored, and mean |w|, for each MLP projection (the seed's weight table); a fused
    gate-and-up projection is one matrix."""
    stats = []
    for path in dict.fromkeys(p for p in (adapter.mlp_gate, adapter.mlp_up, adapter.mlp_down) if p is not None):
        weight = adapter.module(model, layer, path).weight.detach()
        magnitude = weight.abs()
        flat = int(magnitude.argmax())
        stats.append(
            WeightStats(
                matrix=adapter.param_name(model, layer, path),
                shape=list(weight.shape),
                max=float(magnitude.flatten()[flat]),
                argmax=[flat // weight.shape[1], flat % weight.shape[1]],
                mean=float(magnitude.float().mean()),
            )
        )
    return stats


def down_row(adapter: Adapter, model: torch.nn.Module, layer: int, dim: int) -> tuple[torch.Tensor, float]:
    """W_down[dim, :] (one weight per neuron) and bias[dim] (0 without bias), on CPU in float64."""
    down = adapter.module(model, layer, adapter.mlp_down)
    bias = bias_of(down)
    return adapter.weight_out_in(down)[dim].detach().double().cpu(), float(bias[dim]) if bias is not None else 0.0
