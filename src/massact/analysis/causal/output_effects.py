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
from .evaluation import Evaluation
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
    words = lm.tokenizer.batch_decode([[i] for i in range(known)]) + [""] * (vocab - known)
    stripped = [w.strip() for w in words]
    stop = torch.tensor([w.lower() in STOPWORDS for w in stripped])
    punct = torch.tensor([bool(w) and all(unicodedata.category(c).startswith("P") for c in w) for w in stripped])
    return words, stop, punct


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

    def add(self, log_p: torch.Tensor, target: torch.Tensor, stop: torch.Tensor, punct: torch.Tensor,
            base_log_p: torch.Tensor | None) -> None:
        p = log_p.exp()
        self.probability += p.sum(0, dtype=torch.float64)
        self.nll -= float(log_p.gather(1, target.unsqueeze(1)).sum())
        self.stop += float(p[:, stop].sum())
        self.punct += float(p[:, punct].sum())
        if base_log_p is not None:  # KL(unmodified || intervened) = sum p_base (log p_base - log p_int)
            self.kl += float((base_log_p.exp() * (base_log_p - log_p)).sum())


@torch.no_grad()
def output_effects(lm: LoadedModel, evaluation: Evaluation, interventions: list[Edit]) -> list[OutputEffect]:
    """For each intervention: the effect on the distributions at every labelled position of the evaluation windows
    (next-token windows, or masked windows of an encoder), against the unmodified model."""
    if not interventions:
        return []
    device = lm.device
    base: _Sums | None = None
    sums: list[_Sums] = []
    positions = 0
    # The unmodified distributions: any start gives them; the latest runs the fewest blocks.
    latest = max(edit.start for edit in interventions)
    for batch in evaluation.batches:
        base_log_p, target = evaluation.log_probs(batch, latest)
        if base is None:  # the vocabulary's size is known from the first logits
            vocab = base_log_p.shape[-1]
            words, stop, punct = token_classes(lm, vocab)
            stop, punct = stop.to(device), punct.to(device)
            base, sums = _Sums(vocab, device), [_Sums(vocab, device) for _ in interventions]
        base.add(base_log_p, target, stop, punct, None)
        for edit, running in zip(interventions, sums):
            with edit.context():
                log_p, _ = evaluation.log_probs(batch, edit.start)
            running.add(log_p, target, stop, punct, base_log_p)
        positions += len(target)
    before = base.probability / positions
    effects = []
    for (name, target_name, _, _), running in zip(interventions, sums):
        after = running.probability / positions
        change = after - before
        shifts = lambda order: [TokenShift(token=words[i], id=i, before=float(before[i]), after=float(after[i])) for i in order.tolist()]
        mean_nll = running.nll / positions
        effects.append(OutputEffect(
            name=name, target=target_name, positions=positions, kl=running.kl / positions, perplexity=math.exp(mean_nll) if mean_nll < 700 else float("inf"),
            stopword_before=base.stop / positions, stopword_after=running.stop / positions, punctuation_before=base.punct / positions, punctuation_after=running.punct / positions,
            rises=shifts(change.topk(TOP_TOKENS).indices), falls=shifts((-change).topk(TOP_TOKENS).indices),
        ))
    return effects
