"""One declarative adapter per architecture family: where each canonical site lives in a block.

A site is read either at a module's input ("in") or at its output ("out"); the path is relative to the block ("" is
the block itself). A third element ``(index, count)`` takes one of ``count`` equal chunks of the last dim, for fused
projections (Phi-3's ``gate_up_proj`` holds the gate, then up). Adding a family means adding one ``Adapter`` with
its own module paths; ``when`` picks among variants of one model type by its config (parallel or sequential
blocks, pre- or post-LN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

SiteSpec = tuple  # (path, "in" | "out") or (path, "in" | "out", (chunk index, chunk count))


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    layers: str  # path of the block list in the base model (LlamaModel: "layers"), whatever head wraps it
    sites: dict[str, SiteSpec]
    attn_proj: str
    mlp_up: str
    mlp_down: str
    act_fn: str
    mlp_gate: str | None = None
    # The norm that makes mlp_in from the stream the MLP reads (resid_mid, or resid_in in parallel blocks); the first
    # of these paths the block has. Empty in post-LN blocks, whose MLP reads resid_mid = LN(attn_sum) itself.
    mlp_norm: tuple[str, ...] = ()
    # Sandwich norms: the landed site -> the norm that sits between the sublayer's raw output and the residual.
    branch_norms: dict[str, str] = field(default_factory=dict)
    # Where massive activations are detected: each block's output, or for post-LN blocks the residual sum that
    # enters the block's last LayerNorm (the massive value may live only there, never in the normed output).
    stream: str = "resid_out"
    encoder: bool = False  # bidirectional (BERT-like): loaded with its masked-LM head, no perplexity
    moe: bool = False  # the MLP is a sparse mixture of experts: mlp_up / mlp_down / act_fn name the MoE block
    when: Callable[[object], bool] | None = None  # this variant applies to a config when this says so
    notes: str = ""  # what the report should say about this family's blocks

    @property
    def gated(self) -> bool:
        return self.mlp_gate is not None

    @property
    def parallel(self) -> bool:
        """Attention and MLP both read the block input: there is no resid_mid between them."""
        return "resid_mid" not in self.sites

    @property
    def post_ln(self) -> bool:
        return self.stream == "resid_sum"

    def mlp_norm_module(self, model: nn.Module, layer: int) -> tuple[str, nn.Module] | None:
        """(path, module) of the norm in front of the MLP, or None where the MLP reads the stream unnormed."""
        block = self.module(model, layer, "")
        path = next((p for p in self.mlp_norm if _has_submodule(block, p)), None)
        return (path, block.get_submodule(path)) if path is not None else None

    def raw(self, site: str) -> str:
        """The site holding a branch's own output before any norm: ``mlp_raw`` behind a sandwich norm, else itself."""
        raw = site.replace("_out", "_raw")
        return raw if site in self.branch_norms else site

    def layers_path(self, model: nn.Module) -> str:
        """The block list's path in ``model``: under the base model's prefix when a head wraps it."""
        prefix = getattr(model, "base_model_prefix", "")
        return f"{prefix}.{self.layers}" if prefix and isinstance(getattr(model, prefix, None), nn.Module) else self.layers

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path(model))

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.get_submodule(path) if path else block

    def param_name(self, model: nn.Module, layer: int, path: str, parameter: str = "weight") -> str:
        """Full parameter name, as ``model.get_parameter`` takes it."""
        return f"{self.layers_path(model)}.{layer}.{path}.{parameter}"

    def input_rows(self, model: nn.Module, layer: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [d_mlp, d_model] weight (a view: writes reach the model) and bias of the projection that makes
        ``mlp_up`` or ``mlp_gate``, this site's rows only when the projection is fused."""
        path = self.mlp_gate if site == "mlp_gate" else self.mlp_up
        module = self.module(model, layer, path)
        weight, bias = weight_out_in(module), bias_of(module)
        chunk = self.sites[site][2] if len(self.sites[site]) > 2 else None
        if chunk is not None:
            index, count = chunk
            size = weight.shape[0] // count
            weight = weight[index * size : (index + 1) * size]
            bias = bias[index * size : (index + 1) * size] if bias is not None else None
        return weight, bias


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as [out_features, in_features], whatever the storage.

    GPT-2's Conv1D stores [in, out] (y = x @ W + b), nn.Linear stores [out, in] (y = x @ W.T + b).
    """
    return module.weight.T if is_transposed(module) else module.weight


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and hasattr(module, "nf")


def stored_index(module: nn.Module, out_index: int, in_index: int) -> tuple[int, int]:
    """(row, col) of W[out_index, in_index] in the parameter as it is stored."""
    return (in_index, out_index) if is_transposed(module) else (out_index, in_index)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
