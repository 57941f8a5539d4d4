"""Mixture-of-experts attribution: split a sparse-MoE block's output at one dim into experts and their neurons.

transformers 5 stores all routed experts of a block in fused 3-D parameters (``experts.gate_up_proj`` and
``experts.down_proj``), so there is no per-expert ``nn.Linear`` a hook could see inside. This module recomputes the
block from its weights in float64 for one token and checks the sum against the block itself:

    moe(x)[dim] = sum over selected experts e of  w_e x expert_e(x)[dim]          (routed experts)
                  + sigmoid(g . x) x shared(x)[dim]                               (Qwen2-MoE's shared expert)
    expert_e(x)[dim] = sum_i act(gate_e,i . x) x (up_e,i . x) x W_down[e][dim, i]

Routing, as the supported families compute it (softmax over all experts, then top-k):

- Mixtral: w = softmax(router . x)[top-k], always renormalised to sum to 1 over the selected experts.
- Qwen2-MoE: the same, renormalised only when ``norm_topk_prob``; plus a shared expert on every token, scaled by
  sigmoid(shared_expert_gate . x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Sparse-MoE block class name -> where its renormalisation rule lives (True: always; str: the router's attribute).
_FAMILIES: dict[str, bool | str] = {
    "MixtralSparseMoeBlock": True,
    "Qwen2MoeSparseMoeBlock": "norm_topk_prob",
}


@dataclass(kw_only=True)
class ExpertNeuron:
    """One neuron of one expert at ``dim``: activation = act(gate) x up, weight = W_down[e][dim, neuron];
    contribution = router_weight x activation x weight (its part of the MoE output); share = contribution / output."""

    neuron: int
    gate: float
    up: float
    activation: float
    weight: float
    contribution: float
    share: float


@dataclass(kw_only=True)
class ExpertContribution:
    """One expert's part of the MoE output at ``dim``: contribution = router_weight x output, share = contribution /
    the MoE output. ``expert`` is None for Qwen2-MoE's shared expert, whose router_logit is shared_expert_gate . x and
    whose router_prob and router_weight are sigmoid of it. For a routed expert router_prob is its softmax probability
    over all experts and router_weight the weight the block applies (router_prob, renormalised where the family does).

    ``neurons``: the ``top`` neurons by |contribution|; all neurons together sum to ``contribution`` (``neuron_error``
    is the relative gap of that full sum, float64).
    """

    expert: int | None
    router_logit: float
    router_prob: float
    router_weight: float
    output: float
    contribution: float
    share: float
    neurons: list[ExpertNeuron] = field(default_factory=list)
    neuron_error: float = 0.0


@dataclass(kw_only=True)
class ExpertSuperWeight:
    """W_down[dim, neuron] of the top neuron of the top expert, located as stored:
    ``block.get_parameter(matrix)[tuple(index)]`` is ``value`` (index [expert, dim, neuron] for ``experts.down_proj``
    stored [E, d_model, d_mlp]; [dim, neuron] for ``shared_expert.down_proj.weight``).

    rank: 1 + how many entries of the whole stored parameter (all experts) are larger in |w|; entries: its size.
    """

    matrix: str
    index: list[int]
    expert: int | None
    dim: int
    neuron: int
    value: float
    rank: int
    entries: int


@dataclass(kw_only=True)
class MoeAttribution:
    """The MoE block's output at ``dim`` for one token, split into experts.

    output: the sum of every expert's contribution (float64); actual: the block's own output there (calling the block
    on the token); error: |output - actual| / |actual|. ``experts`` are the routed experts the router selected, by
    router weight, highest first; ``shared_expert`` is Qwen2-MoE's shared expert (None for Mixtral). ``top_expert`` is
    the expert with the largest |contribution| (None when that is the shared expert); ``neurons`` are its top neurons
    and ``super_weight`` its top neuron's down-projection entry.
    """

    dim: int
    family: str
    output: float
    actual: float
    error: float
    experts: list[ExpertContribution]
    shared_expert: ExpertContribution | None
    top_expert: int | None
    neurons: list[ExpertNeuron]
    super_weight: ExpertSuperWeight


def is_moe_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a sparse-MoE block this module can attribute."""
    return type(module).__name__ in _FAMILIES


def moe_family(block: torch.nn.Module) -> str:
    """The block's class name, checked: a supported sparse-MoE block with a router and fused experts we understand."""
    name = type(block).__name__
    if name not in _FAMILIES:
        raise ValueError(
            f"unsupported MoE block {name}: expected one of {', '.join(sorted(_FAMILIES))} (transformers 5 layout)"
        )
    router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor) or not hasattr(router, "top_k"):
        raise ValueError(f"{name}.gate is not a top-k router with a weight [experts, d_model] (transformers < 5?)")
    if experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(f"{name}.experts has no fused gate_up_proj / down_proj parameters (transformers < 5?)")
    unsupported = [
        flag
        for flag, bad in (
            ("has_bias", getattr(experts, "has_bias", False)),
            ("has_post_expert_norm", getattr(experts, "has_post_expert_norm", False)),
            ("interleaved gate/up", not getattr(experts, "is_concatenated", True)),
            ("no gate", not getattr(experts, "has_gate", True)),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(f"{name}.experts layout not supported: {', '.join(unsupported)}")
    return name


def renormalises(block: torch.nn.Module) -> bool:
    """Whether the block rescales the selected experts' softmax probabilities to sum to 1."""
    rule = _FAMILIES[moe_family(block)]
    return rule if isinstance(rule, bool) else bool(getattr(block.gate, rule))


def router_weights(logits: torch.Tensor, selected: torch.Tensor, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) over all experts at the ``selected`` experts (probabilities), and the weights the block applies:
    those probabilities, divided by their sum when ``renormalise``."""
    probs = torch.softmax(logits.double(), dim=-1)[selected]
    return probs, probs / probs.sum() if renormalise else probs


def selected_experts(block: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """The experts the block's own router picks for token ``x`` (its dtype and device, its top-k), highest first."""
    router = block.gate
    with torch.no_grad():
        routed = router(x.detach().reshape(1, -1).to(router.weight.device, router.weight.dtype))
    if not (isinstance(routed, tuple) and len(routed) == 3):
        raise ValueError(f"{type(router).__name__} did not return (logits, weights, indices)")
    return [int(e) for e in routed[2].reshape(-1)]


def expert_weights(experts: torch.nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s gate [d_mlp, d_model], up [d_mlp, d_model] and down [d_model, d_mlp] in float64 on CPU,
    whatever the stored layout (``is_transposed`` stores [d_model, 2 d_mlp] and [d_mlp, d_model])."""
    gate_up = experts.gate_up_proj[expert].detach()
    down = experts.down_proj[expert].detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.T, down.T
    gate, up = gate_up.double().cpu().chunk(2, dim=0)
    return gate, up, down.double().cpu()


def neuron_parts(
    act_fn, gate: torch.Tensor, up: torch.Tensor, down_row: torch.Tensor, x: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per neuron of one gated MLP: pre-activation gate . x, up . x, activation act(gate . x) x (up . x), and
    contribution scale x activation x down_row (float64). Their sum is scale x the MLP's output at that dim."""
    pre_gate, pre_up = gate @ x, up @ x
    activation = act_fn(pre_gate) * pre_up
    return pre_gate, pre_up, activation, scale * activation * down_row


def top_neurons(
    pre_gate: torch.Tensor,
    pre_up: torch.Tensor,
    activation: torch.Tensor,
    down_row: torch.Tensor,
    parts: torch.Tensor,
    output: float,
    top: int,
) -> list[ExpertNeuron]:
    """The ``top`` neurons by |contribution|, with share = contribution / ``output`` (the MoE output at dim)."""
    order = parts.abs().argsort(descending=True)[:top].tolist()
    return [
        ExpertNeuron(
            neuron=i,
            gate=float(pre_gate[i]),
            up=float(pre_up[i]),
            activation=float(activation[i]),
            weight=float(down_row[i]),
            contribution=float(parts[i]),
            share=float(parts[i]) / output if output else float("nan"),
        )
        for i in order
    ]


def block_output(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's own output for the single token ``x`` (called as [1, 1, d_model]; a (hidden, router_logits)
    tuple is unpacked), as a 1-D float64 CPU tensor."""
    param = block.gate.weight
    with torch.no_grad():
        out = block(x.detach().clone().reshape(1, 1, -1).to(param.device, param.dtype))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(-1).double().cpu()


def _rank(param: torch.Tensor, value: torch.Tensor) -> int:
    """1 + how many entries of ``param`` are larger in |w| than ``value``, counted one leading slice at a time."""
    threshold = value.abs().to(param.device, param.dtype)
    slices = param.detach() if param.dim() > 2 else param.detach().unsqueeze(0)
    return 1 + sum(int((part.abs() > threshold).sum()) for part in slices)


def _super_weight(block: torch.nn.Module, expert: int | None, dim: int, neuron: int) -> ExpertSuperWeight:
    if expert is None:
        matrix, index = "shared_expert.down_proj.weight", [dim, neuron]  # nn.Linear: [out, in]
    else:
        transposed = getattr(block.experts, "is_transposed", False)
        matrix, index = "experts.down_proj", [expert, neuron, dim] if transposed else [expert, dim, neuron]
    param = block.get_parameter(matrix)
    value = param.detach()[tuple(index)]
    return ExpertSuperWeight(matrix=matrix, index=index, expert=expert, dim=dim, neuron=neuron, value=float(value), rank=_rank(param, value), entries=param.numel())


def attribute_moe(block: torch.nn.Module, x: torch.Tensor, dim: int, top: int = 10) -> MoeAttribution:
    """Split the sparse-MoE ``block``'s output at residual ``dim`` for one token into experts and neurons.

    ``x`` is the block's input at that token, [d_model]: the normed hidden state (post-attention norm output).
    Experts are the ones the block's router selects; every number is recomputed in float64 from the weights and the
    sum is checked against the block itself (``error``). ``top`` neurons are kept per expert.
    """
    family = moe_family(block)
    if x.dim() != 1:
        raise ValueError(f"x must be one token's input vector [d_model], got shape {tuple(x.shape)}")
    x64 = x.detach().double().cpu()
    experts = block.experts
    logits = block.gate.weight.detach().double().cpu() @ x64
    selected = selected_experts(block, x)
    probs, weights = router_weights(logits, torch.tensor(selected), renormalises(block))

    parts: list[tuple[ExpertContribution, tuple[torch.Tensor, ...]]] = []
    for expert, prob, weight in zip(selected, probs.tolist(), weights.tolist()):
        gate, up, down = expert_weights(experts, expert)
        output = float((down @ (experts.act_fn(gate @ x64) * (up @ x64)))[dim])
        pieces = neuron_parts(experts.act_fn, gate, up, down[dim], x64, weight)
        entry = ExpertContribution(expert=expert, router_logit=float(logits[expert]), router_prob=prob, router_weight=weight, output=output, contribution=weight * output, share=0.0)
        parts.append((entry, (*pieces, down[dim])))

    shared = None
    if hasattr(block, "shared_expert"):
        mlp = block.shared_expert
        gate, up, down = (
            getattr(mlp, name).weight.detach().double().cpu() for name in ("gate_proj", "up_proj", "down_proj")
        )
        logit = float(block.shared_expert_gate.weight.detach().double().cpu().reshape(-1) @ x64)
        scale = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)))
        output = float((down @ (mlp.act_fn(gate @ x64) * (up @ x64)))[dim])
        pieces = neuron_parts(mlp.act_fn, gate, up, down[dim], x64, scale)
        shared = ExpertContribution(expert=None, router_logit=logit, router_prob=scale, router_weight=scale, output=output, contribution=scale * output, share=0.0)
        parts.append((shared, (*pieces, down[dim])))

    total = sum(entry.contribution for entry, _ in parts)
    actual = float(block_output(block, x)[dim])
    for entry, (pre_gate, pre_up, activation, neuron_contribs, down_row) in parts:
        entry.share = entry.contribution / total if total else float("nan")
        entry.neurons = top_neurons(pre_gate, pre_up, activation, down_row, neuron_contribs, total, top)
        entry.neuron_error = abs(float(neuron_contribs.sum()) - entry.contribution) / max(abs(entry.contribution), 1e-12)

    best = max((entry for entry, _ in parts), key=lambda entry: abs(entry.contribution))
    routed = sorted((entry for entry, _ in parts if entry.expert is not None), key=lambda e: -e.router_weight)
    return MoeAttribution(
        dim=dim,
        family=family,
        output=total,
        actual=actual,
        error=abs(total - actual) / max(abs(actual), 1e-12),
        experts=routed,
        shared_expert=shared,
        top_expert=best.expert,
        neurons=best.neurons,
        super_weight=_super_weight(block, best.expert, dim, best.neurons[0].neuron),
    )
