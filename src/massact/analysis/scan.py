"""Steps 1-2: scan every block's residual output, detect massive activations, group them by dim."""

from __future__ import annotations

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
    nonfinite: list[tuple[int, int, int, int]] = []
    batch = {"first": 0, "lengths": []}

    def record(layer: int, site: str, hidden: torch.Tensor) -> None:
        for row, length in enumerate(batch["lengths"]):
            values = hidden[row, :length].detach().float()  # [real positions, d_model]: the pads are cut off here
            text = batch["first"] + row
            width = values.shape[1]
            histograms[layer].update(values)
            flat = values.flatten()
            index = flat.abs().topk(min(candidates, flat.numel())).indices
            labels = torch.stack([torch.full_like(index, text), index // width, index % width], dim=1)
            tops[layer].update(flat[index], labels)
            if not nonfinite:
                bad = (~torch.isfinite(values)).nonzero()
                if len(bad):
                    nonfinite.append((layer, text, int(bad[0, 0]), int(bad[0, 1])))

    sites = [(layer, "resid_out") for layer in range(n_layers)]
    with torch.no_grad(), tap(lm.model, lm.adapter, sites, record):
        for first in range(0, len(inputs), batch_size):
            chunk = inputs[first : first + batch_size]
            batch["first"], batch["lengths"] = first, [ids.shape[1] for ids in chunk]
            ids, mask = pad_batch(chunk)
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            if on_text:
                for index in range(first, first + len(chunk)):
                    on_text(index)
    return LayerScan(histograms, tops, nonfinite[0] if nonfinite else None)


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
