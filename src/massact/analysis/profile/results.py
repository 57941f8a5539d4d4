"""A model's massive-activation profile, in a form other tools use: per block, the massive dims, the threshold, the
rules that predict which tokens carry them (with their precision and recall on the scanned texts) and the outlier
severity. Plain dataclasses, read and written by ``massact.report.schema`` without torch; ``Profile.mask`` imports
torch only when called."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Rule:
    """One way to predict a carrier without a forward pass: ``kind`` "position" (the ``position``-th real token of a
    sequence, 0 = the first) or "token" (every token with id ``token_id``, decoded ``token``). On the scanned texts it
    flagged ``predicted`` tokens, ``carriers`` of which were massive at this block: ``precision`` = carriers /
    predicted; ``recall`` = carriers / the block's massive tokens. A token rule is measured on positions after the
    first (the first is the position rule's)."""

    kind: str
    position: int | None = None
    token_id: int | None = None
    token: str | None = None
    carriers: int
    predicted: int
    precision: float
    recall: float


@dataclass(kw_only=True)
class BlockProfile:
    """Block ``layer``'s output (resid_out). ``median``: the scan's median |a| there over every scanned token;
    ``threshold`` = max(min_abs, min_ratio x median): a token is massive when some dim's |a| reaches it; ``dims``:
    those dims; ``massive_tokens`` of ``tokens`` real tokens. ``carriers`` says what carries them: "position 0",
    "token ids", "position 0 + token ids" (the rules find at least ``EXPLAINED`` of them), "content-dependent" (no
    rule does), or "none"; ``rules`` are the rules ``Profile.mask`` applies, ``precision`` and ``recall`` theirs
    together. ``gamma`` = ||mean|| / ||std|| of the hidden state over the real tokens (Simon et al. 2026's outlier
    severity; std per dim, population), ``gamma_without`` the same without this block's massive tokens."""

    layer: int
    median: float
    threshold: float
    dims: list[int]
    massive_tokens: int
    tokens: int
    carriers: str
    rules: list[Rule] = field(default_factory=list)
    precision: float = float("nan")
    recall: float = float("nan")
    gamma: float
    gamma_without: float


@dataclass(kw_only=True)
class Profile:
    """What a model's massive activations are, block by block, on ``windows`` scanned windows (``tokens`` real
    tokens) with the criterion |a| >= ``min_abs`` and >= ``min_ratio`` x the block's median |a|."""

    model: str
    source: str | None
    weights_sha256: str | None = None
    corpus: str
    windows: int
    tokens: int
    min_abs: float
    min_ratio: float
    pad_token_id: int | None = None
    blocks: list[BlockProfile]

    def massive_blocks(self) -> list[BlockProfile]:
        """The blocks where some token is massive."""
        return [block for block in self.blocks if block.massive_tokens]

    def mask(self, input_ids, layer: int | None = None, attention_mask=None):
        """bool [batch, positions]: True where a token is predicted to carry a massive activation at block ``layer``
        (None: at any block), from the rules alone (no forward pass). ``input_ids``: [batch, positions] (a tensor or
        nested lists); ``attention_mask`` (1 = real token) handles left or right padding: padding is never flagged,
        and "position 0" is each sequence's first real token."""
        import torch

        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        real = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else torch.as_tensor(attention_mask, device=ids.device).bool())
        rank = real.long().cumsum(1) - 1  # each real token's position among the sequence's real tokens
        blocks = self.blocks if layer is None else [self.blocks[layer]]
        flagged = torch.zeros_like(real)
        for block in blocks:
            for rule in block.rules:
                if rule.kind == "position":
                    flagged |= rank == rule.position
                else:
                    flagged |= ids == rule.token_id
        return flagged & real

    def __repr__(self) -> str:
        found = self.massive_blocks()
        lines = [f"Profile({self.model}: {len(found)} of {len(self.blocks)} blocks with massive tokens, "
                 f"{self.tokens:,} tokens in {self.windows:,} windows; |a| >= {self.min_abs:g} and >= {self.min_ratio:g} x median)"]
        if found:
            lines.append(f"  {'block':>5}  {'threshold':>10}  {'dims':<16} {'massive':>8}  {'carriers':<24} {'prec':>5} {'rec':>5}  "
                         f"{'gamma':>7} {'w/o':>6}")
        for b in found:
            dims = ",".join(map(str, b.dims[:4])) + ("..." if len(b.dims) > 4 else "")
            lines.append(f"  {b.layer:>5}  {b.threshold:>10,.1f}  {dims:<16} {b.massive_tokens:>8,}  {b.carriers:<24} "
                         f"{b.precision:>5.2f} {b.recall:>5.2f}  {b.gamma:>7.3f} {b.gamma_without:>6.3f}")
        return "\n".join(lines)
