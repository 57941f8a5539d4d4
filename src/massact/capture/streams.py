"""Read a hyper-connection block whole at a few positions: its streams, what each sublayer reads and writes, and the
weights that write and mix the streams (the adapter's ``HyperConnections``), so that one stream's value can be split
into the terms that make it.

With write weights w (per stream) and a mixing matrix m (from stream j into stream k: m[j, k]) around each sublayer:

    resid_mid[k] = sum_j m_attn[j, k] resid_in[j]  + w_attn[k] attn_out
    resid_out[k] = sum_j m_mlp[j, k]  resid_mid[j] + w_mlp[k]  mlp_out

(m the identity where the family has no mixing). Its hooks read the modules' outputs, so a weight computed per token
from the streams is the one the model used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch

from ..models.adapters.base import Connection
from ..models.loading import LoadedModel
from .hooks import forward_until, tap, tap_final, tap_module_input
from .probe import ATTN_Z

PARTS = ("attn", "mlp")  # the sublayers, in block order


def probe_streams(lm: LoadedModel, input_ids: torch.Tensor, layers: list[int], positions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Blocks ``layers`` on one text (``input_ids`` [1, n]) at ``positions``, in one forward pass, float64 on CPU; per
    block: resid_in, resid_mid and resid_out [P, N, d_model]; attn_read, attn_out, mlp_read, mlp_out [P, d_model];
    attn_write and mlp_write [P, N]; attn_mix and mlp_mix [P, N, N] (the identity where the family does not mix);
    and ``attn_z`` [P, width], the attention output projection's input, where the block has a token mixer."""
    kept: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}

    def keep(layer: int, name: str, tensor: torch.Tensor) -> None:
        kept[layer][name] = at_rows(tensor, positions)

    with torch.no_grad(), streams_probing(lm, layers, keep):
        forward_until(lm.model, lm.adapter, max(layers), input_ids=input_ids.to(lm.device), use_cache=False)
    return with_identity(lm, kept, len(positions))


def at_rows(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """What ``streams_probing`` passes of one text ([1, positions, ...]) at ``positions``: [len(positions), ...]
    float64 on CPU (indexed on the tensor's own device)."""
    return tensor[0].detach().index_select(0, torch.tensor(positions, device=tensor.device)).double().cpu()


@contextmanager
def streams_probing(lm: LoadedModel, layers: list[int], keep: Callable[[int, str, torch.Tensor], None]) -> Iterator[None]:
    """While open, each pass through the blocks ``layers`` calls ``keep(layer, name, [batch, positions, ...])`` with
    what ``probe_streams`` reads of them (the tensors as the hooks give them; the mixing matrices only where the
    family mixes)."""
    sites = [(layer, site) for layer in layers
             for site in ("resid_in", "attn_read", "attn_out", "resid_mid", "mlp_read", "mlp_out", "resid_out")]
    with tap(lm.model, lm.adapter, sites, keep), _weights(lm, layers, set(), keep), ExitStack() as stack:
        for layer in (layer for layer in layers if lm.at(layer).attn_proj is not None):
            projection = lm.adapter.module(lm.model, layer, lm.at(layer).attn_proj)
            stack.enter_context(tap_module_input(projection, lambda z, layer=layer: keep(layer, ATTN_Z, z)))
        yield


def stream_weights(lm: LoadedModel, input_ids: torch.Tensor, last: int, reads: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The weights of blocks 0..``last`` at every position of one text, in one forward pass that stops there, float64
    on CPU: attn_write and mlp_write [n, N], attn_mix and mlp_mix [n, N, N] (the identity where the family does not
    mix), and at the blocks ``reads`` the MLP's read weights ``mlp_weights`` [n, N, 1] (one number per stream) or
    [n, N, d_model] (per stream and dim), with mlp_read = sum_j mlp_weights[j] x resid_mid[j]."""
    layers = list(range(last + 1))
    kept: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}

    def keep(layer: int, name: str, tensor: torch.Tensor) -> None:
        kept[layer][name] = tensor[0].detach().double().cpu()

    with torch.no_grad(), _weights(lm, layers, reads, keep):
        forward_until(lm.model, lm.adapter, last, input_ids=input_ids.to(lm.device), use_cache=False)
    return with_identity(lm, kept, input_ids.shape[1])


@contextmanager
def _weights(lm: LoadedModel, layers: list[int], reads: set[int], keep: Callable[[int, str, torch.Tensor], None]) -> Iterator[None]:
    """While open, each connection of ``layers`` passes ``keep(layer, name, [batch, positions, ...])`` its write
    weights (``{part}_write``) and mixing matrix (``{part}_mix``), and the MLP's at ``reads`` its read weights
    (``mlp_weights``, recomputed from the connection's input by the adapter's ``read_weights``)."""
    hyper, handles = lm.adapter.hyper, []

    def hook(module, args, kwargs, output, layer: int, part: str, connection: Connection) -> None:
        keep(layer, f"{part}_write", output[connection.write])
        if connection.mix is not None:
            keep(layer, f"{part}_mix", output[connection.mix])
        if part == "mlp" and layer in reads:
            streams = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            weights = connection.read_weights(module, streams)
            keep(layer, "mlp_weights", weights if weights.dim() == 4 else weights.unsqueeze(-1))

    try:
        for layer in layers:
            for part in PARTS:
                connection = getattr(hyper, part)
                module = lm.adapter.module(lm.model, layer, connection.path)
                handles.append(module.register_forward_hook(
                    functools.partial(hook, layer=layer, part=part, connection=connection), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def with_identity(lm: LoadedModel, kept: dict[int, dict[str, torch.Tensor]], rows: int) -> dict[int, dict[str, torch.Tensor]]:
    """``kept`` with each part's mixing matrix the identity [rows, N, N] where the family does not mix."""
    count = lm.adapter.streams(lm.config)
    identity = torch.eye(count, dtype=torch.float64).expand(rows, count, count)
    for values in kept.values():
        for part in PARTS:
            values.setdefault(f"{part}_mix", identity.clone())
    return kept


def final_read(lm: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """What the final norm reads (the combination of the last block's streams), [positions, d_model] float32 on CPU."""
    kept: dict[str, torch.Tensor] = {}
    with torch.no_grad(), tap_final(lm.model, lm.adapter, lambda t: kept.update(out=t[0].detach().float().cpu())):
        lm.model(input_ids=input_ids.to(lm.device), use_cache=False)
    return kept["out"]
