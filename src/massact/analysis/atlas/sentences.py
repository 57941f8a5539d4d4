"""Pure functions: the sentences the atlas's rows support, each with the rows it rests on. A rule writes nothing
where its rows cannot carry it (one model, nothing measured, no model on one side of a comparison).

The rules (``RULES``), each answering one of the questions across models:

- ``feature``: per architecture feature (gated attention, learned sinks, reordered norms, hyper-connections, ...), the
  models with it against the others: how many have no massive value, and their mean sink rate where both sides
  measured it;
- ``birth``: where in depth the massive value is born, across the models that have one;
- ``apart``: massive values and sinks coming apart: a sink without a massive value, or a massive value without a sink;
- ``survival``: whether the sink survives the massive values set to zero;
- ``valley``: whether the compression valley (the block of lowest entropy) lies near the massive value's birth, and
  how deep it is with and without the massive tokens.
- ``qk_band``: whether the massive Q/K dims of the rotary models lie in the low-frequency band (Jin et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ...models.architecture import Architecture
from ..function.results import QK_THRESHOLD
from .results import Row, Sentence

# An architecture feature, as the sentences name it, and whether a model has it (in at least one block).
FEATURES: tuple[tuple[str, Callable[[Architecture], bool]], ...] = (
    ("gated attention", lambda a: "gated" in a.mixers),
    ("learned sinks", lambda a: "learned sink" in a.mixers),
    ("sparse attention", lambda a: "sparse" in a.mixers),
    ("linear attention", lambda a: "linear" in a.mixers),
    ("state-space mixers", lambda a: "state space" in a.mixers),
    ("convolution mixers", lambda a: "convolution" in a.mixers),
    ("reordered norms", lambda a: "reordered" in a.norms),
    ("sandwich norms", lambda a: "sandwich" in a.norms),
    ("post-norm blocks", lambda a: "post" in a.norms),
    ("NoPE blocks", lambda a: "NoPE" in a.positions),
    ("hyper-connections", lambda a: a.streams > 1),
    ("mixture of experts", lambda a: a.experts is not None),
)


def _models(rows: Sequence[Row]) -> list[str]:
    return [r.model for r in rows]


def _mean_rate(rows: Sequence[Row]) -> float | None:
    rates = [r.sink_rate for r in rows if r.sink_rate is not None]
    return sum(rates) / len(rates) if rates else None


def _of(count: int, total: int, noun: str = "model") -> str:
    """'1 of 1 model', '0 of 2 models'."""
    return f"{count} of {total} {noun}{'s' if total != 1 else ''}"


def feature(rows: Sequence[Row]) -> list[Sentence]:
    """Per feature that some models have and others do not: "<feature>: k of n models without a massive value, against
    k' of n' of the others", and where both sides measured the sink, their mean sink rates."""
    found = []
    for name, has in FEATURES:
        with_it = [r for r in rows if has(r.architecture)]
        others = [r for r in rows if not has(r.architecture)]
        if not with_it or not others:
            continue
        none = lambda group: sum(not r.dims for r in group)
        text = f"{name}: {_of(none(with_it), len(with_it))} without a massive value, against {none(others)} of {len(others)} of the others"
        rate, other_rate = _mean_rate(with_it), _mean_rate(others)
        if rate is not None and other_rate is not None:
            text += f"; mean sink rate {rate:.2f} against {other_rate:.2f}"
        found.append(Sentence(rule="feature", text=text + ".", rows=_models(with_it + others)))
    return found


def birth(rows: Sequence[Row]) -> list[Sentence]:
    """Where the lead massive value is born, as a share of the depth, across the models that have one (two at least)."""
    born = [r for r in rows if r.birth is not None]
    if len(born) < 2:
        return []
    depths = [r.birth_depth for r in born]
    where = ", ".join(f"{r.model} block {r.birth} of {r.architecture.blocks}" for r in born)
    return [Sentence(rule="birth", text=f"The massive value is born between {min(depths):.0%} and {max(depths):.0%} of the depth "
                                        f"in the {len(born)} models that have one ({where}).", rows=_models(born))]


def apart(rows: Sequence[Row]) -> list[Sentence]:
    """Where the sink was measured: the models with a sink and no massive value, and those with a massive value and no
    sink (each sentence only where some model is so)."""
    measured = [r for r in rows if r.has_sink is not None]
    found = []
    for text, test in (("a sink without a massive value", lambda r: r.has_sink and not r.dims),
                       ("a massive value without a sink", lambda r: not r.has_sink and bool(r.dims))):
        which = [r for r in measured if test(r)]
        if which:
            found.append(Sentence(rule="apart", text=f"{_of(len(which), len(measured))} whose sink was measured "
                                                     f"{'has' if len(which) == 1 else 'have'} {text} ({', '.join(_models(which))}).",
                                  rows=_models(measured)))
    return found


def survival(rows: Sequence[Row]) -> list[Sentence]:
    """In how many of the models where it was measured the sink survives the massive values set to zero."""
    measured = [r for r in rows if r.sink_survives is not None]
    if not measured:
        return []
    kept = [r for r in measured if r.sink_survives]
    return [Sentence(rule="survival", text=f"The sink survives the massive values set to zero in {_of(len(kept), len(measured))} "
                                           "where that was measured"
                                           + (f" ({', '.join(_models(kept))})." if kept else "."), rows=_models(measured))]


VALLEY_NEAR = 2  # blocks: a valley this close to the birth lies "at" it


def valley(rows: Sequence[Row]) -> list[Sentence]:
    """Across the models with both a compression valley and a massive value (two at least): in how many the valley
    lies within VALLEY_NEAR blocks of the birth, and the mean drop into the valley with the massive tokens and
    without them."""
    both = [r for r in rows if r.valley_from_birth is not None]
    if len(both) < 2:
        return []
    near = [r for r in both if abs(r.valley_from_birth) <= VALLEY_NEAR]
    text = (f"The compression valley lies within {VALLEY_NEAR} blocks of the birth of the massive value in {_of(len(near), len(both))} "
            f"with both" + (f" ({', '.join(_models(near))})" if near else ""))
    drops = [(r.valley_drop, r.valley_drop_without) for r in both if r.valley_drop is not None and r.valley_drop_without is not None]
    if drops:
        text += (f"; the entropy falls by {sum(d for d, _ in drops) / len(drops):.2f} into it on average, and by "
                 f"{sum(d for _, d in drops) / len(drops):.2f} with the massive tokens left out")
    return [Sentence(rule="valley", text=text + ".", rows=_models(both))]




def qk_band(rows: Sequence[Row]) -> list[Sentence]:
    """Among the models whose top Q/K head's top dim is massive and turned by rotary positions, in how many it lies in
    the low-frequency band."""
    rotary = [r for r in rows if r.qk_band is not None and r.qk_ratio is not None and r.qk_ratio >= QK_THRESHOLD]
    if not rotary:
        return []
    low = [r for r in rotary if r.qk_band == "low"]
    return [Sentence(rule="qk_band", text=f"Rotary models: the top massive Q/K dim in the low-frequency band in "
                                          f"{_of(len(low), len(rotary))}" + (f" ({', '.join(_models(low))})." if low else "."),
                     rows=_models(rotary))]


RULES: tuple[Callable[[Sequence[Row]], list[Sentence]], ...] = (feature, birth, apart, survival, valley, qk_band)


def sentences(rows: Sequence[Row]) -> list[Sentence]:
    """Every rule's sentences, in ``RULES`` order."""
    return [sentence for rule in RULES for sentence in rule(rows)]
