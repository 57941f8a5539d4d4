"""Interventions as context managers. Each leaves the model exactly as it found it: hooks are removed and any
weight it changes is written back, even when the body raises."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from ..models.adapters.base import Summed
from ..models.loading import LoadedModel
from ..settings import Criterion
from .hooks import forward_until, state_streams, tap


@contextmanager
def ablate_neurons(lm: LoadedModel, layer: int, neurons: list[int]) -> Iterator[None]:
    """Zero the given MLP neurons of a block (their entries of the down projection's input) at every position."""
    down = lm.adapter.module(lm.model, layer, lm.at(layer).mlp_down)
    index = torch.tensor(neurons)

    def zero(module, args):
        x = args[0].clone()
        x[..., index.to(x.device)] = 0.0
        return (x, *args[1:])

    handle = down.register_forward_pre_hook(zero)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def set_weight(lm: LoadedModel, matrix: str, index: tuple[int, ...], value: float = 0.0) -> Iterator[None]:
    """Set stored entries of a parameter (e.g. the super weight; ``index`` as stored, [expert, row, col] in fused
    expert weights; a slice in it sets a whole row or column) and put the originals back afterwards."""
    parameter = lm.model.get_parameter(matrix)
    original = parameter.data[index].clone()
    parameter.data[index] = value
    try:
        yield
    finally:
        parameter.data[index] = original


def massive_mask(hidden: torch.Tensor, dim: int, criterion: Criterion, valid: torch.Tensor | None = None,
                 per_stream: bool = False) -> torch.Tensor:
    """[batch, positions] True where ``dim`` is massive against the median |a| of that sequence's hidden state;
    with ``valid`` (a padded batch's attention mask, [batch, positions]), over its real positions only. A
    hyper-connection block's state [batch, positions, N, width] is judged per stream, against each stream's median
    (the scan's criterion): True where ``dim`` is massive in any stream, or with ``per_stream`` [batch, positions, N]."""
    if hidden.dim() == 4:
        streams = hidden.transpose(1, 2)  # [batch, N, positions, width]: each stream as a sequence of its own
        if valid is None:
            median = streams.abs().flatten(2).float().median(dim=2).values
        else:
            valid = valid.to(hidden.device).bool()
            median = torch.stack([row[:, keep].abs().flatten(1).float().median(dim=1).values for row, keep in zip(streams, valid)])
        found = criterion.is_massive(hidden[..., dim], median.unsqueeze(1))
        found = found if valid is None else found & valid.unsqueeze(-1)
        return found if per_stream else found.any(-1)
    if valid is None:
        median = hidden.abs().flatten(1).float().median(dim=1).values
    else:
        valid = valid.to(hidden.device).bool()
        median = torch.stack([row[keep].abs().float().median() for row, keep in zip(hidden, valid)])
    found = criterion.is_massive(hidden[..., dim], median.unsqueeze(1))
    return found if valid is None else found & valid


def at_dim(hidden: torch.Tensor, dim: int) -> torch.Tensor:
    """``dim``'s values [batch, positions]; from a hyper-connection block's state [batch, positions, N, width], each
    position's value in the stream where it is largest in magnitude."""
    values = hidden[..., dim]
    if hidden.dim() == 4:
        values = values.gather(-1, values.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return values


@contextmanager
def edit_site(lm: LoadedModel, layer: int, site: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the value a site takes by ``edit(value)`` at every forward pass while active (a site read at a
    module's output changes that output; one read at its input changes that input; a branch-scaled site, the module's
    output times the scale, changes that output so that the scaled value is the edited one; a summed site changes its
    last part's output so that the sum is the edited value)."""
    here = lm.at(layer)
    spec = here.sites[site]
    factor = here.landing(lm.config, site)
    if factor != 1.0:
        edit = _in_landed_units(edit, factor)
    streams = state_streams(lm.adapter, lm.config, site)
    if streams is not None and streams[1]:  # streams stored flat: edited as [batch, positions, N, width]
        given, count = edit, streams[0]
        edit = lambda hidden: given(hidden.unflatten(-1, (count, -1))).flatten(-2)
    if isinstance(spec, Summed):
        handles = _edit_sum(lm.adapter.module(lm.model, layer, ""), spec, lm.config, edit)
    else:
        handles = [_edit_module(lm.adapter.module(lm.model, layer, spec[0]), spec[1], edit)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit_module(module: torch.nn.Module, direction: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """The hook that replaces the module's output (``direction`` "out") or input ("in") by ``edit`` of it."""

    def on_output(module, args, output):
        if isinstance(output, (tuple, list)):
            return (edit(output[0]), *output[1:])
        return edit(output)

    def on_input(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    if direction == "out":
        return module.register_forward_hook(on_output)
    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def _edit_sum(block: torch.nn.Module, spec: Summed, config, edit: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Hooks that make a summed site's value ``edit(sum)``: the earlier parts' outputs, times their factors, are kept
    as they run; the last part's output becomes (edit(sum) - the kept terms) / its factor. Returns the handles."""
    factors = spec.factors(config)
    kept: list[torch.Tensor | None] = [None]

    def keep(index: int, output) -> None:
        term = _first(output) * factors[index]
        kept[0] = term if index == 0 else kept[0] + term

    def last(module, args, output):
        own = _first(output)
        before = kept[0]
        kept[0] = None
        changed = ((edit(before + own * factors[-1]) - before) / factors[-1]).to(own.dtype)
        return (changed, *output[1:]) if isinstance(output, (tuple, list)) else changed

    *earlier, final = spec.parts
    handles = [block.get_submodule(part.path).register_forward_hook(lambda m, args, output, index=index: keep(index, output))
               for index, part in enumerate(earlier)]
    return handles + [block.get_submodule(final.path).register_forward_hook(last)]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _in_landed_units(edit: Callable[[torch.Tensor], torch.Tensor], factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``edit`` of a landed value applied to the module's own output, which lands times ``factor``."""
    return lambda output: edit(output * factor) / factor


def replace_massive(
    lm: LoadedModel, layer: int, values: dict[int, float], criterion: Criterion, valid: torch.Tensor | None = None
) -> AbstractContextManager[None]:
    """Where a block's output (the detection stream) is massive, set each dim to ``values[dim]`` (Sun et al.: zero,
    or its mean). In post-LN blocks that is the residual sum, before the block's last LayerNorm. ``valid``: the
    attention mask of a padded batch, so that each text is judged on its own positions, as alone. With
    hyper-connections, in each stream where the dim is massive (judged against that stream's median)."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        for dim, value in values.items():
            mask = massive_mask(hidden, dim, criterion, valid, per_stream=True)
            hidden[..., dim] = torch.where(mask, torch.full_like(hidden[..., dim], value), hidden[..., dim])
        return hidden

    return edit_site(lm, layer, lm.adapter.stream, edit)


def patch_position(lm: LoadedModel, layer: int, site: str, position: int, vector: torch.Tensor) -> AbstractContextManager[None]:
    """Put ``vector`` [width] in place of the site's value at ``position`` of a one-text batch (flat
    [positions, width] MLP tensors included, an adapter's ``flat_rows``), leaving every other position as the model computes it."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        rows = hidden.view(-1, hidden.shape[-1])  # [positions, width] for a batch of one text
        rows[position] = vector.to(hidden.device, hidden.dtype)
        return hidden

    return edit_site(lm, layer, site, edit)


def read_coordinate(lm: LoadedModel, input_ids: torch.Tensor, layers: list[int], position: int, dim: int,
                    stream: str = "") -> dict[int, float]:
    """The block output (the detection stream) at [position, dim] for each layer, in one forward pass (under whatever
    intervention is active) that stops after the last of them; with hyper-connections, in ``stream`` ("s0", ...), or
    without one in the stream where it is largest in magnitude."""
    values: dict[int, float] = {}

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        values[layer] = coordinate(hidden, position, dim, stream)

    with torch.no_grad(), tap(lm.model, lm.adapter, [(layer, lm.adapter.stream) for layer in layers], keep):
        forward_until(lm.model, lm.adapter, max(layers), input_ids=input_ids.to(lm.device), use_cache=False)
    return values


def coordinate(hidden: torch.Tensor, position: int, dim: int, stream: str = "") -> float:
    """A one-text batch's detection stream at [position, dim]: in ``stream`` ("s0", ...) of a hyper-connection block's
    state, or without one in the stream where it is largest in magnitude."""
    return float(hidden[0, position, int(stream[1:]), dim] if stream else at_dim(hidden, dim)[0, position])
