"""One declarative adapter per architecture family: where each canonical site lives in a block.

A site is read either at a module's input ("in") or at its output ("out"); the path is relative to the
block ("" is the block itself). Adding a family means adding one ``Adapter`` with its own module paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    layers: str
    sites: dict[str, tuple[str, str]]
    attn_proj: str
    mlp_up: str
    mlp_down: str
    act_fn: str
    mlp_gate: str | None = None

    @property
    def gated(self) -> bool:
        return self.mlp_gate is not None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.get_submodule(path) if path else block

    def param_name(self, layer: int, path: str) -> str:
        """Full parameter name of a projection's weight, as ``model.get_parameter`` takes it."""
        return f"{self.layers}.{layer}.{path}.weight"


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
