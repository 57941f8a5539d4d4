"""The evaluation text scored many times over, once per intervention, without repeating work: its windows go through
the model in batches of equal-length windows, and the unmodified input of the blocks interventions start at is kept per batch, so a
pass under an intervention at block L runs blocks L onward only (``massact.capture.prefix``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...capture.batches import pad_batch
from ...capture.hooks import forward_until
from ...capture.prefix import Scratch, head_rows, keep_block_inputs, run_from
from ...models.loading import LoadedModel
from ..detect.results import Findings
from ..mechanism.results import Mechanism
from .embeddings import EmbeddingEvaluation, headless
from .mlm import Scored, masked_windows, next_token_windows
from .perplexity import EvalText, eval_windows

EVAL_BATCH = 4  # windows per forward pass: 4 x 256 tokens keep the logits of a batch near 200 MB for a 49k vocabulary
ROWS = 128  # positions reduced at a time over the vocabulary: one piece (25 MB for 49k) stays in cache


@dataclass
class EvalBatch:
    """Windows of one length: ids and attention mask [batch, n] on the model's device, labels [batch, n] (the token
    each position predicts, -100 where none: the last position of a causal window, unmasked tokens), and per
    start block the unmodified output of the block before it on these ids."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    inputs: dict[int, Any] = field(default_factory=dict)


def batches(lm: LoadedModel, scored: list[Scored], size: int = EVAL_BATCH) -> list[EvalBatch]:
    """The (ids, labels) windows, up to ``size`` consecutive windows of one length at a time (the windows are cut
    to one length but the last): no padding, so an edit that looks at a whole sequence (the massive replacement's
    median over the sequence) sees each window exactly as alone."""
    groups: list[list[Scored]] = []
    for window in scored:
        if groups and len(groups[-1]) < size and groups[-1][0][0].shape[1] == window[0].shape[1]:
            groups[-1].append(window)
        else:
            groups.append([window])
    found = []
    for group in groups:
        ids, mask = pad_batch([ids for ids, _ in group])
        labels, _ = pad_batch([labels for _, labels in group], pad_id=-100)
        found.append(EvalBatch(ids.to(lm.device), mask.to(lm.device), labels.to(lm.device)))
    return found


class Evaluation:
    """Exp of the mean cross-entropy over every labelled position of the evaluation windows: perplexity for a causal
    LM, exp(masked-LM loss) for an encoder. ``score(start)`` measures the model as it is now (under whatever
    intervention is active) and trusts that nothing before block ``start`` differs from the unmodified model.

    Nothing runs at construction: the first ``unmodified()`` pass (the output effects', or the one ``baseline``
    makes) is the whole model's, and it fills the baseline and every batch's kept block inputs on the way."""

    def __init__(self, lm: LoadedModel, scored: list[Scored], starts: Iterable[int] = (), text: EvalText | None = None):
        self.lm = lm
        self.text = text  # the evaluation text and its source, where the causal stage made this scoring
        self.starts = sorted(set(starts))
        self.batches = batches(lm, scored)
        self.positions = sum(int((b.labels != -100).sum()) for b in self.batches)
        self.cache: dict[str, float] = {}  # score per intervention target, for passes shared between stages
        self._baseline_nll: float | None = None
        self.scratch = Scratch()  # every pass's logits (and the unmodified log-probabilities) in the same memory

    @property
    def baseline_nll(self) -> float:
        """Summed cross-entropy of the unmodified model."""
        if self._baseline_nll is None:
            for _ in self.unmodified():
                pass
        return self._baseline_nll

    @property
    def baseline(self) -> float:
        return _exp_mean(self.baseline_nll, self.positions)

    def unmodified(self) -> Iterator[tuple[EvalBatch, torch.Tensor, torch.Tensor]]:
        """Each batch with the unmodified model's log-probabilities and labels there (as ``log_probs``); no
        intervention may be active while a batch is computed. The first full walk is the whole model's pass, which
        keeps each batch's start-block inputs and sums the baseline; later walks run from the latest start."""
        if self._baseline_nll is not None:
            latest = self.starts[-1] if self.starts else 0
            for batch in self.batches:
                yield batch, *self.log_probs(batch, latest)
            return
        total = 0.0
        for batch in self.batches:
            with keep_block_inputs(self.lm, self.starts) as kept:
                log_p, target = self.log_probs(batch, 0)
            batch.inputs.update(kept)
            total += float(F.nll_loss(log_p, target, reduction="sum"))
            yield batch, log_p, target
        self._baseline_nll = total

    def block_input(self, batch: EvalBatch, start: int) -> Any:
        """The unmodified output of block start-1 on this batch; a start not asked for at construction is read now,
        by a pass that stops there (any active intervention must not touch the blocks before ``start``)."""
        if start > 0 and start not in batch.inputs:
            with keep_block_inputs(self.lm, [start]) as kept:
                forward_until(self.lm.model, self.lm.adapter, start - 1, input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
            batch.inputs.update(kept)
        return batch.inputs.get(start)

    @torch.no_grad()
    def logits(self, batch: EvalBatch, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [labelled positions, vocab] and the labels there, from one pass that runs blocks ``start`` onward.
        The logits may live in memory the next pass writes over: use them before."""
        keep = batch.labels != -100
        # The head sees only the labelled positions (every one but the last of a causal window, the masked ones of an
        # encoder's), as one sequence: the model's output keeps its [batch, positions, vocab] shape.
        labelled = lambda h: h[keep].unsqueeze(0) if h.shape[:-1] == keep.shape else h
        with run_from(self.lm, start, self.block_input(batch, start)), head_rows(self.lm, labelled, self.scratch):
            logits = self.lm.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        labels = batch.labels[keep]
        if logits.shape[:-1] != keep.shape:  # the head saw only the labelled rows
            return logits.reshape(len(labels), -1), labels
        return logits[keep], labels

    def log_probs(self, batch: EvalBatch, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities [labelled positions, vocab] (float32) and the labels there, from one pass that runs
        blocks ``start`` onward. They live in scratch memory the next call writes over: use them (or copy) before."""
        logits, target = self.logits(batch, start)
        logits = logits.float()
        return torch.log_softmax(logits, dim=-1, out=self.scratch.take("log_p", logits.shape, logits)), target

    def nll(self, start: int = 0) -> float:
        """Summed cross-entropy over every labelled position, the model as it is now: log-sum-exp less the label's
        logit, which reads the logits once and writes no log-probabilities."""
        total = 0.0
        for batch in self.batches:
            logits, target = self.logits(batch, start)
            for rows in range(0, len(target), ROWS):  # a piece at a time: log-sum-exp's temporaries stay small
                piece, labels = logits[rows:rows + ROWS].float(), target[rows:rows + ROWS]
                total += float((torch.logsumexp(piece, dim=-1) - piece.gather(1, labels.unsqueeze(1)).squeeze(1)).sum())
        return total

    def score(self, start: int = 0, key: str | None = None) -> float:
        """The model's score as it is now; with ``key`` (the intervention's target), measured once and remembered."""
        if key is not None and key in self.cache:
            return self.cache[key]
        value = _exp_mean(self.nll(start), self.positions)
        if key is not None:
            self.cache[key] = value
        return value


class LaneEvaluation(Evaluation):
    """The evaluation windows scored from a lane pass: a lane's score is the final norm and head on the states its
    windows left the last block with (``finals``: lane key -> batch index -> that state). ``lane(key)`` picks the lane
    that ``logits``, ``score`` and the output effects read; outside it, the unmodified one."""

    def __init__(self, lm: LoadedModel, scored, text: EvalText):
        super().__init__(lm, scored, (), text)
        self.layers = len(lm.adapter.blocks(lm.model))
        self.finals: dict[str, Callable[[int], Any]] = {}
        self.selected = "baseline"
        self._index = {id(batch): number for number, batch in enumerate(self.batches)}

    @contextmanager
    def lane(self, key: str) -> Iterator[None]:
        before, self.selected = self.selected, key
        try:
            yield
        finally:
            self.selected = before

    def block_input(self, batch, start: int) -> Any:
        return self.finals[self.selected](self._index[id(batch)])

    def unmodified(self):
        total = 0.0
        for batch in self.batches:
            with self.lane("baseline"):
                log_p, target = self.log_probs(batch, self.layers)
            total += float(F.nll_loss(log_p, target, reduction="sum"))
            yield batch, log_p, target
        self._baseline_nll = total


def _exp_mean(total: float, count: int) -> float:
    mean = total / count
    return math.exp(mean) if mean < 700 else float("inf")


def evaluation_for(lm: LoadedModel, text: EvalText, findings: Findings, mechanism: Mechanism) -> Evaluation | EmbeddingEvaluation:
    """The evaluation every intervention is scored on (masked windows of ``text`` for an encoder, next-token windows
    for a causal LM), with the unmodified input of each birth block kept (the findings' dims' and those of the
    mechanism's birth attribution and experts): the interventions all start there."""
    eval_text, dims, attribution, experts = text.text, findings.dims, mechanism.attribution, mechanism.experts
    if headless(lm):  # no head to score: its embeddings (see embeddings.py)
        return EmbeddingEvaluation(lm, eval_text, text)
    scored = masked_windows(lm, eval_text) if lm.adapter.encoder else next_token_windows(eval_windows(lm, eval_text))
    starts = {a.layer for a in attribution if a.role == "birth"} | {e.layer for e in experts if e.role == "birth"}
    return Evaluation(lm, scored, starts | {d.born_at for d in dims}, text)
