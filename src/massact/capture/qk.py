"""Each softmax head's queries, keys and values read where the model computes them, per head and dim, reduced where
they are: the sum over a batch's real positions of each entry squared (``qk_energy``); and the edit that zeroes some of
a head's query or key dims at every position (``zero_head_dims``).

The queries and keys are read at the module the adapter names (a q/k norm's output where the family has one, else the
projection's): raw HF values, before the rotary positions turn them. Grouped-query attention: the keys and values per
key/value head."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..models.heads import QkLayout
from ..models.loading import LoadedModel


def by_head(output: torch.Tensor, heads: int | None, head_dim: int | None = None, positions: int | None = None
            ) -> torch.Tensor | None:
    """A module's output as [batch, positions, heads, head_dim]: as it is where it is already per head (or
    [batch, heads, positions, head_dim], a norm applied after the heads are moved forward, as EXAONE's q_norm: told
    apart by ``positions``), else its last dim cut into ``heads`` equal heads (or heads of ``head_dim``); None where
    the output is not of that shape."""
    if output.dim() == 4:
        if positions is not None and output.shape[1] != positions and output.shape[2] == positions:
            output = output.transpose(1, 2)
        return output if heads is None or output.shape[2] == heads else None
    if output.dim() != 3:
        return None
    width = output.shape[-1]
    size = head_dim if head_dim is not None else (width // heads if heads and width % heads == 0 else None)
    if not size or width % size or (heads is not None and width // size != heads):
        return None
    return output.view(*output.shape[:2], width // size, size)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class QkEnergy:
    """Per block of ``layouts`` (the blocks whose queries and keys are read) and per "q", "k", "v": the sum over every
    real position of each entry squared, [heads, head_dim] (float32, on the model's device: queries per query head,
    keys and values per key/value head), of each pass through a block while ``reading`` it, over the positions
    ``valid`` marks ([batch, positions], 1 where real; None: the pass counts nothing). A block whose outputs do not
    cut into the config's heads is left out of ``result``."""

    def __init__(self, lm: LoadedModel, layouts: dict[int, QkLayout]):
        self.lm, self.layouts = lm, layouts
        self.sums: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layouts}
        self.bad: set[int] = set()
        self.shapes: dict[int, int] = {}  # block -> its query head_dim: the keys are cut into heads of it
        self.valid: torch.Tensor | None = None

    def _add(self, layer: int, name: str, per_head: torch.Tensor | None) -> None:
        if self.valid is None:
            return
        if per_head is None:
            self.bad.add(layer)
            return
        mask = self.valid.to(per_head.device).float()[:, :, None, None]  # padded positions count nothing
        squared = (per_head.float() ** 2 * mask).sum((0, 1))
        found = self.sums[layer]
        found[name] = found[name] + squared if name in found else squared

    @contextmanager
    def reading(self, layers: Iterable[int] | None = None) -> Iterator[None]:
        """While open, the passes through ``layers`` (None: every block of the layouts) are summed."""
        lm, heads = self.lm, self.lm.config.num_attention_heads

        def on_query(layer: int):
            def hook(module, args, output):
                if self.valid is None:
                    return
                found = by_head(_first(output), heads, positions=self.valid.shape[1])
                if found is not None:
                    self.shapes[layer] = found.shape[-1]
                self._add(layer, "q", found)
            return hook

        def on_key(layer: int):
            return lambda module, args, output: self.valid is not None and self._add(
                layer, "k", by_head(_first(output), None, self.shapes.get(layer), self.valid.shape[1]))

        def on_value(layer: int, layout: QkLayout):
            return lambda module, args, output: self._add(layer, "v", layout.values.take(_first(output).detach(), lm.config))

        handles = []
        for layer, layout in self.layouts.items():
            if layers is not None and layer not in layers:
                continue
            handles.append(lm.adapter.module(lm.model, layer, layout.queries).register_forward_hook(on_query(layer)))
            handles.append(lm.adapter.module(lm.model, layer, layout.keys).register_forward_hook(on_key(layer)))
            if layout.values is not None:
                handles.append(lm.adapter.module(lm.model, layer, layout.values.path).register_forward_hook(on_value(layer, layout)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def result(self) -> dict[int, dict[str, torch.Tensor]]:
        return {layer: found for layer, found in self.sums.items() if layer not in self.bad and "q" in found and "k" in found}


@torch.no_grad()
def qk_energy(lm: LoadedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], layouts: dict[int, QkLayout],
              ) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
    """``QkEnergy``'s sums over ``batches`` (ids, attention mask), one forward pass each, and the number of real
    positions."""
    energy = QkEnergy(lm, layouts)
    tokens = 0
    with energy.reading():
        for ids, mask in batches:
            energy.valid = mask
            tokens += int(mask.sum())
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    return energy.result(), tokens


@contextmanager
def zero_head_dims(lm: LoadedModel, layer: int, path: str, heads: int | None, head_dim: int,
                   dims: dict[int, list[int]]) -> Iterator[None]:
    """While open, block ``layer``'s module ``path`` (its queries or keys, as ``qk_energy`` reads them) outputs 0 at
    ``dims[head]`` of each head (heads of ``head_dim``), at every position; the model is left as found."""
    index = [(head, dim) for head, listed in dims.items() for dim in listed]
    heads_at = torch.tensor([h for h, _ in index], dtype=torch.long)
    dims_at = torch.tensor([d for _, d in index], dtype=torch.long)

    count = heads if heads is not None else getattr(lm.config, "num_key_value_heads", None) or lm.config.num_attention_heads

    def hook(module, args, output):
        first = _first(output)
        if first.dim() == 4 and first.shape[2] != count and first.shape[1] == count:  # [batch, heads, positions, head_dim]
            edited = first.clone()
            edited[:, heads_at.to(first.device), :, dims_at.to(first.device)] = 0.0
        else:
            per_head = by_head(first, heads, head_dim).clone()
            per_head[:, :, heads_at.to(first.device), dims_at.to(first.device)] = 0.0
            edited = per_head.view(first.shape)
        return (edited, *output[1:]) if isinstance(output, (tuple, list)) else edited

    handle = lm.adapter.module(lm.model, layer, path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
