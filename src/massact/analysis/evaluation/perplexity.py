"""Perplexity on an evaluation text: exp(mean next-token cross-entropy over every predicted token)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class EvalText:
    """The text the causal stage scores the model on, and where it came from, in the words the verification names it
    with (the shipped sample, or --eval-file)."""

    text: str
    source: str


def default_eval_text() -> str:
    """The shipped public-domain sample: the Declaration of Independence and the Gettysburg Address."""
    return resources.files("massact").joinpath("data/eval.txt").read_text(encoding="utf-8")


def eval_windows(lm: LoadedModel, text: str, window: int = 256, max_tokens: int = 4096) -> list[torch.Tensor]:
    """The text's tokens cut into [1, <= window] pieces, each with a first token like a fresh input."""
    window = min(window, getattr(lm.config, "max_position_embeddings", None) or window)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    windows = [ids[start : start + window].unsqueeze(0) for start in range(0, len(ids), window)]
    windows = [w for w in windows if w.shape[1] >= 2]
    if not windows:
        raise UsageError("the evaluation text has fewer than 2 tokens")
    return windows


@torch.no_grad()
def perplexity(lm: LoadedModel, windows: list[torch.Tensor]) -> float:
    """Token-weighted: exp(sum of next-token NLL / number of predicted tokens) over all windows, each its own pass."""
    return perplexity_of((lm.model(input_ids=ids.to(lm.device), use_cache=False).logits, ids) for ids in windows)


def perplexity_of(scored: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``perplexity`` from each window's logits [1, n, vocab] and its ids [1, n], however the logits were computed
    (a whole-model pass, or a streamed model's last block through the head)."""
    total, count = 0.0, 0
    for logits, ids in scored:
        total += next_token_nll(logits, ids)
        count += ids.shape[1] - 1
    mean = total / count
    return math.exp(mean) if mean < 700 else float("inf")


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The summed next-token cross-entropy of one window ``ids`` [1, n] from its logits [1, n, vocab]."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum"))
