"""The evaluation of a headless encoder (a sentence-embedding checkpoint: the encoder without its masked-LM head) by
what it outputs, its embeddings of the evaluation sentences, against the unmodified model's:

- the cosine similarity of each sentence's mean-pooled final states (the usual sentence embedding) and of its first
  ([CLS]) final state to the unmodified model's, averaged over the sentences;
- the Spearman correlation of the pairwise similarities of the sentences (their cosine similarity matrix, mean-pooled)
  with the unmodified one: whether the model still ranks the sentences' likeness as it did.

The score the interventions are ranked by, in place of perplexity: 1 + (1 - the mean-pooled cosine), 1 for the
unmodified model, so that "x ratio" reads as it does for perplexity.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...models.loading import LoadedModel
from ..causal.results import EmbeddingChange
from .perplexity import EvalText

MAX_SENTENCES = 32  # enough pairs (496) for a stable rank correlation, one small batch
MIN_SENTENCES = 4


def headless(lm: LoadedModel) -> bool:
    """An encoder loaded without its masked-LM head (see models.loading): its output is its final hidden states."""
    return lm.adapter.encoder and lm.model.get_output_embeddings() is None


@dataclass
class Reference:
    """The evaluation sentences, tokenized as one padded batch, and the unmodified model's embeddings of them."""

    batch: dict[str, torch.Tensor]
    mean: torch.Tensor  # [sentences, d_model], mean-pooled over real tokens
    cls: torch.Tensor  # [sentences, d_model], the first token's final state
    tokens: int


def sentences(text: str) -> list[str]:
    """The text's sentences of at least three words, the first MAX_SENTENCES."""
    found = [s.strip() for s in re.split(r"(?<=[.!?;])\s+", " ".join(text.split()))]
    return [s for s in found if len(s.split()) >= 3][:MAX_SENTENCES]


@torch.no_grad()
def embed(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled, first-token) final states of the model as it is now, in float32 on the CPU."""
    final = lm.model(**{k: v.to(lm.device) for k, v in batch.items()}).last_hidden_state.float().cpu()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (final * mask).sum(1) / mask.sum(1), final[:, 0]


def reference(lm: LoadedModel, eval_text: str) -> Reference:
    """The unmodified model's embeddings of ``eval_text``'s sentences; too few sentences is a usage error."""
    found = sentences(eval_text)
    if len(found) < MIN_SENTENCES:
        raise UsageError(f"the evaluation text has {len(found)} sentence(s) of 3 words or more; a headless encoder is "
                         f"verified by its embeddings of at least {MIN_SENTENCES}")
    context = getattr(lm.config, "max_position_embeddings", 512)
    batch = lm.tokenizer(found, padding=True, truncation=True, max_length=min(context, 512), return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    mean, cls = embed(lm, batch)
    return Reference(batch=batch, mean=mean, cls=cls, tokens=int(batch["attention_mask"].sum()))


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the cosine similarity matrix of the rows of ``x``."""
    unit = F.normalize(x, dim=-1)
    similarity = unit @ unit.T
    rows, cols = torch.triu_indices(len(x), len(x), offset=1)
    return similarity[rows, cols]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two vectors (the Pearson correlation of their ranks)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp(min=1e-12))


def change(lm: LoadedModel, ref: Reference, name: str = "", target: str = "") -> EmbeddingChange:
    """How far the model as it is now embeds the sentences from the unmodified model (see the module docstring)."""
    mean, cls = embed(lm, ref.batch)
    mean_cosine = float(F.cosine_similarity(mean, ref.mean, dim=-1).mean())
    return EmbeddingChange(name=name, target=target, mean_cosine=mean_cosine,
                           cls_cosine=float(F.cosine_similarity(cls, ref.cls, dim=-1).mean()),
                           spearman=spearman(_pairs(mean), _pairs(ref.mean)), perplexity=2.0 - mean_cosine)


class EmbeddingEvaluation:
    """The headless encoder's stand-in for ``evaluation.Evaluation``, with its interface: ``score()`` is 1 + (1 -
    the mean-pooled cosine of the model as it is now to the reference), measured once per ``key``; ``baseline`` is 1
    (the unmodified model), ``positions`` the sentences' tokens. Every pass runs the whole encoder (``start`` is taken
    and ignored: the sentences are one small batch)."""

    def __init__(self, lm: LoadedModel, eval_text: str, text: EvalText | None = None):
        self.lm = lm
        self.text = text  # the evaluation text and its source, where the causal stage made this scoring
        self.reference = reference(lm, eval_text)
        self.baseline = 1.0
        self.positions = self.reference.tokens
        self.cache: dict[str, float] = {}

    def score(self, start: int = 0, key: str | None = None) -> float:
        if key is not None and key in self.cache:
            return self.cache[key]
        value = change(self.lm, self.reference).perplexity
        if key is not None:
            self.cache[key] = value
        return value


def changes(lm: LoadedModel, ref: Reference, interventions: list[tuple[str, str, Callable[[], AbstractContextManager]]]
            ) -> list[EmbeddingChange]:
    """``change`` under each (name, target, context factory): the super weights zeroed and the zero/mean replacements,
    as the output effects of a model with a head are measured."""
    found = []
    for name, target, context in interventions:
        with context():
            found.append(change(lm, ref, name, target))
    return found


def claim(effect: EmbeddingChange) -> str:
    return (f"{effect.name}: embeddings' cosine to the unmodified model's {effect.mean_cosine:.4f} (mean-pooled), "
            f"{effect.cls_cosine:.4f} ([CLS]); Spearman of the sentences' pairwise similarities {effect.spearman:.4f}")
