"""The Q/K section's tables: per block, how concentrated the queries, keys and values are in a few dims, where those
dims sit among the rotary frequencies, and the disruption test."""

from __future__ import annotations

import math

from rich.text import Text

from ..analysis.function.results import QkBlock, QkHeads, QkValues
from .tables import Style, add_row


def top_head(heads: QkHeads) -> int | None:
    """The head with the largest max/mean ratio (None where no head has a finite one)."""
    finite = [h for h, r in enumerate(heads.ratio) if math.isfinite(r)]
    return max(finite, key=lambda h: heads.ratio[h]) if finite else None


def _dims(heads: QkHeads, head: int) -> str:
    """'d23 (pair 7, low), d55 (pair 7, low)': a head's massive dims with their rotary pairs and bands."""
    return ", ".join(f"d{dim}" + (f" (pair {pair}, {band})" if pair is not None else "")
                     for dim, pair, band in zip(heads.dims[head], heads.pairs[head] or [None] * len(heads.dims[head]),
                                                heads.bands[head] or [""] * len(heads.dims[head]))) or "-"


def _cells(heads: QkHeads | None, top: bool = True) -> list[str]:
    """A block's cells for one of q, k (heads with a massive dim, the largest share, the top head and its dims) or v."""
    if heads is None:
        return ["-"] * (3 if top else 2)
    head = top_head(heads)
    massive = f"{sum(bool(d) for d in heads.dims)}/{len(heads.dims)}"
    if head is None:
        return [massive, "-", "-"] if top else [massive, "-"]
    lead = f"h{head}: {heads.ratio[head]:.1f}x, {heads.share[head]:.0%}"
    return [massive, lead, _dims(heads, head)] if top else [massive, lead]


def qk_tables(style: Style, qk: QkValues | None) -> list:
    """The section's body: one line where it was not measured, else the per-block table, the disruption test and what
    they say."""
    if qk is None:
        return [Text("Not measured: a streamed scan, or a report of an older massact (run the scan again).")]
    out: list = [Text(
        f"Per head, M_d: the L2 norm of dim d over {qk.tokens} tokens of {qk.texts} text(s), read before the rotary positions "
        f"(after q_proj/k_proj, and the q/k norm where the family has one). A dim is massive where M_d >= {qk.threshold:g} x "
        f"the head's mean M_d; share: the top {qk.top} dims' part of sum M_d^2 (a spread over the head dims gives "
        f"{qk.top} / head_dim). Keys and values per key/value head. Bands: {qk.rule}.")]
    table = style.table("Per block: heads with a massive dim / heads; the top head's max/mean and share; its massive dims "
                        "(rotary pair, band)", "block", "kind", "q massive", "q top head", "q dims", "k massive",
                        "k top head", "k dims", "v massive", "v top head", right=(0,))
    for block in qk.blocks:
        add_row(table, str(block.layer), _kind(block), *_cells(block.queries), *_cells(block.keys), *_cells(block.values, top=False))
    out.append(table)
    notes = {}
    for block in qk.blocks:
        if block.note:
            notes.setdefault(block.note, []).append(block.layer)
    out += [Text(f"Blocks {', '.join(map(str, layers))}: {note}.") for note, layers in notes.items()]
    out.append(Text(qk.summary[0].upper() + qk.summary[1:] + "."))
    d = qk.disruption
    if d is None:
        out.append(Text("Disruption test: not run (it runs with --verify on a causal LM, where some Q/K dim is massive)."))
        return out
    scores = style.table(f"Disruption test: {d.zeroed} (head, dim) entries zeroed in the queries and keys at every position, "
                         f"blocks {', '.join(map(str, d.blocks))}; the control zeroes as many other dims of the same heads "
                         f"(seed {d.seed}). Perplexity over {d.tokens} tokens of the evaluation text; passkey: {d.trials} "
                         f"prompts of up to {d.passkey_tokens} tokens", "condition", "perplexity", "passkey log-prob",
                         "passkey retrieved", right=(1, 2, 3))
    for score in (d.base, d.massive, d.control):
        add_row(scores, score.label, f"{score.perplexity:.4g}", f"{score.passkey_logprob:.2f}", f"{score.passkey_match:.0%}")
    return out + [scores, Text(d.summary[0].upper() + d.summary[1:] + ".")]


def _kind(block: QkBlock) -> str:
    return f"{block.kind} ({block.rotary_dims}/{block.head_dim} turned)" if block.kind == "partial RoPE" else block.kind


def qk_words(qk: QkValues | None) -> str:
    """The conclusion's line on the queries and keys, where some Q/K dim is massive ("" elsewhere): how many heads,
    the band of their top dims, and what zeroing them does against the control."""
    if qk is None:
        return ""
    counts = []
    bands: list[str] = []
    for name, pick in (("query", lambda b: b.queries), ("key", lambda b: b.keys)):
        heads = [pick(b) for b in qk.blocks if pick(b) is not None]
        massive = sum(bool(d) for h in heads for d in h.dims)
        counts.append(f"{massive} of {sum(len(h.dims) for h in heads)} {name} heads")
        bands += [row[0] for h in heads for row in h.bands if row and row[0]]
    if all(c.startswith("0 of") for c in counts):
        return ""
    line = f"Queries and keys: a massive dim (>= {qk.threshold:g} x its head's mean L2 norm) in {' and '.join(counts)}"
    if bands:
        line += f"; the top dim in the low-frequency rotary band in {bands.count('low')} of {len(bands)}"
    d = qk.disruption
    if d is not None:
        line += (f". Zeroing them takes perplexity from {d.base.perplexity:.3g} to {d.massive.perplexity:.3g}, against "
                 f"{d.control.perplexity:.3g} for as many other dims, and the passkey's log-probability from "
                 f"{d.base.passkey_logprob:.2f} to {d.massive.passkey_logprob:.2f} (control {d.control.passkey_logprob:.2f})")
    return line + "."
