"""Small context-manager hooks: read canonical sites while the model runs, reduce them where they are.

``tap`` calls a function with every value a site takes; ``Trace`` keeps what a reducer makes of it.
Nothing is cached unless the caller's function keeps it, so a scan can keep only top-k and sketches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.adapters.base import Adapter, Summed, text_config
from ..sites import STATE_SITES, resolve_site, split_stream

SiteFn = Callable[[int, str, torch.Tensor], None]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    # transformers 5 blocks call submodules with keyword arguments (hidden_states=...).
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hook(module: nn.Module, direction: str, fn: Callable[[torch.Tensor], None]):
    if direction == "in":
        return module.register_forward_pre_hook(lambda m, args, kwargs: fn(_first_tensor(args, kwargs)), with_kwargs=True)
    return module.register_forward_hook(lambda m, args, output: fn(_output_tensor(output)))


def _shaped(tensor: torch.Tensor, chunk: tuple[int, int] | None, lead: torch.Size | None, factor: float = 1.0,
            streams: tuple[int, bool, int | None] | None = None) -> torch.Tensor:
    """The site's value as [batch, positions, width]: one chunk of a fused projection, and flattened
    [batch x positions, width] MLP tensors (``lead``: the block's [batch, positions], where its adapter declares
    ``flat_rows``) put back in shape; times ``factor`` where the site is the module's output scaled (a branch scale).
    A hyper-connection block's state (``streams``: how many, whether stored flat, and the one stream asked for or
    None) as [batch, positions, N, width], or one stream of it."""
    if chunk is not None:
        tensor = tensor.chunk(chunk[1], dim=-1)[chunk[0]]
    if lead is not None and tensor.dim() == 2:
        tensor = tensor.view(*lead, tensor.shape[-1])
    if streams is not None:
        count, flat, stream = streams
        if flat:
            tensor = tensor.unflatten(-1, (count, -1))
        if stream is not None:
            tensor = tensor[..., stream, :]
    return tensor * factor if factor != 1.0 else tensor


def state_streams(adapter: Adapter, config, site: str) -> tuple[int, bool, int | None] | None:
    """(how many streams, whether stored flat, the stream named) where ``site`` ("resid_out" or one stream of it,
    "resid_out.s2") is a hyper-connection block's state; None for any other site or family."""
    base, stream = split_stream(site)
    if adapter.hyper is None or base not in STATE_SITES:
        return None
    count = adapter.hyper.count(config)
    if stream is not None and stream >= count:
        raise ValueError(f"{adapter.family} has {count} streams: no stream {stream} ({site!r})")
    return count, adapter.hyper.flat, stream


@contextmanager
def tap(model: nn.Module, adapter: Adapter, sites: Iterable[tuple[int, str]], fn: SiteFn) -> Iterator[None]:
    """Within the block, call ``fn(layer, site, tensor)`` each time a requested site is computed; ``tensor`` is
    [batch, positions, width] and may be the model's own storage (copy it to keep it). With hyper-connections the
    block state (resid_in, resid_mid, resid_out) is [batch, positions, N, width], and "resid_out.s2" its stream 2. A
    summed site (``Summed``) is given once per forward, when its last part has run."""
    handles = []
    leads: dict[int, torch.Size | None] = {}  # a flat-rows block's [batch, positions], read at its input
    config = text_config(model)
    try:
        for layer, site in sites:
            here = adapter.at(config, layer)  # a hybrid's blocks differ: a site may live elsewhere, or not at all
            if split_stream(site)[0] not in here.sites:
                raise ValueError(f"{adapter.family} has no site {site!r} at block {layer}")
            spec = here.sites[split_stream(site)[0]]
            streams = state_streams(adapter, config, site)
            if here.flat_rows and layer not in leads:
                leads[layer] = None
                handles.append(_hook(adapter.module(model, layer, ""), "in", lambda t, layer=layer: leads.__setitem__(layer, t.shape[:-1])))
            factor = here.landing(config, site)
            if isinstance(spec, Summed):
                handles += spec.watch(adapter.module(model, layer, ""), config, lambda t, layer=layer, site=site, factor=factor,
                                  streams=streams: fn(layer, site, _shaped(t, None, leads.get(layer), factor, streams)))
                continue
            path, direction, *chunk = spec
            module = adapter.module(model, layer, path)
            handles.append(_hook(module, direction, lambda t, layer=layer, site=site, chunk=chunk[0] if chunk else None, factor=factor,
                                 streams=streams: fn(layer, site, _shaped(t, chunk, leads.get(layer), factor, streams))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def tap_final(model: nn.Module, adapter: Adapter, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """With hyper-connections, call ``fn(tensor)`` with the combination of the last block's streams that the final
    norm reads (the adapter's ``hyper.final``), [batch, positions, width]."""
    path, direction = adapter.hyper.final
    handle = _hook(adapter.base(model).get_submodule(path), direction, fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def tap_module_input(module: nn.Module, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call ``fn(tensor)`` with every input of one module (e.g. the attention's o_proj)."""
    handle = _hook(module, "in", fn)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by ``forward_until``'s hook to end a forward pass early."""


def forward_until(model: nn.Module, adapter: Adapter, last: int, **inputs: Any) -> None:
    """Run ``model(**inputs)`` only as far as block ``last``: the blocks after it, the final norm and the head are not
    computed. For a pass that only reads sites up to that block; hooks inside it see what a full pass sees (no block
    looks ahead), at a fraction of the cost when ``last`` is early."""
    handle = adapter.blocks(model)[last].register_forward_hook(_raise_stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


def _raise_stop(module: nn.Module, args: tuple, output: Any) -> None:
    raise _Stop


class Trace:
    """Keep ``reduce(tensor)`` for each requested site, by (layer, site).

    Sites are canonical names with a layer, or TransformerLens hook names::

        with Trace(model, adapter, ["blocks.3.hook_mlp_out", (3, "mlp_act")]) as trace:
            model(input_ids)
        trace[3, "mlp_out"]
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        sites: Iterable[str | tuple[int, str]],
        reduce: Callable[[torch.Tensor], Any] = lambda t: t.detach().clone(),  # a copy: some blocks add in place
    ):
        self.values: dict[tuple[int, str], Any] = {}
        config = text_config(model)
        gated = lambda layer: adapter.at(config, layer).gated  # dense and expert blocks may mix
        requests = [resolve_site(s, gated) if isinstance(s, str) else resolve_site(s[1], gated, s[0]) for s in sites]
        self._context = tap(model, adapter, requests, lambda layer, site, t: self.values.__setitem__((layer, site), reduce(t)))

    def __enter__(self) -> Trace:
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def __getitem__(self, key: tuple[int, str]) -> Any:
        return self.values[key]
