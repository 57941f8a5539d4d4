"""Texts of different lengths as one batch: the padding every stage that runs the model in batches uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
