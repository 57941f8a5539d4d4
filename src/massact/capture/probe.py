"""Read every site of one block at a few positions of one text: the vectors the origin and anatomy steps need."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch

from ..models.loading import LoadedModel
from .hooks import forward_until, tap, tap_module_input

ATTN_Z = "attn_z"  # the attention output projection's input: every head's output, concatenated (TL: attn.hook_z)


def probe_block(lm: LoadedModel, input_ids: torch.Tensor, layer: int, positions: list[int]) -> dict[str, torch.Tensor]:
    """{site: [len(positions), width] float32 on CPU} for every site of the block, plus ``attn_z`` where it has a token
    mixer."""
    kept: dict[str, torch.Tensor] = {}
    with torch.no_grad(), probing(lm, layer, lambda name, tensor: kept.__setitem__(name, at_positions(tensor, positions))):
        forward_until(lm.model, lm.adapter, layer, input_ids=input_ids.to(lm.device), use_cache=False)
    return kept


def at_positions(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """A probed site [1, positions, width] at ``positions``: [len(positions), width] float32 on CPU (indexed on the
    tensor's own device: blocks may be spread by a device map)."""
    return tensor[0].detach().index_select(0, torch.tensor(positions, device=tensor.device)).float().cpu()


@contextmanager
def probing(lm: LoadedModel, layer: int, keep: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, each pass through block ``layer`` calls ``keep(site, tensor)`` for every site of the block,
    and for ``attn_z`` where it has a token mixer (the tensors as ``tap`` gives them)."""
    here = lm.at(layer)
    sites = [(layer, site) for site in here.sites]
    with tap(lm.model, lm.adapter, sites, lambda _, site, t: keep(site, t)), ExitStack() as stack:
        if here.attn_proj is not None:
            stack.enter_context(tap_module_input(lm.adapter.module(lm.model, layer, here.attn_proj), lambda t: keep(ATTN_Z, t)))
        yield


def block_output(lm: LoadedModel, input_ids: torch.Tensor, layer: int, stream: str = "") -> torch.Tensor:
    """One block's output (the residual sum before the last LayerNorm in post-LN blocks) for a whole text:
    [positions, d_model] float32 on CPU; with hyper-connections, of ``stream`` ("s0", ...)."""
    kept: dict[str, torch.Tensor] = {}
    site = f"{lm.adapter.stream}.{stream}" if stream else lm.adapter.stream
    with torch.no_grad(), tap(lm.model, lm.adapter, [(layer, site)],
                              lambda _, __, t: kept.update(out=t[0].detach().float().cpu())):
        forward_until(lm.model, lm.adapter, layer, input_ids=input_ids.to(lm.device), use_cache=False)
    return kept["out"]


def stream_dims(lm: LoadedModel, input_ids: torch.Tensor, dims: list[int], streams: list[int] | None = None) -> torch.Tensor:
    """The detection stream (block output, or the residual sum before the last LayerNorm in post-LN blocks) of every
    block at every position, only at ``dims``: [n_layers, positions, len(dims)] float32 on CPU, in one forward pass.
    With hyper-connections dim ``dims[i]`` is read in stream ``streams[i]`` of the block output."""
    n_layers = len(lm.adapter.blocks(lm.model))
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int, _, hidden: torch.Tensor) -> None:
        kept[layer] = at_dims(hidden[0], dims, streams)

    with torch.no_grad(), tap(lm.model, lm.adapter, [(layer, lm.adapter.stream) for layer in range(n_layers)], keep):
        lm.model(input_ids=input_ids.to(lm.device), use_cache=False)
    return torch.stack([kept[layer] for layer in range(n_layers)])


def at_dims(state: torch.Tensor, dims: list[int], streams: list[int] | None = None) -> torch.Tensor:
    """One text's detection stream at one block (``state``: [positions, width], or [positions, N, width] with
    hyper-connections) at ``dims``: [positions, len(dims)] float32 on CPU, dim ``dims[i]`` in stream ``streams[i]``
    where given."""
    state = state.detach()
    index = torch.tensor(dims, device=state.device)
    if streams is not None:
        return state[:, torch.tensor(streams, device=state.device), index].float().cpu()
    return state.index_select(-1, index).float().cpu()
