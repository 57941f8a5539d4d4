"""The origin of a massive value in one stream of a hyper-connection block: the terms that make it, through the
weights that write and mix the streams (``massact.capture.streams``).

With both sublayers' mixing matrices m_attn, m_mlp and write weights w_attn, w_mlp, stream s at dim d of a block's
output is

    resid_out[s] = sum_i (m_attn m_mlp)[i, s] resid_in[i]       (carried: each input stream i through the mixing)
                 + (sum_j m_mlp[j, s] w_attn[j]) attn_out       (the attention, written then mixed)
                 + w_mlp[s] mlp_out                             (the MLP, written)

The term with the largest share in the value's direction is its ``carrier``. Where a carried term wins, the mixing
weight (m_attn m_mlp)[i, s] carries the value: from the same stream (``carry``) or moved in from another one
(``move``: the mixing writes it into this stream); where a sublayer wins, its write weight scales what it writes
(``write``), and far above the typical write weight it is the amplifier, as a norm's gain is (``norms.AMPLIFIER``).
"""

from __future__ import annotations

import torch

from ...capture.probe import ATTN_Z
from ...capture.streams import probe_streams
from ...models.loading import LoadedModel
from .norms import AMPLIFIER
from .origin import head_split
from .results import StreamOrigin, StreamTerm


def stream_terms(probe: dict[str, torch.Tensor], stream: int, dim: int, row: int = 0) -> list[StreamTerm]:
    """The terms of ``resid_out[stream, dim]`` at probed position ``row`` (see the module's formula): one per input
    stream ("s0", ...), then "attn" and "mlp". ``dim`` indexes the probe's last axis: the dim itself in a whole probe,
    its column in one narrowed to a few dims (``lifeline.stream_lifeline_reads``)."""
    mix_attn, mix_mlp = probe["attn_mix"][row], probe["mlp_mix"][row]
    carried = (mix_attn @ mix_mlp)[:, stream]
    terms = [StreamTerm(source=f"s{i}", weight=float(carried[i]), input=float(probe["resid_in"][row, i, dim]),
                        value=float(carried[i] * probe["resid_in"][row, i, dim])) for i in range(len(carried))]
    attn_weight = float((mix_mlp[:, stream] * probe["attn_write"][row]).sum())
    mlp_weight = float(probe["mlp_write"][row, stream])
    for source, weight, output in (("attn", attn_weight, probe["attn_out"][row, dim]), ("mlp", mlp_weight, probe["mlp_out"][row, dim])):
        terms.append(StreamTerm(source=source, weight=weight, input=float(output), value=weight * float(output)))
    return terms


def stream_origin(probe: dict[str, torch.Tensor], layer: int, dim: int, text: int, position: int, stream: int,
                  row: int = 0) -> StreamOrigin:
    """Stream ``stream``'s value at ``dim`` of block ``layer``'s output, split into its terms (``probe``: the
    block's ``probe_streams``, ``row`` the position's row in it)."""
    value = float(probe["resid_out"][row, stream, dim])
    terms = stream_terms(probe, stream, dim, row)
    sign = 1.0 if value >= 0 else -1.0
    carrier = max(terms, key=lambda term: term.value * sign)
    total = sum(term.value for term in terms)
    error = abs(total - value) / max(max(abs(term.value) for term in terms), abs(value), 1e-12)
    writes = probe["attn_write"][row].abs().tolist() + probe["mlp_write"][row].abs().tolist()
    typical = float(torch.tensor(writes).median())
    if carrier.source in ("attn", "mlp"):
        role = "amplifier" if typical > 0 and abs(carrier.weight) >= AMPLIFIER * typical else "write"
    else:
        role = "carry" if carrier.source == f"s{stream}" else "move"
    return StreamOrigin(layer=layer, dim=dim, text=text, position=position, stream=f"s{stream}", value=value, terms=terms,
                        carrier=carrier.source, role=role, error=error)


def stream_origins(lm: LoadedModel, input_ids: torch.Tensor, text: int, position: int,
                   events: list[tuple[int, int, int]]) -> list[StreamOrigin]:
    """The origin of each (layer, stream, dim) of ``events`` at one text's ``position`` (``origin_at``), one forward
    pass for all."""
    probes = probe_streams(lm, input_ids, sorted({layer for layer, _, _ in events}), [position])
    return [origin_at(lm, probes[layer], layer, stream, dim, text, position) for layer, stream, dim in events]


def origin_at(lm: LoadedModel, probe: dict[str, torch.Tensor], layer: int, stream: int, dim: int, text: int, position: int,
              row: int = 0) -> StreamOrigin:
    """``stream_origin`` of (layer, stream, dim) from block ``layer``'s ``probe_streams`` (``row``: the position's);
    where the attention writes it (a softmax attention whose output projection reads the heads side by side), its
    output at the dim split over the heads (which reads the block's weights: they must be loaded)."""
    origin = stream_origin(probe, layer, dim, text, position, stream, row)
    here = lm.at(layer)
    if origin.carrier == "attn" and here.mixer == "attention" and here.heads_at_out:
        origin.heads = head_split(lm, layer, probe[ATTN_Z][row], dim)
    return origin
