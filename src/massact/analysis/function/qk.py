"""Massive values in the queries and keys (Jin et al. 2025, "Massive Values in Self-Attention Modules are the Key to
Contextual Knowledge Understanding"): per softmax head, how much of |q| and |k| a few dims hold, where those dims sit
among the rotary frequencies, the same for the values (which the paper finds without them), and the disruption test:
the massive Q/K dims zeroed, scored on perplexity and a passkey retrieval made from the evaluation text, against as
many other dims zeroed.

The queries and keys are the raw HF values where the model computes them (after q_proj/k_proj and a q/k norm where
the family has one), before the rotary positions turn them (``capture.qk``)."""

from __future__ import annotations

import math
import random
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ...capture.batches import pad_batch
from ...capture.qk import qk_energy, zero_head_dims
from ...models.heads import QkLayout, qk_layout
from ...models.loading import LoadedModel
from ..evaluation.perplexity import EvalText, eval_windows, perplexity
from .results import QK_THRESHOLD, QkBlock, QkDisruption, QkHeads, QkScore, QkValues

QK_TEXTS = 8  # kept texts read
QK_BATCH = 4  # of those per forward pass
TOP = 2  # dims in a head's share: one rotary pair's worth
THRESHOLD = QK_THRESHOLD
LISTED = 4  # massive dims kept per head, largest first
SEED = 0  # the control's draw and the passkeys
TRIALS = 5  # passkey prompts
PASSKEY_TOKENS = 256  # a passkey prompt's length, at most (and at most the model's context)
EVAL_WINDOWS = 4  # evaluation windows scored under each condition
BAND_RULE = ("a turned pair's band is its frequency's rank among the block's rotary frequencies: the fastest third of the "
             "pairs high, the slowest third low, the rest mid")


def concentration(squares: torch.Tensor, top: int = TOP, threshold: float = THRESHOLD
                  ) -> tuple[list[float], list[float], list[list[int]]]:
    """Per head of ``squares`` [heads, head_dim] (each entry's sum of squares over the tokens, M_d^2): the share of
    sum M_d^2 in the ``top`` largest dims, max M_d / mean M_d, and the dims with M_d >= threshold x mean M_d (at most
    LISTED, largest first)."""
    squares = squares.double().cpu()
    norms = squares.sqrt()
    total = squares.sum(-1)
    share = (squares.topk(min(top, squares.shape[-1]), dim=-1).values.sum(-1) / total).tolist()
    mean = norms.mean(-1)
    ratio = (norms.max(-1).values / mean).tolist()
    order = norms.argsort(dim=-1, descending=True)
    dims = [[int(d) for d in order[head] if norms[head, d] >= threshold * mean[head]][:LISTED] for head in range(len(norms))]
    return [v if math.isfinite(v) else math.nan for v in share], [v if math.isfinite(v) else math.nan for v in ratio], dims


def bands(frequencies: torch.Tensor) -> list[str]:
    """Each rotary pair's band (``BAND_RULE``): by its frequency's rank, fastest first."""
    n = len(frequencies)
    rank = {int(pair): r for r, pair in enumerate(frequencies.argsort(descending=True))}
    return ["high" if 3 * rank[pair] < n else "low" if 3 * rank[pair] >= 2 * n else "mid" for pair in range(n)]


def rotary_place(dim: int, frequencies: torch.Tensor | None, head_dim: int) -> tuple[int | None, str]:
    """A head dim's rotary pair (dims d and d + n share inv_freq[d], n the pairs) and band; (None, "") where it is not
    turned (no rotary positions, or past the turned dims of a partial rotary)."""
    if frequencies is None or dim >= 2 * len(frequencies) or head_dim < 2 * len(frequencies):
        return None, ""
    pair = dim % len(frequencies)
    return pair, bands(frequencies)[pair]


def _heads(squares: torch.Tensor, frequencies: torch.Tensor | None, rotated: bool) -> QkHeads:
    share, ratio, dims = concentration(squares)
    places = [[rotary_place(d, frequencies, squares.shape[1]) if rotated else (None, "") for d in listed] for listed in dims]
    return QkHeads(share=share, ratio=ratio, dims=dims, pairs=[[p for p, _ in row] for row in places],
                   bands=[[b for _, b in row] for row in places])


def measure(lm: LoadedModel, inputs: dict[int, torch.Tensor]) -> tuple[QkValues, dict[int, QkLayout]]:
    """The concentration of every softmax block's queries, keys and values over the first QK_TEXTS of ``inputs``
    (window -> [1, n] ids), QK_BATCH texts per pass; and the layouts of the blocks measured."""
    layouts = qk_layouts(lm)
    read = {layer: layout for layer, layout in layouts.items() if layout.queries is not None}
    texts = [inputs[window] for window in qk_texts(inputs)]
    batches = [pad_batch(texts[start:start + QK_BATCH]) for start in range(0, len(texts), QK_BATCH)]
    sums, tokens = qk_energy(lm, batches, read) if read and texts else ({}, 0)
    return qk_from(layouts, sums, len(texts), tokens)


def qk_texts(inputs: dict[int, torch.Tensor]) -> list[int]:
    """The kept windows the section reads: the first QK_TEXTS."""
    return sorted(inputs)[:QK_TEXTS]


def qk_layouts(lm: LoadedModel) -> dict[int, QkLayout]:
    """Every block's ``QkLayout``; those with ``queries`` are read."""
    return {layer: qk_layout(lm.adapter, lm.model, layer) for layer in range(len(lm.adapter.blocks(lm.model)))}


def qk_from(layouts: dict[int, QkLayout], sums: dict[int, dict[str, torch.Tensor]], texts: int, tokens: int
            ) -> tuple[QkValues, dict[int, QkLayout]]:
    """The section from ``QkEnergy``'s sums over ``texts`` texts of ``tokens`` tokens, and the measured blocks' layouts."""
    blocks = []
    for layer, layout in layouts.items():
        if layer not in sums:
            read = layout.queries is not None
            note = layout.note or ("its queries and keys do not cut into the config's heads" if read else "")
            blocks.append(QkBlock(layer=layer, kind=layout.kind if not read else "not read", note=note))
            continue
        found = sums[layer]
        head_dim = found["q"].shape[1]
        frequencies = layout.frequencies
        rotated = frequencies is not None and 2 * len(frequencies) <= head_dim
        blocks.append(QkBlock(
            layer=layer, kind=layout.kind, head_dim=head_dim, rotary_dims=2 * len(frequencies) if rotated else 0,
            queries=_heads(found["q"], frequencies, rotated), keys=_heads(found["k"], frequencies, rotated),
            values=_heads(found["v"], None, False) if "v" in found else None))
    measured = {layer: layouts[layer] for layer in sums}
    return QkValues(texts=texts, tokens=tokens, top=TOP, threshold=THRESHOLD, rule=BAND_RULE, blocks=blocks,
                    summary=summary(blocks)), measured


def summary(blocks: list[QkBlock]) -> str:
    """What the blocks say, in words: how many query and key heads have a massive dim, the bands of those dims, the
    values beside them, and the blocks not measured by kind."""
    measured = [b for b in blocks if b.queries is not None]
    others = {}
    for b in blocks:
        if b.queries is None:
            others.setdefault(b.kind, []).append(b.layer)
    rest = "; ".join(f"{kind}: block{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" for kind, layers in others.items())
    if not measured:
        return f"no block's queries and keys are read ({rest})"
    parts = []
    for name, pick in (("queries", lambda b: b.queries), ("keys", lambda b: b.keys)):
        heads = [(b, h) for b in measured for h in range(len(pick(b).dims))]
        massive = [(b, h) for b, h in heads if pick(b).dims[h]]
        banded = [band for b, h in massive for band in pick(b).bands[h][:1] if band]
        where = ""
        if banded:
            counts = {band: banded.count(band) for band in ("low", "mid", "high") if banded.count(band)}
            where = " (top dim's band: " + ", ".join(f"{band} {count}" for band, count in counts.items()) + ")"
        top = max(heads, key=lambda bh: pick(bh[0]).ratio[bh[1]] if math.isfinite(pick(bh[0]).ratio[bh[1]]) else -1.0)
        parts.append(f"{name}: a massive dim in {len(massive)} of {len(heads)} heads{where}, the largest max/mean "
                     f"{pick(top[0]).ratio[top[1]]:.1f} at block {top[0].layer} head {top[1]}")
    values = [(b, h) for b in measured if b.values is not None for h in range(len(b.values.dims))]
    if values:
        massive = sum(bool(b.values.dims[h]) for b, h in values)
        most = max((b.values.ratio[h] for b, h in values if math.isfinite(b.values.ratio[h])), default=math.nan)
        parts.append(f"values: a massive dim in {massive} of {len(values)} heads (largest max/mean {most:.1f})")
    return "; ".join(parts) + (f"; not measured: {rest}" if rest else "")


def passkey_prompts(lm: LoadedModel, text: str, trials: int = TRIALS, seed: int = SEED) -> list[tuple[torch.Tensor, int]]:
    """``trials`` passkey prompts made from ``text``: a random 5-digit number hidden at a random place in filler (a run
    of the text's words), asked for at the end; each as ([1, n] ids ending with the number's tokens, how many of them
    are the number's). At most PASSKEY_TOKENS tokens (and the model's context)."""
    budget = min(PASSKEY_TOKENS, getattr(lm.config, "max_position_embeddings", None) or PASSKEY_TOKENS)
    words = text.split()
    draw = random.Random(seed)
    prompts = []
    for _ in range(trials):
        number = draw.randrange(10000, 100000)
        answer = lm.tokenizer(f" {number}", add_special_tokens=False).input_ids
        count = min(len(words), budget)
        start = draw.randrange(0, max(1, len(words) - count))
        place = draw.random()
        while True:
            filler = words[start:start + count]
            cut = int(place * len(filler))
            prompt = (" ".join(filler[:cut]) + f" The pass key is {number}. Remember it. "
                      + " ".join(filler[cut:]) + " What is the pass key? The pass key is")
            ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
            if ids.shape[1] + len(answer) <= budget or count == 0:
                break
            count -= max(1, count // 8)
        prompts.append((torch.cat([ids, torch.tensor([answer])], dim=1)[:, -budget:], len(answer)))
    return prompts


def passkey_batch(prompts: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as the one right-padded batch they are scored in: ids and attention mask."""
    return pad_batch([ids for ids, _ in prompts])


@torch.no_grad()
def passkey_score(lm: LoadedModel, prompts: list[tuple[torch.Tensor, int]]) -> tuple[float, float]:
    """Over the prompts (one right-padded pass, ``passkey_batch``): ``passkey_of`` the model's logits."""
    ids, mask = passkey_batch(prompts)
    return passkey_of(lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits, prompts)


def passkey_of(logits: torch.Tensor, prompts: list[tuple[torch.Tensor, int]]) -> tuple[float, float]:
    """From the logits [prompts, positions, vocab] of ``passkey_batch``: the mean log-probability of the number's
    tokens (summed over them, each predicted from the prompt and the number's tokens before it) and the share whose
    greedy continuation is the number (every one of its tokens the argmax there)."""
    logprob, matched = 0.0, 0
    for row, (prompt, n) in enumerate(prompts):
        end = prompt.shape[1]
        predicted = logits[row, end - n - 1:end - 1].float()
        target = prompt[0, -n:].to(predicted.device)
        logprob += float(torch.log_softmax(predicted, -1).gather(1, target.unsqueeze(1)).sum())
        matched += bool((predicted.argmax(-1) == target).all())
    return logprob / len(prompts), matched / len(prompts)


def zero_plan(values: QkValues, seed: int = SEED) -> tuple[dict, dict]:
    """Per block, per "q"/"k", head -> dims: the massive dims found, and as many other dims of the same heads drawn
    at random (``seed``) from the non-massive ones (the control)."""
    draw = random.Random(seed)
    massive: dict[int, dict[str, dict[int, list[int]]]] = {}
    control: dict[int, dict[str, dict[int, list[int]]]] = {}
    for block in values.blocks:
        for name, heads in (("q", block.queries), ("k", block.keys)):
            if heads is None:
                continue
            for head, dims in enumerate(heads.dims):
                if not dims:
                    continue
                others = [d for d in range(block.head_dim) if d not in dims]
                massive.setdefault(block.layer, {}).setdefault(name, {})[head] = list(dims)
                control.setdefault(block.layer, {}).setdefault(name, {})[head] = sorted(draw.sample(others, min(len(dims), len(others))))
    return massive, control


def zeroed_dims(lm: LoadedModel, plan: dict, layouts: dict[int, QkLayout], values: QkValues) -> ExitStack:
    """``plan``'s dims (a ``zero_plan``) zeroed in the queries and keys of its blocks until the stack is closed."""
    stack = ExitStack()
    dims_of = {b.layer: b.head_dim for b in values.blocks}
    for layer, by_name in plan.items():
        for name, dims in by_name.items():
            path = layouts[layer].queries if name == "q" else layouts[layer].keys
            heads = lm.config.num_attention_heads if name == "q" else None
            stack.enter_context(zero_head_dims(lm, layer, path, heads, dims_of[layer], dims))
    return stack


Scored = tuple[float, tuple[float, float]]  # a setting's perplexity and its passkey_of: (log-probability, share retrieved)
SETTINGS = ("unmodified", "massive Q/K dims zeroed", "as many other dims zeroed (control)")  # the test's, in its order


@dataclass(kw_only=True)
class DisruptionTest:
    """What the disruption test runs: the dims zeroed (``zero_plan``: the ``massive`` ones, the ``control``'s, drawn
    with ``seed``), the evaluation ``windows`` perplexity is taken on ([1, n] ids, each its own pass) and the passkey
    ``prompts``. Each of its ``SETTINGS`` is scored as ``Scored``: its perplexity and its ``passkey_of``."""

    massive: dict
    control: dict
    seed: int
    windows: list[torch.Tensor]
    prompts: list[tuple[torch.Tensor, int]]


def disruption_test(lm: LoadedModel, values: QkValues, text: EvalText, seed: int = SEED) -> DisruptionTest | None:
    """The test on ``text`` of the dims ``values`` finds massive (None where none is): the first EVAL_WINDOWS windows
    of the evaluation text and TRIALS passkey prompts made from it."""
    massive, control = zero_plan(values, seed)
    if not massive:
        return None
    return DisruptionTest(massive=massive, control=control, seed=seed, windows=eval_windows(lm, text.text)[:EVAL_WINDOWS],
                          prompts=passkey_prompts(lm, text.text, TRIALS, seed))


def disruption_from(test: DisruptionTest, scored: tuple[Scored, Scored, Scored]) -> QkDisruption:
    """The section's test from its three settings' scores, in ``SETTINGS``' order."""
    base, zeroed, other = (QkScore(label=label, perplexity=ppl, passkey_logprob=logprob, passkey_match=match)
                           for label, (ppl, (logprob, match)) in zip(SETTINGS, scored, strict=True))
    massive, prompts = test.massive, test.prompts
    count = sum(len(dims) for by_name in massive.values() for heads in by_name.values() for dims in heads.values())
    words = (f"zeroing the {count} massive Q/K dims of blocks {', '.join(map(str, sorted(massive)))} takes perplexity from "
             f"{base.perplexity:.3g} to {zeroed.perplexity:.3g} (control: {other.perplexity:.3g}) and the passkey's log-probability "
             f"from {base.passkey_logprob:.2f} to {zeroed.passkey_logprob:.2f} (control: {other.passkey_logprob:.2f}); passkey "
             f"retrieved in {base.passkey_match:.0%}, {zeroed.passkey_match:.0%} and {other.passkey_match:.0%} of {len(prompts)} trials")
    return QkDisruption(blocks=sorted(massive), zeroed=count, seed=test.seed, trials=len(prompts),
                        passkey_tokens=max(ids.shape[1] for ids, _ in prompts), tokens=sum(w.shape[1] for w in test.windows),
                        base=base, massive=zeroed, control=other, summary=words)


def disruption(lm: LoadedModel, values: QkValues, layouts: dict[int, QkLayout], text: EvalText, seed: int = SEED
               ) -> QkDisruption | None:
    """The disruption test (None where no Q/K dim is massive): perplexity on the first EVAL_WINDOWS windows of the
    evaluation text and the passkey score, the model as it is, with the massive dims zeroed, and with the control's."""
    test = disruption_test(lm, values, text, seed)
    if test is None:
        return None

    def score(plan: dict) -> Scored:
        with zeroed_dims(lm, plan, layouts, values):
            return perplexity(lm, test.windows), passkey_score(lm, test.prompts)

    return disruption_from(test, (score({}), score(test.massive), score(test.control)))


def qk_values(lm: LoadedModel, inputs: dict[int, torch.Tensor], text: EvalText | None = None) -> QkValues:
    """The Q/K section: the concentration on the kept texts ``inputs``; with ``text`` (a verified scan of a causal
    LM), the disruption test on it."""
    values, layouts = measure(lm, inputs)
    if text is not None:
        values.disruption = disruption(lm, values, layouts, text)
    return values
