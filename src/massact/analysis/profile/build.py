"""The profile's corpus pass and its rules: one batched pass over the windows with a hook on every block's output,
counting in place (memory does not grow with the corpus), then the carrier rules and the outlier severity per block.

Each block's threshold comes from the scan's median |a| there (``massact.scan``'s corpus pass, or a saved report's),
so a token is massive here exactly when the scan's criterion says so."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ...capture.batches import pad_batch
from ...capture.hooks import tap
from ...models.identity import weights_sha256
from ...models.loading import LoadedModel
from ...settings import Criterion
from .results import BlockProfile, Profile, Rule

MIN_PRECISION = 0.5  # a rule is kept when at least half of what it flags is massive ...
MIN_OCCURRENCES = 2  # ... and a token rule when its token occurs at least twice (once proves nothing)
EXPLAINED = 0.9  # the rules name the carriers when they find at least this share of them


class Counts:
    """Per block, on the model's device: massive tokens at the first position and by token id after it, the dims seen
    massive, and float64 sums of the hidden state and its square over all real tokens and over the non-massive ones.
    ``thresholds`` [n_layers, N]: one per stream of the block's output (N = 1 but with hyper-connections, where a
    token is massive when some dim of some stream reaches that stream's threshold, and the sums are of the streams
    side by side, the state as one vector of N x width)."""

    def __init__(self, n_layers: int, width: int, vocab: int, thresholds: torch.Tensor, device: torch.device):
        self.thresholds = thresholds.to(device)
        width_all = width * thresholds.shape[1]
        self.windows = 0
        self.first = torch.zeros(n_layers, dtype=torch.long, device=device)  # massive at the first position
        self.massive = torch.zeros(n_layers, dtype=torch.long, device=device)
        self.by_id = torch.zeros(n_layers, vocab, dtype=torch.long, device=device)  # massive, after the first position
        self.occurrences = torch.zeros(vocab, dtype=torch.long, device=device)  # every id after the first position
        self.dims = torch.zeros(n_layers, width, dtype=torch.bool, device=device)
        self.sums = torch.zeros(n_layers, 2, width_all, dtype=torch.float64, device=device)  # [all, without massive]
        self.squares = torch.zeros_like(self.sums)
        self.counts = torch.zeros(n_layers, 2, dtype=torch.float64, device=device)
        self.ids = self.real = None

    def start(self, ids: torch.Tensor, real: torch.Tensor) -> None:
        """A right-padded batch begins: its ids and real-token mask [batch, positions]."""
        self.ids, self.real = ids, real
        self.windows += ids.shape[0]
        later = real[:, 1:]
        self.occurrences.index_add_(0, ids[:, 1:][later], torch.ones_like(ids[:, 1:][later]))

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        """Block ``layer``'s output on the batch: [batch, positions, width], or [batch, positions, N, width]."""
        if hidden.dim() == 3:
            hidden = hidden.unsqueeze(-2)
        over = (hidden.abs() >= self.thresholds[layer][:, None]).any(-2) & self.real.unsqueeze(-1)
        hidden = hidden.flatten(-2)
        massive = over.any(-1)
        self.dims[layer] |= over.flatten(0, 1).any(0)
        self.massive[layer] += massive.sum()
        self.first[layer] += massive[:, 0].sum()
        later = massive[:, 1:]
        self.by_id[layer].index_add_(0, self.ids[:, 1:][later], torch.ones_like(self.ids[:, 1:][later]))
        for slot, keep in enumerate((self.real, self.real & ~massive)):
            values = hidden[keep].double()
            self.sums[layer, slot] += values.sum(0)
            self.squares[layer, slot] += (values * values).sum(0)
            self.counts[layer, slot] += values.shape[0]


def gamma(sums: torch.Tensor, squares: torch.Tensor, count: float) -> float:
    """||mean|| / ||std|| from a hidden state's sum and sum of squares over ``count`` tokens (std per dim,
    population); NaN without tokens."""
    if count == 0:
        return float("nan")
    mean = sums / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    return float(mean.norm() / std.norm())


def count_carriers(lm: LoadedModel, windows: Iterable[torch.Tensor], medians: list[list[float]], criterion: Criterion,
          batch_size: int = 8, on_window: Callable[[], None] = lambda: None) -> Counts:
    """The batched pass over ``windows`` (token ids [1, n] each, read lazily), every block's tokens counted against
    max(min_abs, min_ratio x that block's median): ``medians[layer]``, one per stream of its output (with
    hyper-connections each stream's own, as the scan judges it)."""
    n_layers = len(lm.adapter.blocks(lm.model))
    vocab = max(len(lm.tokenizer), lm.config.vocab_size)
    thresholds = torch.tensor([[criterion.threshold(m) for m in streams] for streams in medians])
    counts = Counts(n_layers, lm.config.hidden_size, vocab, thresholds, lm.device)
    sites = [(layer, lm.adapter.stream) for layer in range(n_layers)]
    pending: list[torch.Tensor] = []

    def forward() -> None:
        ids, real = pad_batch(pending)
        ids, real = ids.to(lm.device), real.to(lm.device).bool()
        counts.start(ids, real)
        lm.model(input_ids=ids, attention_mask=real.long(), use_cache=False)
        for _ in pending:
            on_window()
        pending.clear()

    with torch.no_grad(), tap(lm.model, lm.adapter, sites, lambda layer, _, hidden: counts.add(layer, hidden)):
        for ids in windows:
            pending.append(ids)
            if len(pending) == batch_size:
                forward()
        if pending:
            forward()
    return counts


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def block_rules(counts: Counts, layer: int, decode: Callable[[int], str]) -> tuple[list[Rule], str, float, float]:
    """Block ``layer``'s kept rules, what they say of the carriers, and their precision and recall together."""
    massive = int(counts.massive[layer])
    if massive == 0:
        return [], "none", float("nan"), float("nan")
    first = int(counts.first[layer])
    rules = []
    if _rate(first, counts.windows) >= MIN_PRECISION:
        rules.append(Rule(kind="position", position=0, carriers=first, predicted=counts.windows,
                          precision=_rate(first, counts.windows), recall=_rate(first, massive)))
    by_id, occurrences = counts.by_id[layer].cpu(), counts.occurrences.cpu()
    for token_id in by_id.nonzero().flatten().tolist():
        hits, seen = int(by_id[token_id]), int(occurrences[token_id])
        if seen >= MIN_OCCURRENCES and hits / seen >= MIN_PRECISION:
            rules.append(Rule(kind="token", token_id=token_id, token=decode(token_id), carriers=hits, predicted=seen,
                              precision=hits / seen, recall=hits / massive))
    rules.sort(key=lambda rule: (rule.kind != "position", -rule.carriers))
    found = sum(rule.carriers for rule in rules)
    predicted = sum(rule.predicted for rule in rules)
    recall = found / massive
    kinds = {rule.kind for rule in rules}
    if recall < EXPLAINED:
        carriers = "content-dependent"
    else:
        carriers = " + ".join(name for kind, name in (("position", "position 0"), ("token", "token ids")) if kind in kinds)
    return rules, carriers, _rate(found, predicted), recall


def build_profile(lm: LoadedModel, counts: Counts, medians: list[float], criterion: Criterion, corpus: str) -> Profile:
    """The profile of ``lm`` from the pass's counts (each block's ``medians`` over its whole output and the
    ``criterion`` the thresholds came from), on the ``corpus`` described in words."""
    blocks = []
    decode = lambda token_id: lm.tokenizer.decode([token_id])
    for layer, median in enumerate(medians):
        rules, carriers, precision, recall = block_rules(counts, layer, decode)
        streams = counts.thresholds[layer].tolist()
        blocks.append(BlockProfile(
            layer=layer, median=median, threshold=criterion.threshold(median), stream_thresholds=streams if len(streams) > 1 else [],
            dims=counts.dims[layer].nonzero().flatten().tolist(), massive_tokens=int(counts.massive[layer]),
            tokens=int(counts.counts[layer, 0]), carriers=carriers, rules=rules, precision=precision, recall=recall,
            gamma=gamma(counts.sums[layer, 0], counts.squares[layer, 0], float(counts.counts[layer, 0])),
            gamma_without=gamma(counts.sums[layer, 1], counts.squares[layer, 1], float(counts.counts[layer, 1]))))
    return Profile(model=lm.name, source=lm.source, weights_sha256=weights_sha256(lm.model), corpus=corpus, windows=counts.windows,
                   tokens=int(counts.counts[0, 0]) if blocks else 0, min_abs=criterion.min_abs, min_ratio=criterion.min_ratio,
                   pad_token_id=lm.tokenizer.pad_token_id, bos_token_id=lm.tokenizer.bos_token_id, blocks=blocks)
