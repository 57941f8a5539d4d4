"""A model's massive-activation profile, in a form other tools use: per block, the massive dims, the threshold, the
rules that predict which tokens carry them (with their precision and recall on the scanned texts) and the outlier
severity. Plain dataclasses, read and written by ``massact.report.schema`` without torch; ``Profile.mask`` imports
torch only when called."""

from __future__ import annotations

import numbers
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
    severity; std per dim, population), ``gamma_without`` the same without this block's massive tokens. With
    hyper-connections the output is N streams: ``median`` and ``threshold`` are over all of them, a token is massive
    when some dim of some stream reaches that stream's own threshold (``stream_thresholds``, from the scan's median in
    each stream), and gamma is of the streams side by side (one vector of N x d_model)."""

    layer: int
    median: float
    threshold: float
    stream_thresholds: list[float] = field(default_factory=list)
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
    tokens) with the criterion |a| >= ``min_abs`` and >= ``min_ratio`` x the block's median |a|. ``pad_token_id``
    and ``bos_token_id``: the tokenizer's padding and BOS ids (None: it has none), which ``mask`` reads to infer
    padding without an attention mask. ``blocks``: one per block, ``blocks[i].layer == i``."""

    model: str
    source: str | None
    weights_sha256: str | None = None
    corpus: str
    windows: int
    tokens: int
    min_abs: float
    min_ratio: float
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    blocks: list[BlockProfile]

    def massive_blocks(self) -> list[BlockProfile]:
        """The blocks where some token is massive."""
        return [block for block in self.blocks if block.massive_tokens]

    def mask(self, input_ids, layer: int | None = None, attention_mask=None):
        """bool [batch, positions]: True where a token is predicted to carry a massive activation at block ``layer``
        (None: at any block; else an integer from 0 to the last block), from the rules alone (no forward pass).
        ``input_ids``: integer token ids [batch, positions], a tensor or nested lists; one sequence [positions] is
        read as one row, and its mask is [1, positions]. ``attention_mask`` (1 = real token, 0 = padding; the ids'
        shape) handles left or right padding: padding is never flagged, and "position 0" is each sequence's first
        real token.

        Without ``attention_mask``, padding is inferred from ``pad_token_id``: the run of that id each row starts
        with (left padding) and the run it ends with (right padding) are padding, every other token is real (all of
        them when the profile has no pad id). That is sound only when the pad id never opens or closes a real text:
        true of a dedicated padding token, not of a pad that is also a token the texts hold. Two such cases are
        refused with a ValueError asking for ``attention_mask``, because the ids alone cannot tell padding from the
        text there: a row that starts with the pad id when the pad id is the tokenizer's BOS (``bos_token_id``:
        the BOS that opens each text is then inside the run), and a batch with the pad id at a row's edge when a
        rule being applied flags that very id. A pad that is the EOS (a window cut from a stream of documents may
        open or close with it) is not detected: pass ``attention_mask`` there (``torch.ones_like(ids)`` when
        nothing is padded)."""
        import torch

        ids = torch.as_tensor(input_ids)
        if ids.numel() == 0:
            ids = ids.long()  # torch reads an empty list as float
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, not {ids.dtype}")
        one_row = ids.dim() == 1
        if one_row:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, positions] (or one sequence [positions]), not of shape {list(ids.shape)}")
        ids = ids.long()
        blocks = self._blocks_at(layer)
        if attention_mask is None:
            real = self._inferred_real(ids, blocks)
        else:
            real = torch.as_tensor(attention_mask, device=ids.device)
            if one_row and real.dim() == 1:
                real = real.unsqueeze(0)
            if real.shape != ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids, {list(ids.shape)}, not {list(real.shape)}")
            if not ((real == 0) | (real == 1)).all():
                raise ValueError("attention_mask must hold 1 (a real token) and 0 (padding) only")
            real = real.bool()
        rank = real.long().cumsum(1) - 1  # each real token's position among the sequence's real tokens
        largest = torch.iinfo(torch.long).max
        flagged = torch.zeros_like(real)
        for block in blocks:
            for rule in block.rules:
                # A position past the row or an id past int64 flags nothing (and torch cannot compare with it).
                if rule.kind == "position" and rule.position is not None and 0 <= rule.position < ids.shape[1]:
                    flagged |= rank == rule.position
                elif rule.kind == "token" and rule.token_id is not None and 0 <= rule.token_id <= largest:
                    flagged |= ids == rule.token_id
        return flagged & real

    def _blocks_at(self, layer) -> list[BlockProfile]:
        """The blocks whose rules ``mask`` applies: every block for None, else block ``layer``, or the error naming
        ``layer`` and the range."""
        if layer is None:
            return self.blocks
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be a block index (an integer) or None (any block), not {layer!r}")
        for block in self.blocks:
            if block.layer == layer:
                return [block]
        valid = f"from 0 to {len(self.blocks) - 1}" if self.blocks else "(this profile has no blocks)"
        raise ValueError(f"layer must be a block index {valid}, or None (any block), not {layer}")

    def _inferred_real(self, ids, blocks: list[BlockProfile]):
        """bool [batch, positions], real tokens as ``mask`` infers them without an attention mask (see there)."""
        import torch

        real = torch.ones_like(ids, dtype=torch.bool)
        if self.pad_token_id is None:
            return real
        pad = ids == self.pad_token_id
        leading = pad.long().cumprod(1).bool()  # the run of pad ids a row starts with
        trailing = pad.flip(1).long().cumprod(1).flip(1).bool()  # ... and the run it ends with
        edges = leading | trailing
        if not edges.any():
            return real
        if self.pad_token_id == self.bos_token_id and leading.any():
            raise ValueError(f"a row starts with the pad id {self.pad_token_id}, which is also the tokenizer's BOS: padding "
                             "cannot be told from the BOS that opens each text; pass attention_mask")
        if any(rule.kind == "token" and rule.token_id == self.pad_token_id for block in blocks for rule in block.rules):
            raise ValueError(f"a rule flags the pad id {self.pad_token_id}, and rows start or end with it: padding cannot be "
                             "told from real tokens; pass attention_mask")
        return ~edges

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
