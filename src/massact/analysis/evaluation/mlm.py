"""The evaluation of an encoder (BERT, RoBERTa): the masked-LM loss on a fixed, seeded 15% of the evaluation text's
tokens, the same masks for every intervention. A masked LM has no perplexity; exp(masked-LM loss) stands in for it."""

from __future__ import annotations

import torch

from ...errors import UsageError
from ...models.loading import LoadedModel

MASK_RATE = 0.15
MASK_SEED = 0

Scored = tuple[torch.Tensor, torch.Tensor]  # (input ids [1, n], labels [1, n]: the token to predict, -100 where none)


def masked_windows(lm: LoadedModel, text: str, window: int = 256, max_tokens: int = 4096,
                   rate: float = MASK_RATE, seed: int = MASK_SEED) -> list[Scored]:
    """The text cut into windows that each start and end with the tokenizer's own special tokens (e.g. [CLS] ...
    [SEP]), with ``rate`` of each window's other tokens (at least one) replaced by the mask token, chosen by a
    generator seeded with ``seed``. Labels hold the original token at the masked positions."""
    tokenizer = lm.tokenizer
    if tokenizer.mask_token_id is None:
        raise UsageError("the tokenizer has no mask token: a masked LM cannot be evaluated")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    special = set(tokenizer.all_special_ids)
    start, end = 0, len(ids)
    while start < end and int(ids[start]) in special:
        start += 1
    while end > start and int(ids[end - 1]) in special:
        end -= 1
    lead, body, tail = ids[:start], ids[start:end][:max_tokens], ids[end:]
    config = lm.config
    limit = (getattr(config, "max_position_embeddings", None) or window) - lm.adapter.position_offset(config)
    size = min(window, limit) - len(lead) - len(tail)
    generator = torch.Generator().manual_seed(seed)
    found = []
    for piece in body.split(size):
        chunk = torch.cat([lead, piece, tail])
        labels = torch.full_like(chunk, -100)
        order = torch.randperm(len(piece), generator=generator)[: max(1, round(rate * len(piece)))] + len(lead)
        labels[order] = chunk[order]
        masked = chunk.clone()
        masked[order] = tokenizer.mask_token_id
        found.append((masked.unsqueeze(0), labels.unsqueeze(0)))
    if not found:
        raise UsageError("the evaluation text has no tokens to mask")
    return found


def next_token_windows(windows: list[torch.Tensor]) -> list[Scored]:
    """A causal LM's windows as (ids, labels): each position predicts the next token; the last predicts none."""
    scored = []
    for ids in windows:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        scored.append((ids, labels))
    return scored
