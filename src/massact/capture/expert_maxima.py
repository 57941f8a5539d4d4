"""Each expert's largest |output| while the corpus pass runs, over the real tokens routed to it, before the router
weight (Su et al. 2025's profile of super experts): one maximum per (block, expert), kept on the model's device.

transformers 5 fuses a block's experts, whose forward sums their weighted outputs: no hook sees one expert's output.
While recording, the experts of every block run through ``experts_forward``, registered as an experts
implementation of transformers (``Experts.run_with``): the same computation as transformers' own eager loop (each
expert on its tokens: fused gate and up, the module's gate function, down, times the router weight, summed), which also
keeps the maximum. Stacked experts (``Experts.stacked``) call no implementation: each expert's output is in the
module's, read by a hook. A shared expert runs on every token: its maximum is kept apart, by a hook. Latent experts
(``Moe.latent``) write the latent: an expert's output is taken as it reaches the stream, through the out-projection's
weight (its bias belongs to no expert).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters.base import Experts
from ..models.loading import LoadedModel
from .stats import State, check_state, state_tensor

IMPLEMENTATION = "massact-maxima"  # the name the recording forward is registered under


class ExpertMaxima:
    """Per block and expert, the largest |output| so far (``routed`` [blocks, experts], -inf for dense blocks and
    experts never routed to); per block the shared expert's (``shared`` [blocks], -inf without one). ``real`` marks the
    current batch's real tokens, flattened as the blocks see them ([batch x positions]); padding enters no maximum.
    Maxima merge by their elementwise maximum (a resumed scan, several processes)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        n_layers = len(lm.adapter.blocks(lm.model))
        self.layers = [layer for layer in range(n_layers) if lm.at(layer).moe is not None]
        experts = max((self.lm.at(layer).moe.router.linear(self._router(layer)).weight.shape[0] for layer in self.layers), default=0)
        self.routed = torch.full((n_layers, experts), float("-inf"), device=lm.device)
        self.shared = torch.full((n_layers,), float("-inf"), device=lm.device)
        self.real: torch.Tensor | None = None

    def merge(self, other: ExpertMaxima) -> None:
        """Take ``other``'s maxima into these (their elementwise maximum; NaN stays NaN, as in ``keep``)."""
        torch.maximum(self.routed, other.routed.to(self.routed.device), out=self.routed)
        torch.maximum(self.shared, other.shared.to(self.shared.device), out=self.shared)

    def state_dict(self) -> State:
        """The maxima (``routed`` [blocks, experts], ``shared`` [blocks], float32 on the CPU): a snapshot, which later
        updates leave as it is."""
        return {"kind": "ExpertMaxima", "routed": self.routed.detach().to("cpu", copy=True),
                "shared": self.shared.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: State) -> None:
        """Set the maxima to a ``state_dict()``'s, on the model's device; a state of another kind, or maxima of another
        shape or dtype (another model's blocks or experts), is a ValueError naming the field."""
        check_state(state, "ExpertMaxima", ["routed", "shared"])
        routed = state_tensor(state, "routed", tuple(self.routed.shape), "float32")
        shared = state_tensor(state, "shared", tuple(self.shared.shape), "float32")
        self.routed.copy_(routed)
        self.shared.copy_(shared)

    def _module(self, layer: int, path: str | None) -> nn.Module | None:
        moe = self.lm.at(layer).moe
        return self.lm.adapter.module(self.lm.model, layer, moe.part(path)) if path else None

    def _router(self, layer: int) -> nn.Module:
        return self._module(layer, self.lm.at(layer).moe.router.path)

    def keep(self, layer: int, expert: int | None, output: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Take the largest |value| of ``output`` [tokens, d] (the real ones of ``rows``, the tokens' indices in the
        batch, where given) into the maximum of (``layer``, ``expert``; None: the shared expert)."""
        if self.real is not None:
            real = self.real.to(output.device)
            output = output[real[rows] if rows is not None else real[: len(output)]]
        if not len(output):
            return
        largest = output.detach().abs().amax().float()
        slot = (layer, expert) if expert is not None else (layer,)
        target = self.routed if expert is not None else self.shared
        target[slot] = torch.maximum(target[slot], largest)

    @contextmanager
    def recording(self) -> Iterator[ExpertMaxima]:
        """While open, every mixture-of-experts block of the model reports its experts' maxima here."""
        with instrumented(self.lm, maxima=self):
            yield self

    def _keep_each(self, layer: int, output: torch.Tensor) -> None:
        """Stacked experts return [experts x tokens, d]: every expert's output for every token (0 where the token is
        not routed to it, its input being 0)."""
        per_expert = output.view(self.routed.shape[1], -1, output.shape[-1])
        for expert in range(per_expert.shape[0]):
            self.keep(layer, expert, per_expert[expert])


Transform = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (rows, their token indices) -> rows


@contextmanager
def instrumented(lm: LoadedModel, maxima: ExpertMaxima | None = None, transform: Transform | None = None) -> Iterator[None]:
    """While open, the model's fused experts run through ``experts_forward``: ``maxima`` (where given) keeps each
    expert's largest |output|, and ``transform`` (where given) is applied to every expert's input and to its
    neurons' activations (the down projection's input), e.g. to quantize them. Stacked experts (``Experts.stacked``)
    get hooks instead: ``transform`` on their input only."""
    layers = [layer for layer in range(len(lm.adapter.blocks(lm.model))) if lm.at(layer).moe is not None]
    handles, instrumented_modules = [], []
    try:
        for layer in layers:
            moe = lm.at(layer).moe
            block = lm.adapter.module(lm.model, layer, moe.block)
            experts = block.get_submodule(moe.experts.path)
            if moe.experts.stacked:  # one output row per (expert, token)
                if maxima is not None:
                    handles.append(experts.register_forward_hook(lambda m, args, output, layer=layer: maxima._keep_each(layer, output)))
                if transform is not None:
                    handles.append(experts.register_forward_pre_hook(lambda m, args: (transform(args[0], None), *args[1:])))
            else:  # fused experts: run through experts_forward
                landing = block.get_submodule(moe.latent[1]).weight if moe.latent else None  # latent -> stream
                experts._massact = (maxima, layer, transform, moe.experts, landing)
                instrumented_modules.append(experts)
            if moe.shared and maxima is not None:
                handles.append(lm.adapter.module(lm.model, layer, moe.shared_part()).register_forward_hook(
                    lambda m, args, output, layer=layer: maxima.keep(layer, None, output.reshape(-1, output.shape[-1]))))
        with Experts.run_with(instrumented_modules, IMPLEMENTATION, experts_forward):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for experts in instrumented_modules:
            experts.__dict__.pop("_massact", None)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x through one expert's projection, stored [out, in] (F.linear) or, transposed, [in, out] (x @ W)."""
    if not transposed:
        return F.linear(x, weight, bias)
    return x @ weight + bias if bias is not None else x @ weight


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused experts' forward: each expert on its tokens (gate and up, the module's own gate function, down, laid
    out as the adapter's ``Experts`` declares), times its router weight, summed: the computation of transformers' eager
    loop. It keeps each expert's largest |output| before the weight, and transforms its inputs and activations, as
    ``instrumented`` asks (latent experts: their output through the out-projection's weight ``landing``)."""
    maxima, layer, transform, layout, landing = self._massact
    out = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        if expert >= self.num_experts:  # an expert-parallel sentinel
            continue
        tokens, slot = torch.where(top_k_index == expert)
        x = hidden_states[tokens]
        x = transform(x, tokens) if transform is not None else x
        if layout.gated:
            bias = self.gate_up_proj_bias[expert] if layout.biases else None
            h = self._apply_gate(_project(x, self.gate_up_proj[expert], bias, layout.transposed))
        else:
            bias = self.up_proj_bias[expert] if layout.biases else None
            h = self.act_fn(_project(x, self.up_proj[expert], bias, layout.transposed))
        h = transform(h, tokens) if transform is not None else h
        y = _project(h, self.down_proj[expert], self.down_proj_bias[expert] if layout.biases else None, layout.transposed)
        if maxima is not None:
            maxima.keep(layer, expert, y if landing is None else F.linear(y, landing), tokens)
        out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
    return out
