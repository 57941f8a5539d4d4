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

import torch

from ..models.loading import LoadedModel
from .hooks import forward_until, tap, tap_final

PARTS = ("attn", "mlp")  # the sublayers, in block order


def probe_streams(lm: LoadedModel, input_ids: torch.Tensor, layers: list[int], positions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Blocks ``layers`` on one text (``input_ids`` [1, n]) at ``positions``, in one forward pass, float64 on CPU; per
    block: resid_in, resid_mid and resid_out [P, N, d_model]; attn_read, attn_out, mlp_read, mlp_out [P, d_model];
    attn_write and mlp_write [P, N]; attn_mix and mlp_mix [P, N, N] (the identity where the family does not mix)."""
    hyper, index = lm.adapter.hyper, torch.tensor(positions)
    count = lm.adapter.streams(lm.config)
    kept: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}

    def keep(layer: int, name: str, tensor: torch.Tensor) -> None:
        kept[layer][name] = tensor[0].detach().index_select(0, index.to(tensor.device)).double().cpu()

    sites = [(layer, site) for layer in layers
             for site in ("resid_in", "attn_read", "attn_out", "resid_mid", "mlp_read", "mlp_out", "resid_out")]
    handles = []
    for layer in layers:
        for part in PARTS:
            connection = getattr(hyper, part)

            def weights(_module, _args, output, layer=layer, part=part, connection=connection) -> None:
                keep(layer, f"{part}_write", output[connection.write])
                if connection.mix is not None:
                    keep(layer, f"{part}_mix", output[connection.mix])

            handles.append(lm.adapter.module(lm.model, layer, connection.path).register_forward_hook(weights))
    try:
        with torch.no_grad(), tap(lm.model, lm.adapter, sites, keep):
            forward_until(lm.model, lm.adapter, max(layers), input_ids=input_ids.to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    identity = torch.eye(count, dtype=torch.float64).expand(len(positions), count, count)
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
