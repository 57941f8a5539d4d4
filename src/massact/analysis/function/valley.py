"""The compression valley (Queipo-de-Llano et al. 2025): per block, how much of the token representations' spread one
direction takes, measured as the matrix-based entropy of their Gram matrix, with and without the tokens that carry a
massive activation; where in depth the entropy is lowest, against the massive value's birth; and how it moves with the
first token's share of the norm and with the sink rate.

For one text at one block, X is the block's output (the detection stream, raw HF values) at the text's real
positions, [positions, width], its rows not centered (the paper's Gram matrix of the representations). K = X X^T /
tr(X X^T) has eigenvalues p_i >= 0 that sum to 1; the entropy is their Shannon entropy (Renyi's of order alpha = 1,
the von Neumann entropy of K), -sum p_i log p_i, over log(positions) so that texts of different lengths compare: 0
where one direction holds every token (rank one), 1 where the tokens are orthogonal and of one norm. X X^T and X^T X
share their nonzero eigenvalues: the smaller of the two is decomposed, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...capture.batches import pad_batch
from ...capture.hooks import tap
from ...models.loading import LoadedModel
from ..detect.results import DimSummary, Findings
from ..mechanism.lifeline import main_carrier
from .results import CompressionValley

VALLEY_TEXTS = 6  # texts measured: the massive dims' carriers first, then the first kept ones (the token view's texts)


def valley_texts(findings: Findings, inputs: dict[int, torch.Tensor]) -> list[int]:
    """The texts measured: the main carriers' texts of the massive dims, strongest first, then the first kept windows,
    VALLEY_TEXTS in all (the token view's texts, which a streamed mechanism pass already runs)."""
    strongest = sorted(findings.dims, key=lambda d: -abs(d.max_value))
    carriers = [main_carrier(findings.massive, d.dim).text for d in strongest]
    return list(dict.fromkeys(carriers + sorted(inputs)))[:VALLEY_TEXTS]


def gram_spectrum(x: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of X X^T for ``x`` [rows, width] (float64, ascending, negative rounding clamped to 0), from the
    smaller of X X^T [rows, rows] and X^T X [width, width]: both have the same nonzero eigenvalues."""
    x = x.to(torch.float64)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).clamp(min=0)


def spectrum_entropy(eigenvalues: torch.Tensor) -> float:
    """The Shannon entropy (nats) of ``eigenvalues`` divided by their sum: -sum p_i log p_i (0 log 0 = 0); NaN where
    they sum to 0 (every row zero)."""
    total = eigenvalues.sum()
    if not total > 0:
        return math.nan
    p = eigenvalues / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def matrix_entropy(x: torch.Tensor) -> float:
    """The normalized matrix-based entropy of the rows of ``x`` [rows, width]: the entropy of the eigenvalues of
    X X^T / tr(X X^T), over log(rows); 0 for rank one, 1 for orthonormal rows. NaN for fewer than 2 rows, or where
    some value is not finite."""
    rows = x.shape[0]
    if rows < 2 or not bool(torch.isfinite(x).all()):  # an overflowed or NaN block has no spectrum
        return math.nan
    scale = x.abs().max()
    # The entropy does not depend on the scale; dividing by the largest |x| keeps the Gram matrix far from overflow.
    return spectrum_entropy(gram_spectrum(x / scale if scale > 0 else x)) / math.log(rows)


@dataclass(kw_only=True)
class Reading:
    """One text at one block: the normalized ``entropy`` of its rows, ``entropy_without`` of the rows without a massive
    activation (NaN where fewer than 2 remain); the first token's share of the squared Frobenius norm, ||x_0||^2 /
    ||X||_F^2 (``first_share``), and among the rows without a massive activation (``first_share_without``, NaN where the
    first token carries one); how many rows carry one (``massive``) and their share of ||X||_F^2 (``massive_share``)."""

    entropy: float
    entropy_without: float
    first_share: float
    first_share_without: float
    massive: int
    massive_share: float


def reading(x: torch.Tensor, massive: torch.Tensor) -> Reading:
    """The ``Reading`` of one text's rows ``x`` [positions, width] at one block; ``massive``: bool [positions], True at
    the rows where some dim is massive."""
    x = x.to(torch.float64)
    squares = (x * x).sum(-1)
    total = float(squares.sum())
    kept = ~massive
    kept_total = float(squares[kept].sum())
    share = lambda part, whole: part / whole if whole > 0 else math.nan
    entropy = matrix_entropy(x)
    return Reading(entropy=entropy, entropy_without=matrix_entropy(x[kept]) if bool(massive.any()) else entropy,
                   first_share=share(float(squares[0]), total),
                   first_share_without=share(float(squares[0]), kept_total) if bool(kept[0]) else math.nan,
                   massive=int(massive.sum()), massive_share=share(total - kept_total, total))


def massive_rows(hidden: torch.Tensor, medians: torch.Tensor, findings: Findings) -> torch.Tensor:
    """bool [positions]: the rows of ``hidden`` ([positions, width], or [positions, streams, width] with
    hyper-connections) where the scan's criterion calls some dim massive against the block's median (``medians``:
    one, or one per stream)."""
    magnitude = hidden.float().abs()
    median = medians.to(hidden.device).reshape(-1, 1) if hidden.dim() == 3 else medians.to(hidden.device)
    return findings.criterion.is_massive(magnitude, median).flatten(1).any(-1)


def block_medians(lm: LoadedModel, findings: Findings) -> list[torch.Tensor]:
    """Per block, the median(s) a value of the detection stream is judged against: the block's, or with
    hyper-connections each stream's own."""
    if lm.adapter.hyper is None:
        return [torch.tensor(m) for m in findings.medians]
    names = [f"s{k}" for k in range(lm.adapter.streams(lm.config))]
    per_stream = [findings.stream_medians(name) for name in names]
    return [torch.tensor([column[layer] for column in per_stream]) for layer in range(len(findings.layers))]


def read_block(hidden: torch.Tensor, medians: torch.Tensor, findings: Findings) -> Reading:
    """The ``Reading`` of one text's detection stream at one block (``hidden``: its real positions; with
    hyper-connections [positions, streams, width], the streams side by side as one row per token)."""
    massive = massive_rows(hidden, medians, findings)
    return reading(hidden.reshape(hidden.shape[0], -1), massive)


@torch.no_grad()
def read_valley(lm: LoadedModel, inputs: dict[int, torch.Tensor], texts: list[int], findings: Findings) -> dict[tuple[int, int], Reading]:
    """(text, block) -> ``Reading`` of ``texts`` (window indices of ``inputs``), in one batched forward pass with the
    detection stream tapped at every block, each text judged on its own real positions."""
    n_layers = len(lm.adapter.blocks(lm.model))
    medians = block_medians(lm, findings)
    lengths = [inputs[text].shape[1] for text in texts]
    ids, mask = pad_batch([inputs[text] for text in texts])
    found: dict[tuple[int, int], Reading] = {}

    def keep(layer: int, _, hidden: torch.Tensor) -> None:
        for row, (text, length) in enumerate(zip(texts, lengths)):
            found[text, layer] = read_block(hidden[row, :length].detach(), medians[layer], findings)

    with tap(lm.model, lm.adapter, [(layer, lm.adapter.stream) for layer in range(n_layers)], keep):
        lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    return found


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """The correlation of the pairs where both are finite; None for fewer than 3 such pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    mx, my = (sum(v) / len(pairs) for v in zip(*pairs))
    cov = sum((x - mx) * (y - my) for x, y in pairs)
    sx, sy = (math.sqrt(sum((v - m) ** 2 for v in side)) for side, m in zip(zip(*pairs), (mx, my)))
    return cov / (sx * sy) if sx > 0 and sy > 0 else None


def _mean(values: list[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def valley_at(curve: list[float]) -> tuple[int | None, float | None]:
    """The block of the curve's lowest finite value (the first, on a tie), and how far the curve falls into it: the
    highest value at or before it minus the lowest. (None, None) for a curve without a finite value."""
    finite = [layer for layer, value in enumerate(curve) if math.isfinite(value)]
    if not finite:
        return None, None
    low = min(finite, key=lambda layer: curve[layer])
    return low, max(curve[layer] for layer in finite if layer <= low) - curve[low]


def _depth(layer: int | None, n_layers: int) -> float | None:
    return None if layer is None else layer / (n_layers - 1) if n_layers > 1 else 0.0


def compression_valley(readings: dict[tuple[int, int], Reading], texts: list[int], n_layers: int, dims: list[DimSummary],
                       sink_rate: list[float] | None = None) -> CompressionValley:
    """The section from each (text, block) ``Reading`` of ``texts``: per block the means over the texts, the valley
    with and without the massive tokens, the birth block of the strongest massive dim (``dims``) and the valley's
    distance to it, and across blocks the entropy's correlation with the first token's share and (``sink_rate``: the
    sink section's per-block rate, where it was measured) with the sink rate."""
    per_block = lambda name: [_mean([getattr(readings[text, layer], name) for text in texts]) for layer in range(n_layers)]
    entropy, without = per_block("entropy"), per_block("entropy_without")
    first, first_without, share = per_block("first_share"), per_block("first_share_without"), per_block("massive_share")
    massive = [sum(readings[text, layer].massive for text in texts) for layer in range(n_layers)]
    low, drop = valley_at(entropy)
    low_without, drop_without = valley_at(without)
    birth = max(dims, key=lambda d: abs(d.max_value)).born_at if dims else None
    gap = without[low] - entropy[low] if low is not None else math.nan
    found = CompressionValley(
        texts=list(texts), entropy=entropy, entropy_without=without, first_share=first, first_share_without=first_without,
        massive_tokens=massive, massive_share=share, valley=low, valley_depth=_depth(low, n_layers), drop=drop,
        valley_without=low_without, valley_without_depth=_depth(low_without, n_layers), drop_without=drop_without, gap=gap,
        birth=birth, from_birth=None if birth is None or low is None else low - birth,
        first_share_correlation=pearson(entropy, first),
        sink_rate_correlation=pearson(entropy, sink_rate) if sink_rate else None, summary="")
    found.summary = valley_words(found, n_layers)
    return found


def valley_words(v: CompressionValley, n_layers: int) -> str:
    """What the section says, in words (lower case, no final stop)."""
    if v.valley is None:
        return "no block gave an entropy (every text shorter than 2 tokens)"
    words = (f"the entropy of the token representations is lowest at block {v.valley} of {n_layers} ({v.valley_depth:.0%} of the "
             f"depth): {v.entropy[v.valley]:.3f}, {v.drop:.3f} below the highest block before it")
    if v.birth is not None:
        where = ("at the birth block" if v.from_birth == 0 else
                 f"{abs(v.from_birth)} block{'s' if abs(v.from_birth) != 1 else ''} {'after' if v.from_birth > 0 else 'before'} "
                 f"the birth block {v.birth}")
        words += f", {where} of the strongest massive dim"
    if any(v.massive_tokens):
        if v.valley_without is None:
            words += "; without the massive tokens no block keeps 2 tokens"
        else:
            moved = ("stays at that block" if v.valley_without == v.valley else f"moves to block {v.valley_without}")
            words += (f"; without the massive tokens the valley {moved} (drop {v.drop_without:.3f}) and the entropy at block "
                      f"{v.valley} is {v.entropy_without[v.valley]:.3f}")
    else:
        words += "; no token is massive at any block, so the curve without the massive tokens is the same"
    if v.first_share_correlation is not None:
        words += f"; across blocks the entropy correlates {v.first_share_correlation:+.2f} with the first token's share of the norm"
    if v.sink_rate_correlation is not None:
        words += f" and {v.sink_rate_correlation:+.2f} with the sink rate"
    return words
