"""Which positions carry a massive activation, read from the activations themselves, for tools that train on them
(sparse autoencoders, probes, steering vectors). Public as ``massact.masks``.

``live`` is the exact mask of one hidden state; ``Hook`` records it at chosen blocks during any forward pass. Both
never flag padding. Without a forward pass, ``Profile.mask`` predicts the same positions from rules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models.adapters import adapter_for
from ..models.loading import LoadedModel
from ..settings import Criterion
from .hooks import tap


def live(hidden: torch.Tensor, criterion: Criterion | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [batch, positions]: True where some dim of ``hidden`` [batch, positions, width] has |a| >= min_abs and
    |a| >= min_ratio x the median |a| of the batch's hidden state, over its real tokens and every dim (as the scan's
    criterion takes the median over every token at a block). ``attention_mask`` (1 = real token): padding is never
    flagged and never enters the median."""
    criterion = criterion or Criterion()
    real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden.device).bool()
    magnitude = hidden.detach().abs()
    values = magnitude[real].float()
    if values.numel() == 0:
        return real.clone()
    median = values.flatten().median()
    return criterion.is_massive(magnitude.float(), median).any(-1) & real


class Hook:
    """While open, each forward pass of ``model`` (a ``LoadedModel`` or a transformers model) records
    ``masks[layer]``: ``live`` at the output of each block in ``layers`` (default every block), with the attention
    mask the model was called with. The masks are of the latest pass.

        with massact.masks.Hook(model, layers=[12]) as hook:
            model(**batch)
        keep = ~hook.masks[12]
    """

    def __init__(self, model: LoadedModel | nn.Module, layers: Iterable[int] | None = None, criterion: Criterion | None = None):
        self.model = model.model if isinstance(model, LoadedModel) else model
        self.adapter = model.adapter if isinstance(model, LoadedModel) else adapter_for(self.model.config)
        count = len(self.adapter.blocks(self.model))
        self.layers = list(range(count)) if layers is None else [int(layer) for layer in layers]
        if not self.layers or any(not 0 <= layer < count for layer in self.layers):
            raise ValueError(f"layers must be block indices from 0 to {count - 1}; got {layers!r}")
        self.criterion = criterion or Criterion()
        self.masks: dict[int, torch.Tensor] = {}
        self._attention: torch.Tensor | None = None
        self._opened = None

    def _inputs(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._attention = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _record(self, layer: int, _site: str, hidden: torch.Tensor) -> None:
        self.masks[layer] = live(hidden, self.criterion, self._attention)

    def __enter__(self) -> Hook:
        self.masks.clear()
        self._handle = self.model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        self._opened = tap(self.model, self.adapter, [(layer, self.adapter.stream) for layer in self.layers], self._record)
        self._opened.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._opened.__exit__(*exc)
        self._opened = None
