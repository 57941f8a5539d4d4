"""Mixture-of-experts blocks, recomputed from their weights: the routing (as the adapter's ``Router`` declares it)
and every expert's neurons (as its ``Experts`` lays them out), in float64 and checked against the block itself.

    moe(x)[dim] = sum over selected experts e of  w_e x expert_e(x)[dim]   (+ the shared expert: s x shared(x)[dim])
    expert_e(x)[dim] = sum_i act_i(x) x W_down[e][dim, i]  (+ the down bias)

with w_e the router's weight for expert e (Llama-4 scales the expert's input instead: expert_e(w_e x)) and act_i the
neuron's activation, act(gate_i . x) x (up_i . x), or the expert module's own gate function (gpt-oss's clamped
SwiGLU), or in ungated experts act(up_i . x) (Nemotron-H). Latent experts (``Moe.latent``, Nemotron-H's
``moe_latent_size``) read z = into(x) for x, and their weighted sum lands through the out-projection:

    moe(x)[dim] = sum over selected experts e of  w_e x (W_out[dim] . expert_e(z))  + b_out[dim]  (+ the shared expert)

so a neuron writes dim through its latent column: ``W_out[dim] . W_down[e][:, i]``. ``route`` is the same routing with
some experts pruned: the router never picks them, and a softmax router renormalises over the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters.base import Moe
from ..models.loading import LoadedModel


@dataclass
class MoeBlock:
    """One block's mixture of experts: its spec and modules (the shared expert's where it sits, in the block or beside
    it), the model's config (for the router's settings), the full names of the mixture-of-experts module (``prefix``)
    and of the shared expert's (``shared_prefix``, "" without one) for parameter names, and ``dtype``, that of the
    hidden states the block reads in the model's forward (the residual stream's, whatever its router keeps its weight
    in); ``latent_in`` and ``latent_out`` the linears into and out of the experts' latent (None where the experts read
    and write the stream). Experts beside a dense MLP (``Moe.beside``) read the block's input through
    ``expert_norm``; the router reads it as it is."""

    spec: Moe
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None
    config: object
    prefix: str
    dtype: torch.dtype
    shared_prefix: str = ""
    latent_in: nn.Module | None = None
    latent_out: nn.Module | None = None
    expert_norm: nn.Module | None = None

    @classmethod
    def at(cls, lm: LoadedModel, layer: int) -> MoeBlock | None:
        """Block ``layer``'s mixture of experts, or None where the block's MLP is dense."""
        spec = lm.at(layer).moe
        if spec is None:
            return None
        block = lm.adapter.module(lm.model, layer, spec.block)
        get = lambda path: block.get_submodule(path) if path else None
        shared = lm.adapter.module(lm.model, layer, spec.shared_part()) if spec.shared else None
        name = lambda path: ".".join(part for part in (lm.adapter.layers_path(lm.model), str(layer), path) if part)
        latent = spec.latent or (None, None)
        return cls(spec, block, get(spec.router.path), get(spec.experts.path), shared, get(spec.shared_gate), lm.config,
                   name(spec.block), lm.dtype, shared_prefix=name(spec.shared_part()) if spec.shared else "",
                   latent_in=get(latent[0]), latent_out=get(latent[1]),
                   expert_norm=block.get_submodule(spec.beside.norm) if spec.beside is not None else None)

    def setting(self, *names: str):
        """The first of ``names`` the router module has, else the config's."""
        for name in names:
            if hasattr(self.router, name):
                return getattr(self.router, name)
        for name in names:
            if hasattr(self.config, name):
                return getattr(self.config, name)
        raise AttributeError(f"neither the router nor the config has {' or '.join(names)}")

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's [experts, d_model] weight (in the linear the router spec names)."""
        return self.spec.router.linear(self.router).weight

    @property
    def n_experts(self) -> int:
        return self.router_weight.shape[0]

    @property
    def correction(self) -> torch.Tensor | None:
        """The per-expert bias that moves the choice (on the router, or on the block where the block passes it)."""
        spec = self.spec.router
        if not spec.correction:
            return None
        return functools.reduce(getattr, spec.correction.split("."), self.block if spec.passed else self.router)

    @property
    def scale(self) -> float:
        """The factor the routed experts' weights are scaled by (1 without one)."""
        scale = self.spec.router.scale
        if scale is None:
            return 1.0
        return float(scale) if isinstance(scale, (int, float)) else float(self.setting(scale))

    @property
    def top_k(self) -> int:
        return int(self.setting("top_k", "top_k_experts", "num_experts_per_tok"))


@dataclass
class Routing:
    """A batch of tokens routed: ``logits`` and ``scores`` (softmax probabilities or sigmoids) [tokens, experts], the
    selected experts ``indices`` and their ``weights`` [tokens, k] (float64)."""

    logits: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


def _scores(score: str, logits: torch.Tensor) -> torch.Tensor:
    """Each expert's score from the router's logits [tokens, experts], as ``Router.score`` names it."""
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    if score == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return torch.sigmoid(logits)


def router_input(moe: MoeBlock, x: torch.Tensor) -> torch.Tensor:
    """What the router's linear reads from the tokens ``x`` [tokens, d_model] (float64): ``x`` itself, or where the
    router prepares its input (``Router.norm``, ``Router.input_scales``) its gainless RMS norm times those scales."""
    spec = moe.spec.router
    if spec.norm is not None:
        eps = float(moe.router.get_submodule(spec.norm).eps)
        x = x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    for name in spec.input_scales:
        value = getattr(moe.router, name)
        x = x * (value.detach().double().to(x.device) if isinstance(value, torch.Tensor) else float(value))
    return x


def route(moe: MoeBlock, x: torch.Tensor, pruned: Sequence[int] = (), token_ids: torch.Tensor | None = None) -> Routing:
    """The router's choice for tokens ``x`` [tokens, d_model], recomputed in float64 from its weights; ``pruned``
    experts are never chosen (their logits are -inf: a softmax renormalises over the rest). A hash router
    (``Router.table``) chooses by the tokens' ids ``token_ids`` [tokens], which it then needs: a pruned expert stays
    chosen there (the table is the choice), and only the weights are recomputed."""
    spec = moe.spec.router
    if spec.table is not None and token_ids is None:
        raise ValueError("a hash-routed block chooses its experts by token id: route() needs token_ids")
    linear = spec.linear(moe.router)
    weight = linear.weight.detach().double()
    bias = getattr(linear, "bias", None)
    logits = router_input(moe, x.detach().double().to(weight.device)) @ weight.T
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.detach().double()
    cap = float(getattr(moe.router, spec.softcap)) if spec.softcap else 0.0
    if cap > 0:
        logits = torch.tanh(logits / cap) * cap
    masked = logits.clone()
    if pruned:
        masked[:, list(pruned)] = float("-inf")
    scores = _scores(spec.score, masked)
    choice = scores.clone()
    if spec.correction:
        choice = choice + moe.correction.detach().double().to(choice.device)
    if pruned:
        choice[:, list(pruned)] = float("-inf")
    if spec.groups:
        groups, keep = int(moe.setting("num_group", "n_group")), int(moe.setting("topk_group"))
        grouped = choice.view(len(choice), groups, -1)
        if spec.groups == "max":
            score = grouped.max(-1).values
        else:  # the sum of a group's two best; a pruned expert adds nothing (it must not take its group out with it)
            score = grouped.topk(2, dim=-1).values.nan_to_num(neginf=0.0).sum(-1)
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=-1).indices, True)
        choice = choice.masked_fill(~chosen.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    if spec.table is not None:
        indices = getattr(moe.router, spec.table)[token_ids.reshape(-1).to(logits.device)].long()
    else:
        indices = choice.topk(moe.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    renormalise = spec.renormalise if isinstance(spec.renormalise, bool) else bool(moe.setting(spec.renormalise))
    if renormalise:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if spec.score != "softmax" else 0.0))
    if spec.expert_scale is not None:
        weights = weights * getattr(moe.router, spec.expert_scale).detach().double().to(weights.device)[indices]
    if spec.scale is not None:
        weights = weights * moe.scale
    return Routing(logits, scores, indices, weights)


def model_routing(moe: MoeBlock, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router module's own choice for tokens ``x`` [tokens, d_model]: (indices, weights) [tokens, k], sorted by
    expert index within each token (routers may return them unsorted), the weights times the scale the block applies
    after the router where it does; Llama-4's router gives scores for every expert, of which the nonzero ones are the
    chosen. A hash router is called with the tokens' ids ``token_ids``."""
    spec = moe.spec.router
    rows = x.to(moe.router_weight.device, moe.dtype)
    args = (rows.unsqueeze(0) if spec.batched else rows, *([moe.correction] if spec.passed else []))
    if spec.table is not None:
        args = (*args, token_ids.to(rows.device))
    with torch.no_grad():  # the router gets what the model gives it: it casts for itself (DeepSeek's to float32)
        out = moe.router(*args)
    if moe.spec.router.on_input:  # (scores [tokens, experts]: sigmoid of the top-k logits, 0 elsewhere; logits)
        scores = out[0].float()
        indices = scores.topk(moe.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
    else:  # (logits, weights, indices)
        weights, indices = out[1].float() * (moe.scale if spec.scaled_after else 1.0), out[2]
    order = indices.argsort(dim=-1)
    return indices.gather(1, order).cpu(), weights.gather(1, order).cpu()


def expert_weights(moe: MoeBlock, expert: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Expert ``expert``'s input weight, its bias, its down projection [d_model, d_mlp] and bias; float64. The input
    weight is the fused gate and up [2 d_mlp, d_model] in its stored row order (gate rows then up rows, or alternating
    where interleaved), or in ungated experts the up projection [d_mlp, d_model]."""
    layout, experts = moe.spec.experts, moe.experts
    name = "gate_up_proj" if layout.gated else "up_proj"
    weight, down = getattr(experts, name)[expert].detach().double(), experts.down_proj[expert].detach().double()
    if layout.transposed:
        weight, down = weight.T, down.T
    biases = (getattr(experts, f"{name}_bias")[expert].detach().double(), experts.down_proj_bias[expert].detach().double()) \
        if layout.biases else (None, None)
    return weight, biases[0], down, biases[1]


def split_gate_up(moe: MoeBlock, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up parts [..., d_mlp] of fused pre-activations (or of a fused weight's rows). Ungated experts have
    one pre-activation, up, which also decides whether the neuron fires: it stands for both."""
    if not moe.spec.experts.gated:
        return fused, fused
    if moe.spec.experts.interleaved:
        return fused[..., 0::2], fused[..., 1::2]
    return fused.chunk(2, dim=-1)


def activate(moe: MoeBlock, fused: torch.Tensor) -> torch.Tensor:
    """The neurons' activations from the pre-activations (fused gate and up [..., 2 d_mlp], or up [..., d_mlp] in
    ungated experts): the fused experts module's own gate function; stacked experts compute act_fn(gate) x up in their
    forward, ungated ones act_fn(up) (see ``Experts``)."""
    if not moe.spec.experts.gated:
        return moe.experts.act_fn(fused)
    if not moe.spec.experts.stacked:
        return moe.experts._apply_gate(fused)
    gate, up = split_gate_up(moe, fused)
    return moe.experts.act_fn(gate) * up


def expert_parts(moe: MoeBlock, expert: int,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For the expert's input ``x`` [..., d_model] (already scaled where the router scales the input): its neurons'
    gate and up pre-activations (both up in ungated experts), activations [..., d_mlp], its down projection
    [d_model, d_mlp] and down bias."""
    weight, bias, down, down_bias = expert_weights(moe, expert)
    fused = x.double() @ weight.T + (bias if bias is not None else 0.0)
    gate, up = split_gate_up(moe, fused)
    return gate, up, activate(moe, fused), down, down_bias


def expert_input(moe: MoeBlock, x: torch.Tensor) -> torch.Tensor:
    """What the routed experts read for the block's input ``x`` [..., d_model], float64: ``x`` itself, or where they
    work in a latent, into(x) [..., latent] (its bias included)."""
    if moe.latent_in is None:
        return x.double()
    weight, bias = moe.latent_in.weight.detach().double().to(x.device), moe.latent_in.bias
    return x.double() @ weight.T + (bias.detach().double().to(x.device) if bias is not None else 0.0)


def landing(moe: MoeBlock, dim: int) -> tuple[torch.Tensor | None, float]:
    """How the routed experts' weighted sum reaches residual ``dim``: the latent out-projection's row [latent] for it
    and its bias there (float64 on CPU), or (None, 0.0) where the sum lands as it is."""
    if moe.latent_out is None:
        return None, 0.0
    bias = moe.latent_out.bias
    return moe.latent_out.weight.detach()[dim].double().cpu(), float(bias.detach()[dim]) if bias is not None else 0.0


def _bias(linear: nn.Module) -> torch.Tensor | float:
    """A linear's bias in float64 (0.0 without one)."""
    return linear.bias.detach().double() if getattr(linear, "bias", None) is not None else 0.0


def _shared_parts(moe: MoeBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """The shared expert's gate and up pre-activations (both up where it is ungated), activations, down projection
    [d_model, d_mlp], the logit of its gate (0 without one) and the scale it applies (sigmoid of that logit, or 1). A
    fused gate-and-up projection holds the gate first, then up."""
    mlp, parts = moe.shared, moe.spec.shared
    weight = lambda name: mlp.get_submodule(name).weight.detach().double()
    project = lambda name: weight(name) @ x + _bias(mlp.get_submodule(name))  # with its bias (Nemotron-H's mlp_bias)
    act = mlp.get_submodule(parts.act) if isinstance(parts.act, str) else parts.act
    pre_up, down = project(parts.up), weight(parts.down)
    if parts.fused:
        pre_gate, pre_up = pre_up.chunk(2)
    else:
        pre_gate = project(parts.gate) if parts.gate is not None else pre_up
    logit = float(moe.shared_gate.weight.detach().double().reshape(-1) @ x) if moe.shared_gate is not None else 0.0
    scale = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))) if moe.shared_gate is not None else 1.0
    scale *= moe.spec.shared_scale
    return pre_gate, pre_up, act(pre_gate) * pre_up if parts.gated else act(pre_up), down, logit, scale


def shared_down_bias(moe: MoeBlock, dim: int) -> float:
    """The shared expert's down-projection bias at ``dim`` (0.0 without one)."""
    bias = _bias(moe.shared.get_submodule(moe.spec.shared.down))
    return float(bias[dim]) if isinstance(bias, torch.Tensor) else 0.0


def block_output(moe: MoeBlock, x: torch.Tensor, token_id: int | None = None) -> torch.Tensor:
    """The mixture's own output for the single token ``x`` (the block called as [1, 1, d_model]; a (hidden, router)
    tuple is unpacked), plus the shared expert's where it sits beside the block (``Moe.shared_beside``, added as the
    decoder layer adds it), as a 1-D float64 CPU tensor; experts beside a dense MLP: their weighted sum (moe_raw), the
    router called on ``x`` and the experts on its ``expert_norm``, as the decoder layer calls them. A hash-routed block
    (``Router.table``) is given the token's id ``token_id`` as the model's forward gives it (``input_ids``), which
    makes its choice.

    The token goes in as the model's hidden states do, in the residual stream's dtype: each part of the block then
    casts as its own forward does (DeepSeek's and GLM's routers to float32, the experts and shared experts in the
    model's dtype). The router's dtype is not the block's: transformers keeps some routers in float32."""
    param = moe.router_weight
    if moe.spec.beside is not None:  # no module computes the experts' part alone: run the router and experts as the block does
        rows = x.detach().clone().reshape(1, -1).to(param.device, moe.dtype)
        with torch.no_grad():
            _, weights, indices = moe.router(rows)
            return moe.experts(moe.expert_norm(rows), indices, weights).reshape(-1).double().cpu()
    with torch.no_grad():
        kwargs = {"input_ids": torch.tensor([[token_id]], device=param.device)} if moe.spec.router.table is not None else {}
        token = x.detach().clone().reshape(1, 1, -1).to(param.device, moe.dtype)
        out = moe.block(token, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if moe.spec.shared_beside:
            out = out + moe.shared(token.to(_device_of(moe.shared))).to(out.device)
    return out.reshape(-1).double().cpu()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def expert_input_row(moe: MoeBlock, expert: int, neuron: int, site: str) -> tuple[torch.Tensor, float]:
    """The row of an expert's input weight that makes ``neuron``'s gate (``site`` "mlp_gate") or up pre-activation
    from the block's input (ungated experts: the up row, their one pre-activation), and its bias (0 without); float64
    on CPU. Latent experts read into(x): the row is the expert's latent row through into's weight, the bias its
    latent row . into's bias plus the expert's own."""
    weight, bias, _, _ = expert_weights(moe, expert)
    rows = split_gate_up(moe, weight.T)[0 if site == "mlp_gate" else 1].T  # [d_mlp, d_model or latent]
    biases = split_gate_up(moe, bias)[0 if site == "mlp_gate" else 1] if bias is not None else None
    row, constant = rows[neuron].cpu(), float(biases[neuron]) if biases is not None else 0.0
    if moe.latent_in is None:
        return row, constant
    into = moe.latent_in
    bias = float(row @ into.bias.detach().double().cpu()) if into.bias is not None else 0.0
    return row @ into.weight.detach().double().cpu(), constant + bias


def expert_matrix(matrix: str, layer: int) -> str:
    """The full parameter name of an expert super weight's ``matrix`` (earlier reports name it relative to the block's
    MLP, at ``model.layers``, where the mixture-of-experts families they knew keep it)."""
    return f"model.layers.{layer}.mlp.{matrix}" if matrix.startswith(("experts.", "shared_expert.")) else matrix


@contextmanager
def pruned_experts(lm: LoadedModel, pruned: dict[int, Sequence[int]]) -> Iterator[None]:
    """While open, block L's router never selects the experts ``pruned[L]``: it routes as ``route`` does with them
    pruned (a softmax renormalises over the rest), returning what the router module returns."""
    saved = []
    try:
        for layer, experts in pruned.items():
            moe = MoeBlock.at(lm, layer)
            saved.append((moe.router, moe.router.__dict__.get("forward")))
            moe.router.forward = _pruned_router(moe, tuple(experts))
        yield
    finally:
        for router, forward in saved:
            if forward is None:
                del router.forward
            else:  # an accelerate hook's forward (a device map): put it back
                router.forward = forward


def _pruned_router(moe: MoeBlock, experts: tuple[int, ...]):
    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        # a hash router is called with the token ids, which make its choice
        routing = route(moe, x, experts, (args[0] if args else kwargs["input_ids"]) if moe.spec.router.table is not None else None)
        # in the dtype the router's own logits have: float32 where transformers keeps the router in float32
        logits = routing.logits.to(torch.promote_types(x.dtype, moe.router_weight.dtype))
        if moe.spec.router.on_input:  # Llama-4: sigmoid scores for every expert, 0 where not selected
            scores = torch.zeros_like(routing.logits).scatter_(1, routing.indices, routing.weights)
            return scores.to(x.dtype), logits
        weights = routing.weights / moe.scale if moe.spec.router.scaled_after else routing.weights  # the block scales them
        return logits, weights.to(torch.float32), routing.indices

    return forward
