"""What an intervention takes from the model's predictions: the KL divergence from the unmodified model, the tokens
whose average probability rises and falls most, and the probability mass on stopwords and punctuation (Yu et al.
2024: without the super weight, mass moves to stopwords). One batch of windows at a time: the unmodified distributions
are computed once per batch and compared with each intervention's, and only sums are kept."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from ...models.loading import LoadedModel
from ..evaluation.windows import ROWS, Evaluation
from .results import OutputEffect, TokenShift

TOP_TOKENS = 5

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers herself him
himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or other
our ours ourselves out over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves
""".split())


def token_classes(lm: LoadedModel, vocab: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every vocabulary entry decoded, and boolean masks [vocab] of the stopwords (the built-in English list, case and
    surrounding spaces ignored) and of the punctuation tokens (every character Unicode punctuation)."""
    known = min(vocab, len(lm.tokenizer))
    words = _decode_each(lm.tokenizer, known) + [""] * (vocab - known)
    stripped = [w.strip() for w in words]
    stop = torch.tensor([w.lower() in STOPWORDS for w in stripped])
    punct = torch.tensor([bool(w) and all(unicodedata.category(c).startswith("P") for c in w) for w in stripped])
    return words, stop, punct


def _decode_each(tokenizer, count: int) -> list[str]:
    """Token ids 0..count-1, each decoded alone. A fast tokenizer without space clean-up decodes them in its Rust
    backend, ten times faster than the Python loop of ``batch_decode`` (which gives the same strings)."""
    ids = [[i] for i in range(count)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


class Edit(NamedTuple):
    """An intervention to measure: its name and target as the report spells them, a factory of its context manager,
    and the first block it changes (the passes under it run from there on)."""

    name: str
    target: str
    context: Callable[[], AbstractContextManager]
    start: int = 0


class _Sums:
    """Running sums over the scored positions of one intervention."""

    def __init__(self, vocab: int, device: torch.device):
        self.probability = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.kl = 0.0
        self.nll = 0.0
        self.stop = 0.0
        self.punct = 0.0

    def add(self, scores: torch.Tensor, target: torch.Tensor, classes: torch.Tensor,
            base: tuple[torch.Tensor, torch.Tensor] | None = None, normalized: bool = False) -> None:
        """One batch: its logits [positions, vocab] (``normalized``: its log-probabilities), labels, the stopword
        and punctuation masks as the columns of a float matrix [vocab, 2], and (for an intervention) the unmodified
        log-probabilities and probabilities.

        The batch goes ROWS positions at a time: each piece's log-probabilities are made and used while they are
        in cache, where the whole batch's (hundreds of MB) would be written out and read back for each sum."""
        for first in range(0, len(target), ROWS):
            rows = slice(first, first + ROWS)
            log_p = scores[rows] if normalized else torch.log_softmax(scores[rows].float(), dim=-1)
            p = log_p.exp()
            # A piece's column sums are exact enough in float32 (at most ROWS terms below 1); the run's in float64.
            self.probability += p.sum(0)
            self.nll -= float(log_p.gather(1, target[rows].unsqueeze(1)).sum())
            stop, punct = (p @ classes).sum(0).tolist()
            self.stop += stop
            self.punct += punct
            if base is not None:  # KL(unmodified || intervened) = sum p_base (log p_base - log p_int)
                base_log_p, base_p = base[0][rows], base[1][rows]
                self.kl += float((base_p * (base_log_p - log_p)).sum())  # sum(), not a dot: its float32 drifts by 1e-4


@torch.no_grad()
def output_effects(lm: LoadedModel, evaluation: Evaluation, interventions: list[Edit]) -> list[OutputEffect]:
    """For each intervention: the effect on the distributions at every labelled position of the evaluation windows
    (next-token windows, or masked windows of an encoder), against the unmodified model. The unmodified pass is
    the evaluation's own (its first pass also gives the baseline and the kept block inputs)."""
    if not interventions:
        return []
    device = lm.device
    base: _Sums | None = None
    sums: list[_Sums] = []
    positions = 0
    for batch, base_log_p, target in evaluation.unmodified():
        if base is None:  # the vocabulary's size is known from the first logits
            vocab = base_log_p.shape[-1]
            words, stop, punct = token_classes(lm, vocab)
            classes = torch.stack([stop, punct], dim=1).to(device=device, dtype=base_log_p.dtype)
            base, sums = _Sums(vocab, device), [_Sums(vocab, device) for _ in interventions]
        base.add(base_log_p, target, classes, normalized=True)
        unmodified = (base_log_p, torch.exp(base_log_p, out=evaluation.scratch.take("p", base_log_p.shape, base_log_p)))
        for edit, running in zip(interventions, sums):
            with edit.context():
                logits, _ = evaluation.logits(batch, edit.start)
            running.add(logits, target, classes, unmodified)
        positions += len(target)
    before = base.probability / positions
    effects = []
    for (name, target_name, _, _), running in zip(interventions, sums):
        after = running.probability / positions
        change = after - before
        shifts = lambda order, after=after: [TokenShift(token=words[i], id=i, before=float(before[i]), after=float(after[i]))
                                             for i in order.tolist()]
        mean_nll = running.nll / positions
        effects.append(OutputEffect(
            name=name, target=target_name, positions=positions, kl=running.kl / positions,
            perplexity=math.exp(mean_nll) if mean_nll < 700 else float("inf"),
            stopword_before=base.stop / positions, stopword_after=running.stop / positions,
            punctuation_before=base.punct / positions, punctuation_after=running.punct / positions,
            rises=shifts(change.topk(TOP_TOKENS).indices), falls=shifts((-change).topk(TOP_TOKENS).indices),
        ))
    return effects
