"""The corpus as the scan reads it: each text tokenized as it is consumed and, with ``max_length``, split into
windows of at most that many tokens (each scanned as a text of its own, never truncated); and the few windows a
report keeps, read again."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ...errors import UsageError
from ...models.loading import LoadedModel


class Window(NamedTuple):
    """One forward pass's worth of a text: the text's index and words, and the ids [1, n] of this window of it."""

    text_index: int
    text: str
    ids: torch.Tensor
    split: bool  # the text is longer than --max-length, so this window holds part of it


@dataclass
class Counts:
    """How many texts and windows a pass over the corpus has read so far."""

    texts: int = 0
    windows: int = 0

    def split_warning(self, max_length: int | None) -> str | None:
        """The report's warning where texts were split into windows, else None."""
        if self.windows <= self.texts:
            return None
        return (f"{self.texts} text(s) were split into {self.windows} windows of at most {max_length} tokens; each window is "
                "scanned as a text of its own")


def _check_max_length(lm: LoadedModel, max_length: int | None) -> None:
    context = getattr(lm.config, "max_position_embeddings", None)
    if max_length is not None and (max_length < 2 or (context and max_length > context)):
        raise UsageError(f"--max-length must be between 2 and the model's context ({context} tokens)")


def windows(
    lm: LoadedModel, texts: Iterable[str], max_length: int | None = None, counts: Counts | None = None
) -> Iterator[Window]:
    """Each window to scan, tokenized one text at a time as they are consumed.

    Without ``max_length`` a text longer than the model's context is refused. With it, a longer text is split into
    consecutive windows of at most ``max_length`` tokens, each scanned as a text of its own (never truncated).
    """
    _check_max_length(lm, max_length)
    context = getattr(lm.config, "max_position_embeddings", None)
    for index, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise UsageError(f"text {index + 1} has no tokens")
        if max_length is None and context and ids.shape[1] > context:
            raise UsageError(
                f"text {index + 1} has {ids.shape[1]} tokens, more than the model's context of {context}: split it, or pass --max-length"
            )
        parts = [ids] if max_length is None else list(ids.split(max_length, dim=1))
        if counts is not None:
            counts.texts, counts.windows = counts.texts + 1, counts.windows + len(parts)
        for window in parts:
            yield Window(index, text, window, len(parts) > 1)


def collect(
    lm: LoadedModel, texts: Iterable[str], max_length: int | None, wanted: set[int]
) -> tuple[dict[int, str], dict[int, torch.Tensor], dict[int, list[str]]]:
    """For the wanted window indices only: the window's text, its token ids, its decoded tokens. Reads the corpus
    again, lazily, and stops after the last wanted window."""
    found: tuple[dict, dict, dict] = ({}, {}, {})
    last = max(wanted, default=-1)
    for number, window in enumerate(windows(lm, texts, max_length)):
        if number > last:
            break
        if number in wanted:
            found[0][number] = lm.tokenizer.decode(window.ids[0]) if window.split else window.text
            found[1][number] = window.ids
            found[2][number] = [lm.tokenizer.decode([i]) for i in window.ids[0].tolist()]
    return found
