"""The trigger's split with hyper-connections: a neuron's pre-activation through the combination of the streams its
MLP reads, back to each writer through the write weights and the mixing matrices of every block between.

Block L's MLP reads x = sum_i R[i] (.) mid[i] (mid: the streams it reads, resid_mid; R: the read weights, one number
per stream or one per stream and dim, the adapter's ``read_weights``), through its norm where it has one (factor s per
position, gain g): w . norm(x) + b = s sum_i (g w (.) R[i]) . mid[i] + w . beta + b. Going back from mid with
B = I (B[j, i]: how much state stream j reaches read stream i), a sublayer that wrote out into stream k with weight
w_out[k] on top of the mixing new[k] = sum_j m[j, k] old[j] adds

    v[i] = sum_k B[k, i] w_out[k]

of its output to read stream i, and before it B becomes m B. Block 0's input is the embedding in every stream:
v[i] = sum_j B[j, i]. A source's part at position t is s_t sum_i v_t[i] (g w (.) R_t[i]) . source_t. Every weight is the
position's own, held at the value the model computed (as a norm's factor is), so the parts add up to the
pre-activation exactly.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ...capture.hooks import forward_until, tap, tap_module_input
from ...capture.probe import ATTN_Z
from ...capture.streams import stream_weights
from ...models.loading import LoadedModel
from ..mechanism.norms import scale
from .decompose import MIXER_NAMES, AtPosition, NormKey, Split, Target, Term, Walk, _rows, embedding_parts, input_row

Source = tuple[int, str]  # (block, site) of a sublayer's output: attn_out or mlp_out
NAMES = {"mlp_out": "MLP"}


def read_norm(lm: LoadedModel, layer: int) -> NormKey | None:
    """The norm between the combination block ``layer``'s MLP reads and the MLP (its ``mlp_read`` site is that
    norm's input), or None where the combination is what the MLP reads (read at the connection's output)."""
    path, direction = lm.at(layer).sites["mlp_read"][:2]
    return (layer, path) if direction == "in" else None


def sources(lm: LoadedModel, layer: int) -> list[Source]:
    """The sublayer outputs that reach block ``layer``'s MLP, nearest first: its own attention, then each earlier
    block's MLP and attention."""
    found = [(layer, "attn_out")] if "attn_out" in lm.at(layer).sites else []
    for block in range(layer - 1, -1, -1):
        found += [(block, site) for site in ("mlp_out", "attn_out") if site in lm.at(block).sites]
    return found


def coefficients(weights: dict[int, dict[str, torch.Tensor]], layer: int) -> tuple[dict[Source, torch.Tensor], torch.Tensor]:
    """Per source of block ``layer``'s MLP, v [positions, N]: how much of its output reaches each read stream (see
    the module's formula), and the embedding's (every stream of block 0's input)."""
    write = weights[layer]["mlp_write"]
    rows, count = write.shape
    reach = torch.eye(count, dtype=torch.float64).expand(rows, count, count).clone()  # B at block layer's resid_mid
    found: dict[Source, torch.Tensor] = {}
    steps = [(layer, "attn")] + [(block, part) for block in range(layer - 1, -1, -1) for part in ("mlp", "attn")]
    for block, part in steps:
        found[block, f"{part}_out"] = torch.einsum("tki,tk->ti", reach, weights[block][f"{part}_write"])
        reach = torch.bmm(weights[block][f"{part}_mix"], reach)
    return found, reach.sum(dim=1)


@torch.no_grad()
def stream_split(lm: LoadedModel, input_ids: torch.Tensor, targets: list[Target], position: int) -> tuple[list[Split], AtPosition]:
    """``decompose.split`` with hyper-connections: each target's pre-activation over the text's positions, split into
    the embedding and every sublayer output before it, through the read, write and mixing weights. Two passes: the
    weights at every position, then every source reduced to its dot products with the read-weighted readers."""
    last = max(t.layer for t in targets)
    weights = stream_weights(lm, input_ids, last, {t.layer for t in targets})
    walk = Walk(lm)
    planned = {}
    for target in targets:
        row, bias = input_row(lm, target)
        constants, norm = [((), bias)], read_norm(lm, target.layer)
        reader = walk.through(norm, row, (), constants)[0] if norm else row
        planned[id(target)] = (reader, sum(value for _, value in constants), norm)
    blocks = sorted({t.layer for t in targets})
    columns = {id(t): [u for u in targets if u.layer == t.layer].index(t) for t in targets}
    readers = {layer: torch.stack([planned[id(t)][0] for t in targets if t.layer == layer], dim=1) for layer in blocks}
    seen = _record(lm, input_ids, targets, position, weights, readers)
    pieces = embedding_parts(lm, input_ids, seen["embedded"])
    splits = []
    for target in targets:
        reader, constant, norm = planned[id(target)]
        splits.append(_assemble(lm, target, reader, constant, norm, columns[id(target)], weights[target.layer]["mlp_weights"],
                                coefficients(weights, target.layer), seen, pieces, position))
    return splits, AtPosition(seen["at"])


def _record(lm: LoadedModel, input_ids: torch.Tensor, targets: list[Target], position: int,
            weights: dict[int, dict[str, torch.Tensor]], readers: dict[int, torch.Tensor]) -> dict:
    """The second pass: each source's dot products with every target block's read-weighted readers [n, N, k]
    (``dots``), the MLP norms' factors (``scales``), the targets' values, block 0's input (``embedded``) and, at the
    massive position, the MLPs' activations and the heads' outputs (``at``)."""
    last = max(readers)
    wanted: dict[Source, list[int]] = {}
    for layer in readers:
        for source in sources(lm, layer):
            wanted.setdefault(source, []).append(layer)
    seen: dict = {"dots": {}, "scales": {}, "values": {}, "at": {}}
    device_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def read_weighted(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[n, N, k]: each read stream's weights times ``hidden`` [n, d], dotted with block ``layer``'s readers."""
        if layer not in device_weights:
            device_weights[layer] = (weights[layer]["mlp_weights"].to(hidden.device), readers[layer].to(hidden.device))
        read, stacked = device_weights[layer]
        return ((read * hidden.double()[:, None, :]) @ stacked).cpu()

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        rows = _rows(hidden)
        for block in wanted.get((layer, site), []):
            seen["dots"][layer, site, block] = read_weighted(block, rows)
        if site.startswith("resid_in"):
            seen["embedded"] = rows.double().cpu()
        if site in ("mlp_gate", "mlp_up"):
            seen["values"][layer, site] = rows.double().cpu()
        if site == "mlp_in":  # an expert's neurons read the block's input: their values are computed from it
            for target in (t for t in targets if t.layer == layer and t.computed):
                row, bias = input_row(lm, target)
                seen["values"][target.key] = (rows.double() @ row.to(rows.device) + bias).unsqueeze(1).cpu()
        if site in ("mlp_act", "attn_raw", "mlp_raw"):
            seen["at"][layer, site] = rows[position].double().cpu()

    sites = set(wanted) | {(t.layer, "mlp_in") if t.computed else (t.layer, t.site) for t in targets}
    sites |= {(0, "resid_in.s0")}  # block 0's input: the embedding, the same in every stream
    sites |= {(layer, site) for layer in range(last + 1) for site in ("mlp_act", "attn_raw", "mlp_raw") if site in lm.at(layer).sites}
    with ExitStack() as stack:
        stack.enter_context(tap(lm.model, lm.adapter, sorted(sites), keep))
        for layer in readers:
            norm = read_norm(lm, layer)
            if norm is not None:
                module = lm.adapter.module(lm.model, *norm)
                stack.enter_context(tap_module_input(module, lambda x, layer=layer, module=module:
                                                     seen["scales"].__setitem__(layer, scale(module, _rows(x)).cpu())))
        for layer in (layer for layer in range(last + 1) if lm.at(layer).attn_proj is not None):
            o_proj = lm.adapter.module(lm.model, layer, lm.at(layer).attn_proj)
            stack.enter_context(tap_module_input(o_proj, lambda z, layer=layer:
                                                 seen["at"].__setitem__((layer, ATTN_Z), _rows(z)[position].double().cpu())))
        forward_until(lm.model, lm.adapter, last, input_ids=input_ids.to(lm.device), use_cache=False)
    return seen


def _assemble(lm: LoadedModel, target: Target, reader: torch.Tensor, constant: float, norm: NormKey | None, column: int,
              read: torch.Tensor, reach: tuple[dict[Source, torch.Tensor], torch.Tensor], seen: dict, pieces: dict,
              position: int) -> Split:
    """One target's split: each source's read-weighted dot products through its reach into the read streams, times
    the MLP norm's factor; the embedding split into its pieces; the biases as one constant. Each term's ``reader`` is
    the one at the massive position (the weights are per token), with the norm's factor as its factor."""
    by_source, embedding = reach
    rows = read.shape[0]
    factor = seen["scales"][target.layer].double() if norm is not None else torch.ones(rows, dtype=torch.float64)

    def at_position(v: torch.Tensor) -> torch.Tensor:
        """The reader that gives a source's part at the massive position: g w (.) sum_i v[i] R[i] there."""
        return reader * (v[position, :, None] * read[position]).sum(dim=0)

    parts: dict[str, torch.Tensor] = {}
    terms: dict[str, Term] = {}
    factors: dict[str, torch.Tensor] = {}
    for block, site in sources(lm, target.layer):
        here = lm.at(block)
        label = f"block {block} {NAMES.get(site) or MIXER_NAMES[here.mixer]}"
        v = by_source[block, site]
        parts[label] = factor * (v * seen["dots"][block, site, target.layer][:, :, column]).sum(dim=-1)
        terms[label] = Term(label, block, site, at_position(v), ())
        factors[label] = factor
    for site, (label, tensor) in pieces.items():
        dots = (read * tensor[:, None, :]) @ reader  # [n, N]
        parts[label] = factor * (embedding * dots).sum(dim=-1)
        terms[label] = Term(label, None, site, at_position(embedding), ())
        factors[label] = factor
    if constant != 0:  # the projection's bias and the norm's, as far as they reach the neuron
        parts["biases"] = torch.full((rows,), constant, dtype=torch.float64)
    value = seen["values"][target.key][:, 0 if target.computed else target.neuron]
    error = float((sum(parts.values()) - value).abs().max() / max(float(value.abs().max()), 1e-12))
    return Split(target, value, parts, terms, factors, factor, error)
