"""Steps 1-2: scan every block's residual output, detect massive activations, group them by dim."""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..capture.hooks import tap
from ..capture.stats import LogHistogram, TopK
from ..models.loading import LoadedModel
from .results import Criterion, DimSummary, Entry, LayerStats, Massive


@dataclass
class LayerScan:
    """Per block: a median sketch and the largest |a| (candidates for massive), plus the first non-finite value."""

    histograms: list[LogHistogram]
    tops: list[TopK]
    nonfinite: tuple[int, int, int, int] | None  # (layer, text, position, dim) of the first inf/nan

    def medians(self) -> list[float]:
        return [histogram.quantile(0.5) for histogram in self.histograms]


def pad_batch(inputs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [1, n_i] token ids into [batch, max n] ids and the attention mask (1 = real token).

    With right padding a causal model computes every real token exactly as alone: pads come after it and are
    masked out as keys, and positions still count from 0.
    """
    longest = max(ids.shape[1] for ids in inputs)
    ids = torch.full((len(inputs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), longest), dtype=torch.long)
    for row, one in enumerate(inputs):
        ids[row, : one.shape[1]] = one[0]
        mask[row, : one.shape[1]] = 1
    return ids, mask


def scan_layers(
    lm: LoadedModel,
    inputs: Sequence[torch.Tensor],
    candidates: int = 512,
    on_text: Callable[[int], None] | None = None,
    batch_size: int = 8,
) -> LayerScan:
    """Batched forward passes; hooks on every block's resid_out keep only a histogram and a top-k, on device.
    Padding positions never enter a statistic."""
    n_layers = len(lm.adapter.blocks(lm.model))
    histograms = [LogHistogram(device=lm.device) for _ in range(n_layers)]
    tops = [TopK(candidates) for _ in range(n_layers)]
    batch: dict = {}

    def record(layer: int, site: str, hidden: torch.Tensor) -> None:
        # A few whole-batch operations and no host sync: this runs once per block per batch.
        values = hidden.detach().float()  # [batch, positions, d_model]
        valid = batch["mask"].to(values.device)  # [batch, positions], False at padding
        histograms[layer].update(values[valid])
        width = values.shape[2]
        magnitude = values.abs().masked_fill(~valid.unsqueeze(-1), -1.0).flatten(1)  # pads at -1: never chosen over a real value
        top = magnitude.topk(min(candidates, magnitude.shape[1]), dim=1)
        real = top.values != -1.0  # drops pads only; NaN and inf stay, and sort first, so overflow is seen below
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(top.indices)
        labels = torch.stack([rows + batch["first"], top.indices // width, top.indices % width], dim=-1)[real]
        tops[layer].update(values.flatten(1).gather(1, top.indices)[real], labels)

    sites = [(layer, "resid_out") for layer in range(n_layers)]
    with torch.no_grad(), tap(lm.model, lm.adapter, sites, record):
        for first in range(0, len(inputs), batch_size):
            chunk = inputs[first : first + batch_size]
            ids, mask = pad_batch(chunk)
            batch.update(first=first, mask=mask.bool())
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            if on_text:
                for index in range(first, first + len(chunk)):
                    on_text(index)
    return LayerScan(histograms, tops, first_nonfinite(tops))


def first_nonfinite(tops: list[TopK]) -> tuple[int, int, int, int] | None:
    """(layer, text, position, dim) of an inf or nan in the earliest block that has one. The top-k holds them:
    torch sorts nan and inf above every finite |a|."""
    for layer, top in enumerate(tops):
        for value, (text, position, dim) in top.items():
            if not math.isfinite(value):
                return layer, text, position, dim
    return None


def layer_stats(scan: LayerScan, tokens: list[list[str]], top_k: int) -> list[LayerStats]:
    stats = []
    for layer, (median, top) in enumerate(zip(scan.medians(), scan.tops)):
        entries = [Entry(value, t, p, tokens[t][p], d) for value, (t, p, d) in top.items()[:top_k]]
        ratio = abs(entries[0].value) / median if entries and median > 0 else float("nan")
        stats.append(LayerStats(layer, median, ratio, entries))
    return stats


def detect(scan: LayerScan, tokens: list[list[str]], criterion: Criterion) -> list[Massive]:
    """Every candidate with |a| >= min_abs and |a| >= min_ratio x its block's median |a|, by block then |a|."""
    found = []
    for layer, (median, top) in enumerate(zip(scan.medians(), scan.tops)):
        for value, (t, p, d) in top.items():
            if abs(value) >= criterion.min_abs and abs(value) >= criterion.min_ratio * median:
                found.append(Massive(layer, t, p, tokens[t][p], d, value, abs(value) / median))
    return found


def group_dims(massive: list[Massive], n_layers: int) -> list[DimSummary]:
    """Per dim: first block where it is massive, every such block, and each block after which it is not massive."""
    summaries = []
    for dim in sorted({m.dim for m in massive}):
        entries = [m for m in massive if m.dim == dim]
        layers = sorted({m.layer for m in entries})
        removed = [layer + 1 for layer in layers if layer + 1 not in layers and layer + 1 < n_layers]
        tokens = list(dict.fromkeys(m.token for m in entries))
        summaries.append(DimSummary(dim, layers[0], layers, removed, max((m.value for m in entries), key=abs), tokens))
    return summaries
