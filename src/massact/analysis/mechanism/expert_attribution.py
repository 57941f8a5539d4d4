"""A mixture-of-experts block's output at one dim for one token, split into experts and neurons, recomputed in float64
from the weights (the routing and the experts as ``massact.capture.routing`` recomputes them) and checked against the
block itself."""

from __future__ import annotations

import torch

from ...capture.routing import (
    MoeBlock,
    _shared_parts,
    block_output,
    expert_input,
    expert_parts,
    expert_weights,
    landing,
    route,
    shared_down_bias,
)
from .norms import centers, gain_and_bias, scale
from .results import ExpertContribution, ExpertNeuron, ExpertSuperWeight, MoeAttribution


def top_neurons(pre_gate: torch.Tensor, pre_up: torch.Tensor, activation: torch.Tensor, down_row: torch.Tensor,
                parts: torch.Tensor, output: float, top: int) -> list[ExpertNeuron]:
    """The ``top`` neurons by |contribution|, with share = contribution / ``output`` (the MoE output at dim)."""
    order = parts.abs().argsort(descending=True)[:top].tolist()
    return [ExpertNeuron(neuron=i, gate=float(pre_gate[i]), up=float(pre_up[i]), activation=float(activation[i]), weight=float(down_row[i]),
                         contribution=float(parts[i]), share=float(parts[i]) / output if output else float("nan"))
            for i in order]


def _rank(param: torch.Tensor, value: torch.Tensor) -> int:
    """1 + how many entries of ``param`` are larger in |w| than ``value``, counted one leading slice at a time."""
    threshold = value.abs().to(param.device, param.dtype)
    slices = param.detach() if param.dim() > 2 else param.detach().unsqueeze(0)
    return 1 + sum(int((part.abs() > threshold).sum()) for part in slices)


def _latent_unit(moe: MoeBlock, expert: int, dim: int, neuron: int) -> int:
    """The latent unit on the neuron's largest path into residual ``dim``: argmax over l of |W_out[dim, l] x
    W_down[e][l, neuron]| (its down projection writes the latent, which the out-projection carries into the stream)."""
    row, _ = landing(moe, dim)
    down = expert_weights(moe, expert)[2]  # [latent, d_mlp]
    return int((row * down[:, neuron].cpu()).abs().argmax())


def _super_weight(moe: MoeBlock, expert: int | None, dim: int, neuron: int) -> ExpertSuperWeight:
    if expert is None:
        down = moe.spec.shared.down
        matrix, index = f"{moe.shared_prefix}.{down}.weight", [dim, neuron]  # nn.Linear: [out, in]
        param = moe.shared.get_submodule(down).weight
    else:
        matrix = f"{moe.prefix}.{moe.spec.experts.path}.down_proj"
        # Latent experts write the latent: the entry is on the unit that carries most of the neuron's write into dim.
        row = _latent_unit(moe, expert, dim, neuron) if moe.latent_out is not None else dim
        index = [expert, neuron, row] if moe.spec.experts.transposed else [expert, row, neuron]
        param = moe.experts.down_proj
    value = param.detach()[tuple(index)]
    return ExpertSuperWeight(matrix=matrix, index=index, expert=expert, dim=dim, neuron=neuron, value=float(value),
                             rank=_rank(param, value), entries=param.numel())


def routed_input(moe: MoeBlock, x: torch.Tensor) -> torch.Tensor:
    """What the routed experts read of the block's input ``x`` [d_model] (float64): ``x`` itself, or where they sit
    beside a dense MLP, their own norm of it (linear in ``x`` given its normalisation factor, from its gain and bias)."""
    norm = moe.expert_norm
    if norm is None:
        return x
    gain, bias = gain_and_bias(norm, x.numel())
    centered = x - x.mean() if centers(norm) else x
    return float(scale(norm, x)) * centered * gain + bias


def attribute_moe(moe: MoeBlock, family: str, x: torch.Tensor, dim: int, top: int = 10, token_id: int | None = None) -> MoeAttribution:
    """Split the MoE block's output at residual ``dim`` for one token into experts and neurons.

    ``x`` is the block's input at that token, [d_model] (the router's: beside a dense MLP the experts read their norm
    of it). Experts are the ones the block's routing selects; every number is recomputed in float64 from the weights
    and the sum is checked against the block itself (``error``; beside a dense MLP, the experts' weighted sum). ``top``
    neurons are kept per expert. A hash-routed block (``Router.table``) chooses by the token's id ``token_id``, which
    it then needs.
    """
    if x.dim() != 1:
        raise ValueError(f"x must be one token's input vector [d_model], got shape {tuple(x.shape)}")
    x64 = x.detach().double().cpu()
    routing = route(moe, x64.unsqueeze(0), token_ids=None if token_id is None else torch.tensor([token_id]))
    on_input = moe.spec.router.on_input
    z = expert_input(moe, routed_input(moe, x64))  # the block's input (normed where beside a dense MLP), or a latent
    latent_row, latent_bias = landing(moe, dim)
    parts: list[tuple[ExpertContribution, tuple[torch.Tensor, ...]]] = []
    for expert, weight in zip(routing.indices[0].tolist(), routing.weights[0].tolist()):
        gate, up, activation, down, down_bias = expert_parts(moe, expert, z * weight if on_input else z)
        scale = 1.0 if on_input else weight  # Llama-4: the weight is already inside the activations
        # What each neuron writes into dim: its down column's entry there, or through the latent out-projection's row.
        writes = down[dim] if latent_row is None else latent_row @ down
        bias = 0.0 if down_bias is None else float(down_bias[dim] if latent_row is None else latent_row @ down_bias)
        output = float(writes @ activation) + bias
        neuron_parts = scale * activation * writes
        entry = ExpertContribution(expert=expert, router_logit=float(routing.logits[0, expert]),
                                   router_prob=float(routing.scores[0, expert]),
                                   router_weight=weight, output=output, contribution=scale * output, share=0.0)
        parts.append((entry, (gate, up, activation, neuron_parts, writes, scale * bias)))
    shared = None
    if moe.shared is not None:
        gate, up, activation, down, logit, scale = _shared_parts(moe, x64)
        bias = shared_down_bias(moe, dim)
        output = float(down[dim] @ activation) + bias
        shared = ExpertContribution(expert=None, router_logit=logit, router_prob=scale, router_weight=scale, output=output,
                                    contribution=scale * output, share=0.0)
        parts.append((shared, (gate, up, activation, scale * activation * down[dim], down[dim], scale * bias)))

    total = sum(entry.contribution for entry, _ in parts) + latent_bias
    actual = float(block_output(moe, x, token_id)[dim])
    for entry, (gate, up, activation, neuron_parts, down_row, bias_part) in parts:
        entry.share = entry.contribution / total if total else float("nan")
        entry.neurons = top_neurons(gate, up, activation, down_row, neuron_parts, total, top)
        entry.neuron_error = abs(float(neuron_parts.sum()) + bias_part - entry.contribution) / max(abs(entry.contribution), 1e-12)

    best = max((entry for entry, _ in parts), key=lambda entry: abs(entry.contribution))
    routed = sorted((entry for entry, _ in parts if entry.expert is not None), key=lambda e: -e.router_weight)
    return MoeAttribution(
        dim=dim, family=family, output=total, actual=actual, bias=latent_bias, error=abs(total - actual) / max(abs(actual), 1e-12),
        experts=routed,
        shared_expert=shared, top_expert=best.expert, neurons=best.neurons,
        super_weight=_super_weight(moe, best.expert, dim, best.neurons[0].neuron),
        gated=moe.spec.shared.gated if best.expert is None else moe.spec.experts.gated,
    )
