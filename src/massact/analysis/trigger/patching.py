"""Causal check of a trigger: replace each top source of the writing neuron's pre-activation at the massive position,
by its mean over the other positions and by zero, and see whether the neuron and the massive value follow."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from ...capture.edits import edit_site, patch_position
from ...capture.hooks import forward_until, state_streams, tap
from ...models.loading import LoadedModel
from ...settings import Criterion
from ..mechanism.results import Lifeline
from .decompose import Split, input_row, ranked_sources
from .results import Patch

PATCHED_SOURCES = 3  # top sources of the writing neuron's pre-activation that are patched


def _site(label_site: str) -> str:
    """The site that holds a source: the embedding's parts are block 0's input, patched whole."""
    return "resid_in" if label_site in ("embed", "pos_embed") else label_site


def _read_at(lm: LoadedModel, site: str) -> str:
    """Where a patched site's value is read: with hyper-connections block 0's input (the embedding in every stream)
    in its first stream."""
    return f"{site}.s0" if state_streams(lm.adapter, lm.config, site) is not None else site


def _patched(lm: LoadedModel, layer: int, site: str, position: int, vector: torch.Tensor) -> AbstractContextManager[None]:
    """``vector`` in place of the site's value at ``position``; in every stream of a hyper-connection block's state."""
    if state_streams(lm.adapter, lm.config, site) is None:
        return patch_position(lm, layer, site, position, vector)

    def edit(hidden: torch.Tensor) -> torch.Tensor:  # [1, positions, N, width]
        hidden = hidden.clone()
        hidden[0, position] = vector.to(hidden.device, hidden.dtype)
        return hidden

    return edit_site(lm, layer, site, edit)


@torch.no_grad()
def _read(lm: LoadedModel, input_ids: torch.Tensor, piece: Split, line: Lifeline, sites: list[tuple[int, str]]) -> dict:
    """One pass: the neuron's pre-activation and the massive value at its birth and peak blocks, at the carrier (in the
    lifeline's stream, with hyper-connections); and the whole value of each site in ``sites`` (to patch it with)."""
    target, position, dim = piece.target, line.position, line.dim
    kept: dict = {}
    # An expert's neuron is no module's output: its pre-activation is computed from the block's input.
    read_at = (target.layer, "mlp_in") if target.computed else (target.layer, target.site)
    row, bias = input_row(lm, target) if target.computed else (None, 0.0)

    watched = f"{lm.adapter.stream}.{line.stream}" if line.stream else lm.adapter.stream
    read = {(layer, _read_at(lm, site)): (layer, site) for layer, site in sites}

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        rows = hidden.detach().reshape(-1, hidden.shape[-1])
        if (layer, site) in read:
            kept[read[layer, site]] = rows.clone()
        if (layer, site) == read_at:
            kept["pre"] = float(rows[position, target.neuron]) if row is None else float(rows[position].double().cpu() @ row) + bias
        if site == watched:
            kept[layer] = float(rows[position, dim])

    wanted = set(read) | {read_at, (line.born_at, watched), (line.peak_layer, watched)}
    with tap(lm.model, lm.adapter, sorted(wanted), keep):
        forward_until(lm.model, lm.adapter, max(layer for layer, _ in wanted), input_ids=input_ids.to(lm.device), use_cache=False)
    return kept


def patch_sources(lm: LoadedModel, input_ids: torch.Tensor, piece: Split, line: Lifeline, medians: list[float],
                  criterion: Criterion, top: int = PATCHED_SOURCES) -> list[Patch]:
    """Patch the ``top`` sources that most explain why the neuron differs at the carrier, each by its mean over the
    other positions and by zero. Needs a text of at least two tokens for the mean."""
    position = line.position
    if input_ids.shape[1] < 2:
        return []
    labels = ranked_sources(piece, position)[:top]
    sites = list(dict.fromkeys((piece.terms[label].layer or 0, _site(piece.terms[label].site)) for label in labels))
    base = _read(lm, input_ids, piece, line, sites)
    found = []
    for label in labels:
        term = piece.terms[label]
        key = (term.layer or 0, _site(term.site))
        original = base[key]
        others = torch.cat([original[:position], original[position + 1 :]]).mean(dim=0)
        for name, vector in (("mean of the other positions", others), ("zero", torch.zeros_like(others))):
            # The direct change: this source's reader through the norms' factors at the position, held fixed.
            reader, factor = term.reader.to(original.device), float(piece.factors[label][position])
            direct = factor * float((vector.double() - original[position].double()) @ reader)
            with _patched(lm, key[0], key[1], position, vector):
                read = _read(lm, input_ids, piece, line, [])
            still = any(criterion.is_massive(read[layer], medians[layer]) for layer in (line.born_at, line.peak_layer))
            source = "embedding (block 0 input)" if key[1] == "resid_in" else label
            found.append(Patch(source=source, layer=term.layer, site=key[1], replacement=name, direct=direct,
                               total=read["pre"] - base["pre"], pre_activation=read["pre"],
                               value_birth=read[line.born_at], value_peak=read[line.peak_layer], still_massive=still))
    return found
