"""The one schema of every file massact writes and reads back (report.json, protect.json, profile.json,
quantization.json, track.json, atlas.json and an atlas model's architecture.json, and an engine's configuration from
``massact protect export``): the dataclasses' own type hints, plus the constraints types cannot say, declared once in
``CHECKS`` from the writers' own constants.

``read(kind, data, where)`` checks parsed JSON against the dataclass ``kind`` and builds it in one pass; the first
problem is one ``UsageError`` line that names the field (``report.json: field origin[0].role must be ...``).
``write(obj)`` is the JSON the readers take back (inf and nan become null, which reads back as nan).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..analysis.atlas.results import Atlas, AtlasDim, Row, Sentence
from ..analysis.atlas.sentences import RULES
from ..analysis.causal.results import Causal
from ..analysis.deploy.results import FORMAT as PROTECT_FORMAT
from ..analysis.deploy.results import VERSION as PROTECT_VERSION
from ..analysis.deploy.results import Carrier, Protect, ProtectedDim, ProtectedWeight, Quantization, SinkPosition
from ..analysis.detect.results import DimSummary, Entry, Findings, LayerStats, Massive
from ..analysis.function.results import AttentionSinks, CompressionValley, QkBlock
from ..analysis.mechanism.results import (
    BRANCHES,
    PHASES,
    ROLES,
    WRITERS,
    Attribution,
    Checkpoint,
    ExpertAttribution,
    Lifeline,
    LifelineStep,
    Mechanism,
    MoeAttribution,
    Origin,
    Phase,
    Place,
    StreamOrigin,
    TokenValues,
)
from ..analysis.profile.results import BlockProfile, Profile, Rule
from ..analysis.results import Report
from ..analysis.track.results import MonitorBlock, MonitorRecord, Track
from ..analysis.trigger.results import VERDICTS, Carriers, ChainLink, NeuronTrigger, PreActivationSplit
from ..errors import UsageError
from ..models.architecture import MIXERS, NORMS, POSITIONS, Architecture
from ..models.heads import KINDS as QK_KINDS
from ..models.info import ModelInfo
from ..settings import DTYPES, MAX_COUNT, Criterion, ScanSettings
from ..sites import STREAMS
from ..texts import Corpus

PROFILE_FORMAT, PROFILE_VERSION = "massact-profile", 1
TRACK_FORMAT, TRACK_VERSION = "massact-track", 1
ATLAS_FORMAT, ATLAS_VERSION = "massact-atlas", 1
ARCHITECTURE_FORMAT, ARCHITECTURE_VERSION = "massact-architecture", 1
QUANTIZATION_FORMAT, QUANTIZATION_VERSION = "massact-quantization", 1
REPORT_FORMAT = "massact-report"
REPORT_VERSION = 2  # nested by stage; version 1 (flat, or without the version field) is read and converted


@dataclass
class Scope:
    """What a field's range depends on, filled as the reader goes (``model`` comes first in a report)."""

    n_layers: int | None = None
    d_model: int | None = None
    windows: set[int] | None = None


@dataclass(frozen=True)
class Check:
    """A constraint beyond the type: ``test(value, scope)``, and what the value must be, in words."""

    test: Callable[[typing.Any, Scope], bool]
    what: Callable[[Scope], str]


def _positive() -> Check:
    return Check(lambda v, s: math.isfinite(v) and v > 0, lambda s: "a positive number")


def _at_least(least: int) -> Check:
    return Check(lambda v, s: v >= least, lambda s: f"an integer >= {least}")


def _share() -> Check:
    """A fraction, or NaN (null in the file) where there was nothing to count."""
    return Check(lambda v, s: math.isnan(v) or 0 <= v <= 1, lambda s: "a number from 0 to 1, or null")


def _correlation() -> Check:
    return Check(lambda v, s: -1 - 1e-9 <= v <= 1 + 1e-9, lambda s: "a correlation from -1 to 1")


def _one_of(options) -> Check:
    return Check(lambda v, s: v in options, lambda s: "one of " + ", ".join(repr(o) for o in options))


def _below(bound: str, least: int = 0) -> Check:
    """An index into the model's ``bound`` (n_layers or d_model): least <= value < bound once the bound is known."""
    def test(value, scope: Scope) -> bool:
        top = getattr(scope, bound)
        return value >= least and (top is None or value < top)

    return Check(test, lambda s: f"an integer in [{least}, {getattr(s, bound)})" if getattr(s, bound) else f"an integer >= {least}")


def _index() -> Check:
    """A token id or a position in a sequence: an integer torch can compare with (at most MAX_COUNT)."""
    return Check(lambda v, s: 0 <= v <= MAX_COUNT, lambda s: f"an integer from 0 to {MAX_COUNT}")


def _window() -> Check:
    """A window index the report keeps the text of (report.findings.texts)."""
    return Check(lambda v, s: s.windows is None or v in s.windows, lambda s: "a window listed in texts")


_LAYER, _DIM, _BLOCK_AFTER = _below("n_layers"), _below("d_model"), _below("n_layers", least=1)

# (dataclass, field) -> constraint; a list field's constraint applies to each item. Subclasses inherit their base's.
CHECKS: dict[tuple[type, str], Check] = {
    (ModelInfo, "n_layers"): _at_least(1),
    (ModelInfo, "d_model"): _at_least(1),
    (ModelInfo, "dtype"): _one_of(tuple(DTYPES)),
    (ModelInfo, "stream"): _one_of(STREAMS),
    (Corpus, "max_texts"): _at_least(1),
    (Criterion, "min_abs"): _positive(),
    (Criterion, "min_ratio"): _positive(),
    (LayerStats, "layer"): _LAYER,
    (Entry, "dim"): _DIM,
    (Massive, "layer"): _LAYER,
    (Massive, "dim"): _DIM,
    (Massive, "text"): _window(),
    (DimSummary, "dim"): _DIM,
    (DimSummary, "born_at"): _LAYER,
    (DimSummary, "persists"): _LAYER,
    (DimSummary, "removed_at"): _BLOCK_AFTER,
    (Place, "layer"): _LAYER,
    (Place, "dim"): _DIM,
    (Place, "role"): _one_of(ROLES),
    (Lifeline, "dim"): _DIM,
    (Lifeline, "text"): _window(),
    (Lifeline, "born_at"): _LAYER,
    (Lifeline, "peak_layer"): _LAYER,
    (Lifeline, "removed_at"): _BLOCK_AFTER,
    (LifelineStep, "layer"): _LAYER,
    (LifelineStep, "phase"): _one_of(("",) + PHASES),
    (LifelineStep, "writer"): _one_of(WRITERS),
    (Origin, "writer"): _one_of(BRANCHES),
    (Phase, "name"): _one_of(PHASES),
    (Carriers, "verdict"): _one_of(VERDICTS),
    (Phase, "writer"): _one_of(("",) + WRITERS),
    (PreActivationSplit, "site"): _one_of(("mlp_gate", "mlp_up")),  # the MLP's input projections, as decompose splits them
    (MonitorRecord, "step"): _at_least(0),
    (MonitorRecord, "texts"): _at_least(1),
    (MonitorBlock, "layer"): _at_least(0),
    (MonitorBlock, "massive"): _at_least(0),
    (Profile, "windows"): _at_least(0),
    (Profile, "tokens"): _at_least(0),
    (Profile, "min_abs"): _positive(),
    (Profile, "min_ratio"): _positive(),
    (Profile, "pad_token_id"): _index(),
    (Profile, "bos_token_id"): _index(),
    (BlockProfile, "layer"): _at_least(0),
    (BlockProfile, "dims"): _at_least(0),
    (BlockProfile, "massive_tokens"): _at_least(0),
    (BlockProfile, "tokens"): _at_least(0),
    (BlockProfile, "carriers"): _one_of(("none", "position 0", "token ids", "position 0 + token ids", "content-dependent")),
    (AttentionSinks, "indexer_selected"): _share(),  # per block; null where a block has no indexer of its own
    (BlockProfile, "precision"): _share(),
    (BlockProfile, "recall"): _share(),
    (Rule, "kind"): _one_of(("position", "token")),
    (Rule, "position"): _index(),
    (Rule, "token_id"): _index(),
    (Rule, "carriers"): _at_least(0),
    (Rule, "predicted"): _at_least(0),
    (Rule, "precision"): _share(),
    (Rule, "recall"): _share(),
    (Protect, "format"): _one_of((PROTECT_FORMAT,)),
    (Protect, "version"): _one_of((PROTECT_VERSION,)),
    (Protect, "min_abs"): _positive(),
    (Protect, "min_ratio"): _positive(),
    (ProtectedDim, "dim"): _at_least(0),
    (ProtectedDim, "born_at"): _at_least(0),
    (ProtectedDim, "peak_block"): _at_least(0),
    (ProtectedDim, "blocks"): _at_least(0),
    (ProtectedDim, "removed_at"): _at_least(1),
    (ProtectedDim, "probe_position"): _at_least(0),
    (Carrier, "position"): _at_least(0),
    (Carrier, "block"): _at_least(0),
    (SinkPosition, "position"): _at_least(0),
    (ProtectedWeight, "row"): _at_least(0),
    (ProtectedWeight, "col"): _at_least(0),
    (ProtectedWeight, "index"): _at_least(0),
    (Architecture, "blocks"): _at_least(1),
    (Architecture, "d_model"): _at_least(1),
    (Architecture, "parameters"): _at_least(0),
    (Architecture, "parallel"): _share(),
    (Architecture, "rotary"): _share(),
    (Architecture, "experts"): _at_least(1),
    (Architecture, "top_k"): _at_least(1),
    (Architecture, "shared"): _at_least(0),
    (Architecture, "expert_blocks"): _share(),
    (Architecture, "streams"): _at_least(1),
    (AtlasDim, "dim"): _at_least(0),
    (AtlasDim, "born_at"): _at_least(0),
    (Row, "top_block"): _at_least(0),
    (Row, "birth"): _at_least(0),
    (Row, "birth_depth"): _share(),
    (Row, "writer"): _one_of(BRANCHES),
    (Row, "sink_rate"): _share(),
    (Row, "sink_share"): _share(),
    (Row, "learned_sink"): _share(),
    (Row, "sink_kept"): _at_least(0),
    (Row, "sink_reached"): _at_least(1),
    (Row, "qk_band"): _one_of(("high", "mid", "low")),
    (Row, "qk_heads"): _share(),
    (Sentence, "rule"): _one_of(tuple(rule.__name__ for rule in RULES)),
    (Row, "valley"): _at_least(0),
    (Row, "valley_depth"): _share(),
    (CompressionValley, "texts"): _window(),
    (CompressionValley, "first_share"): _share(),
    (CompressionValley, "first_share_without"): _share(),
    (CompressionValley, "massive_tokens"): _at_least(0),
    (CompressionValley, "massive_share"): _share(),
    (CompressionValley, "valley"): _LAYER,
    (CompressionValley, "valley_depth"): _share(),
    (CompressionValley, "valley_without"): _LAYER,
    (CompressionValley, "valley_without_depth"): _share(),
    (CompressionValley, "birth"): _LAYER,
    (CompressionValley, "first_share_correlation"): _correlation(),
    (CompressionValley, "sink_rate_correlation"): _correlation(),
    (QkBlock, "layer"): _LAYER,
    (QkBlock, "kind"): _one_of(QK_KINDS),
}

def _shares_of(shares: dict[str, float], kinds: tuple[str, ...]) -> bool:
    """Shares of some of ``kinds``, each in (0, 1], that sum to 1."""
    return set(shares) <= set(kinds) and all(0 < v <= 1 for v in shares.values()) and abs(sum(shares.values()) - 1) < 1e-6


# Constraints between fields of one object: (field named in the message, test, what it must be).
AGREES: dict[type, list[tuple[str, Callable[[typing.Any], bool], str]]] = {
    Report: [
        ("findings.layers", lambda r: len(r.findings.layers) == r.model.n_layers, "one entry per block (model.n_layers)"),
        ("mechanism.lifelines", lambda r: sorted(line.dim for line in r.mechanism.lifelines) == sorted(d.dim for d in r.findings.dims),
         "one lifeline per entry of findings.dims"),
    ],
    Findings: [
        ("massive", lambda f: all(m.text in f.tokens and m.position < len(f.tokens[m.text]) for m in f.massive),
         "positions within the tokens of their window"),
    ],
    Lifeline: [("steps", lambda line: [s.layer for s in line.steps] == list(range(len(line.steps))), "one step per block, in order")],
    # Profile.mask finds block L at blocks[L], and a rule flags by its position or its token id, never by neither.
    Profile: [("blocks", lambda p: [b.layer for b in p.blocks] == list(range(len(p.blocks))),
               "one block per layer, in order: layers 0, 1, 2, ...")],
    BlockProfile: [("massive_tokens", lambda b: b.massive_tokens <= b.tokens, "a count of at most tokens (the block's real tokens)")],
    Rule: [("position", lambda r: (r.position is not None) == (r.kind == "position"), 'an integer exactly when kind is "position"'),
           ("token_id", lambda r: (r.token_id is not None) == (r.kind == "token"), 'an integer exactly when kind is "token"'),
           ("carriers", lambda r: r.carriers <= r.predicted, "a count of at most predicted (the tokens the rule flags)")],
    # The first checkpoint has no previous one and no change; null stands for nan too (a float16 overflow), so a later
    # checkpoint may have a null change, but then its percentage is null with it.
    # An architecture's shares are of its own kinds and sum to 1; a row's curve has a point per block; a sentence
    # rests on rows of the atlas, each model once.
    Architecture: [("norms", lambda a: _shares_of(a.norms, NORMS), "shares of " + ", ".join(NORMS) + " that sum to 1"),
                   ("mixers", lambda a: _shares_of(a.mixers, MIXERS), "shares of " + ", ".join(MIXERS) + " that sum to 1"),
                   ("positions", lambda a: not a.positions or _shares_of(a.positions, POSITIONS),
                    "shares of " + ", ".join(POSITIONS) + " that sum to 1, or nothing")],
    Row: [("ratios", lambda r: len(r.ratios) == r.architecture.blocks, "one ratio per block (architecture.blocks)"),
          ("sink_rates", lambda r: r.sink_rates is None or len(r.sink_rates) == r.architecture.blocks, "one rate per block, or null"),
          ("entropies", lambda r: r.entropies is None or len(r.entropies) == r.architecture.blocks, "one entropy per block, or null"),
          ("qk_ratios", lambda r: r.qk_ratios is None or len(r.qk_ratios) == r.architecture.blocks, "one ratio per block, or null"),
          ("sink_kept", lambda r: (r.sink_kept is None) == (r.sink_reached is None) and (r.sink_kept or 0) <= (r.sink_reached or 0),
           "a count of at most sink_reached, null exactly where sink_reached is")],
    Atlas: [("rows", lambda a: len({r.model for r in a.rows}) == len(a.rows), "each model once"),
            ("sentences", lambda a: all(set(s.rows) <= {r.model for r in a.rows} for s in a.sentences), "rows of models in the atlas")],
    CompressionValley: [(name, lambda v, name=name: len(getattr(v, name)) == len(v.entropy), "one value per block, as entropy")
                        for name in ("entropy_without", "first_share", "first_share_without", "massive_tokens", "massive_share")],
    Checkpoint: [("change", lambda c: c.previous is not None or c.change is None, "null at the first checkpoint (no previous)"),
                 ("change_pct", lambda c: (c.change is None) == (c.change_pct is None), "null exactly where change is")],
}

# Fields only some models have (a Gemma-4 per-layer input's branch and layer scalar, the two parts of experts beside a
# dense MLP and their norms, a sparse attention's indexer picks, the checks an inferred adapter passed,
# hyper-connections' streams and their profile thresholds, a trigger's shared-expert neuron), and the compression
# valley, which a report (and an atlas row) made before that section lacks: the writer leaves one
# out where it holds its default (None, or empty), and the reader gives the default where it is absent, so that the
# other models' files do not carry them.
OPTIONAL: frozenset[tuple[type, str]] = frozenset({
    (Origin, "ple"), (Origin, "ple_raw"), (Origin, "scale"), (LifelineStep, "ple"), (LifelineStep, "scale"),
    (AttentionSinks, "indexer_selected"), (ModelInfo, "inferred"),
    (Entry, "stream"), (Massive, "stream"), (LayerStats, "streams"), (DimSummary, "streams"), (Lifeline, "stream"),
    (LifelineStep, "mix"), (Mechanism, "streams"), (Attribution, "stream"), (Attribution, "write"), (ExpertAttribution, "stream"),
    (ExpertAttribution, "write"), (ExpertAttribution, "landed"), (MoeAttribution, "gated"),
    (MoeAttribution, "bias"), (Origin, "mlp_dense"), (Origin, "mlp_routed"), (Attribution, "norm"),
    (ExpertAttribution, "norm"), (NeuronTrigger, "shared"), (ChainLink, "shared"), (BlockProfile, "stream_thresholds"),
    (StreamOrigin, "heads"), (TokenValues, "streams"), (Report, "valley"),
    *((Row, name) for name in ("valley", "valley_depth", "valley_from_birth", "valley_drop", "valley_drop_without", "entropies")),
    (Row, "qk_ratio"), (Row, "qk_band"), (Row, "qk_heads"), (Row, "qk_perplexity"), (Row, "qk_control"), (Row, "qk_ratios"),
    (Report, "qk"),  # a report of an older massact has no Q/K section
    (ModelInfo, "streamed"), (Causal, "default"),
})


def _default(spec: dataclasses.Field):
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _check_for(kind: type, name: str) -> Check | None:
    for base in kind.__mro__:
        if (base, name) in CHECKS:
            return CHECKS[base, name]
    return None


class _Bad(Exception):
    """A field that is not what the schema says (caught once, at ``read``): its path, and either what it must be
    (``what``, with the value found) or the whole ``message``."""

    def __init__(self, path: str, what: str = "", data=None, message: str = ""):
        self.path, self.what, self.data = path, what, data
        text = message or f"must be {what}, not {_show(data)}"
        super().__init__(f"field {path} {text}" if path else text)


def _show(value) -> str:
    return json.dumps(value)[:40] if not isinstance(value, str) or len(value) < 40 else json.dumps(value[:37]) + "..."


def _type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if dataclasses.is_dataclass(kind) or kind is dict or origin is dict:
        return "an object"
    if kind is list or origin in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
            Path: "a string"}.get(kind, str(kind))


def _build(kind, data, path: str, scope: Scope, check: Check | None = None):
    """``data`` as ``kind``, or _Bad naming the first field that is not what ``kind`` (and ``check``) allow."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # a union of scalars (a step or a label): the first type the value is
            if not all(a in (int, float, str, bool) for a in inner):
                raise TypeError(f"schema: cannot read the union {kind}")
            for a in inner:
                value = _scalar(a, data)
                if value is not _WRONG and data is not None:  # not null read as a float's nan
                    return value
            what = " or ".join(_type_name(a) for a in inner) + (" or null" if type(None) in args else "")
            raise _Bad(path, what, data)
        try:
            return _build(inner[0], data, path, scope, check)
        except _Bad as bad:
            if bad.what and bad.path == path:  # the field itself is wrong: say that null is allowed too
                raise _Bad(path, bad.what + " or null", data) from None
            raise
    if dataclasses.is_dataclass(kind):
        return _object(kind, data, path, scope)
    if kind is list or origin in (list, tuple):
        if not isinstance(data, list):
            raise _Bad(path, "a list", data)
        item = args[0] if args else typing.Any
        if check is None and item in (float, int, str, bool):  # the long lists of numbers: one pass, no recursion
            built = [_scalar(item, value) for value in data]
            if _WRONG in built:
                i = built.index(_WRONG)
                raise _Bad(f"{path}[{i}]", _type_name(item), data[i])
        else:
            built = [_build(item, value, f"{path}[{i}]", scope, check) for i, value in enumerate(data)]
        return tuple(built) if origin is tuple else built
    if kind is dict or origin is dict:
        if not isinstance(data, dict):
            raise _Bad(path, "an object", data)
        key, value = args if args else (str, typing.Any)
        return {_key(key, k, path): _build(value, v, f"{path}.{k}", scope) for k, v in data.items()}
    if kind is typing.Any:
        return data
    value = _scalar(kind, data)
    if value is _WRONG or (check is not None and not check.test(value, scope)):
        raise _Bad(path, check.what(scope) if check is not None else _type_name(kind), data)
    return value


def _key(kind, key: str, path: str):
    if kind is int:
        try:
            return int(key)
        except ValueError:
            raise _Bad(f"{path}.{key}", message="is not an integer key") from None
    return key


_WRONG = object()


def _scalar(kind, data):
    """``data`` as the scalar type ``kind``, or _WRONG."""
    if kind is float:
        if data is None:
            return math.nan  # the writer turns inf and nan into null
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
    elif kind is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
    elif kind is bool or kind is str:
        if isinstance(data, kind):
            return data
    elif kind is Path:
        if isinstance(data, str):
            return Path(data)
    else:
        raise TypeError(f"schema: no rule for the type {kind}")
    return _WRONG


@functools.cache
def _fields(kind: type) -> tuple[dict[str, typing.Any], dict[str, dataclasses.Field]]:
    """The dataclass's type hints and its fields given to ``__init__``: worked out once per class (a report has
    thousands of objects of a few dozen classes)."""
    return typing.get_type_hints(kind), {f.name: f for f in dataclasses.fields(kind) if f.init}


def _object(kind: type, data, path: str, scope: Scope):
    if not isinstance(data, dict):
        raise _Bad(path, "an object", data)
    hints, fields = _fields(kind)
    extra = [key for key in data if key not in fields]
    if extra:
        raise _Bad(f"{path}.{extra[0]}" if path else extra[0], message=f"is not a field of {kind.__name__}")
    built = {}
    for name in fields:
        where = f"{path}.{name}" if path else name
        if name not in data:
            if (kind, name) in OPTIONAL:
                built[name] = _default(fields[name])
                continue
            raise _Bad("", message=f"no field {where}")
        built[name] = _build(hints[name], data[name], where, scope, _check_for(kind, name))
        if kind is ModelInfo and name in ("n_layers", "d_model"):
            setattr(scope, name, built[name])
        if kind is Findings and name == "texts":
            scope.windows = set(built[name])
    obj = kind(**built)
    if kind is ScanSettings:  # the settings check themselves: the same rules as their writer
        try:
            obj.check()
        except UsageError as error:
            raise _Bad(path, message=f"is not valid: {error}") from None
    for name, test, what in AGREES.get(kind, []):
        if not test(obj):
            raise _Bad(f"{path}.{name}" if path else name, message=f"must hold {what}")
    return obj


def read(kind: type, data, where: str):
    """Parsed JSON ``data`` as the dataclass ``kind``, every field checked; a problem is one UsageError line that
    starts with ``where`` (the file) and names the field: 'track.json: field steps[0].layer must be ...'."""
    try:
        return _build(kind, data, "", Scope())
    except _Bad as bad:
        raise UsageError(f"{where}: {bad}") from None


def _read_as(kind: type, data, where: str, what: str):
    """``read``, the message saying what the file is not: '<where>: not <what> (field ... must be ...)'."""
    try:
        return _build(kind, data, "", Scope())
    except _Bad as bad:
        raise UsageError(f"{where}: not {what} ({bad})") from None


def parse(path: Path, what: str):
    """The JSON in ``path``; one UsageError line when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"{path}: not {what} ({error.strerror or error})") from None
    except ValueError as error:  # not UTF-8, or not JSON
        raise UsageError(f"{path}: not {what} (not JSON: {str(error).splitlines()[0]})") from None


def finite(value):
    """JSON has no inf or nan (float16 overflow makes them): write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_data(obj, head: dict | None = None) -> dict:
    """A result dataclass as JSON-ready data: ``head`` (format, version) first, inf and nan as null; a field of
    ``OPTIONAL`` is left out where it holds its default."""
    return finite({**(head or {}), **_as_data(obj)})


def _as_data(value):
    """``dataclasses.asdict``, without the ``OPTIONAL`` fields at their default."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {f.name: _as_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not ((kind, f.name) in OPTIONAL and getattr(value, f.name) == _default(f))}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_data(item) for item in value)
    if isinstance(value, dict):
        return {key: _as_data(item) for key, item in value.items()}
    return value


def _text(data) -> str:
    """JSON-ready data as a file's text: indented, UTF-8 as it is, strict (no inf or nan)."""
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)


def write(obj, head: dict | None = None) -> str:
    return _text(to_data(obj, head))


def write_report(report: Report) -> str:
    """report.json's text: the format and its version, then the report."""
    return write(report, {"format": REPORT_FORMAT, "version": REPORT_VERSION})


def write_protect(protect: Protect) -> str:
    """protect.json's text: its format and version come first, as the dataclass's fields."""
    data = to_data(protect)
    return _text({"format": data.pop("format"), "version": data.pop("version"), **data})


# Version 1's flat fields, by the stage of version 2 that holds them: (v1 name, v2 name).
_V1_STAGES: dict[str, list[tuple[str, str]]] = {
    "findings": [(name, name) for name in ("texts", "tokens", "criterion", "layers", "massive", "dims")],
    "mechanism": [("lifeline", "lifelines"), *((name, name) for name in ("origin", "anatomy", "attribution", "experts", "super_experts",
                                                                          "birth_state", "token_values"))],
    "causal": [(name, name) for name in ("verification", "attention", "super_weights")],
    "deploy": [(name, name) for name in ("precision", "quantization")],
}
# Version 1 fields that had a default in the flat Report: a version 1 file may lack them.
_V1_DEFAULTS = {"verification": None, "attention": None, "birth_state": None, "token_values": None, "experts": [], "lifeline": [],
                "trigger": [], "super_weights": [], "precision": None, "quantization": None, "super_experts": None}


def from_version_1(data: dict) -> dict:
    """A version 1 report.json (flat: every stage's results side by side) as version 2 data (nested by stage), values
    as they are: the super experts' pruning, which the causal stage measures, moves to ``causal.expert_pruning``. A
    field version 1 did not have stays where it is, so that the reader names it."""
    flat = {**{k: v for k, v in _V1_DEFAULTS.items() if k not in data}, **data}
    nested: dict = {name: flat.pop(name) for name in ("model", "corpus", "settings") if name in flat}
    # Version 1's corpus spec repeated the settings' max_length; version 2 keeps it in the settings alone.
    corpus = nested.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("spec"), dict):
        nested["corpus"] = {**corpus, "spec": {k: v for k, v in corpus["spec"].items() if k != "max_length"}}
    for stage, names in _V1_STAGES.items():
        nested[stage] = {new: flat.pop(old) for old, new in names if old in flat}
    # Version 1 stored the token-or-position verdict's words; version 2 words it in the report from the verdict.
    nested["trigger"] = flat.pop("trigger")
    if isinstance(nested["trigger"], list):
        nested["trigger"] = [{**t, "carriers": {k: v for k, v in t["carriers"].items() if k != "summary"}}
                             if isinstance(t, dict) and isinstance(t.get("carriers"), dict) else t for t in nested["trigger"]]
    supers = nested["mechanism"].get("super_experts")
    pruning = []
    if isinstance(supers, dict) and "pruning" in supers:
        supers = dict(supers)
        pruning = supers.pop("pruning")
        nested["mechanism"]["super_experts"] = supers
    nested["causal"]["expert_pruning"] = pruning
    return {**nested, **flat}


def read_report(data, where: str = "report.json") -> Report:
    """A parsed report.json as a Report. A version 1 report (flat; one without ``format`` and ``version`` is version
    1 too) is converted to version 2 first (``from_version_1``); a newer version is refused."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: not a massact report (it holds a JSON {type(data).__name__}, not an object)")
    data = dict(data)
    kind, version = data.pop("format", REPORT_FORMAT), data.pop("version", 1)
    if kind != REPORT_FORMAT:
        raise UsageError(f"{where}: not a massact report (format {_show(kind)})")
    if version == 1:
        data = from_version_1(data)
    elif version != REPORT_VERSION:
        raise UsageError(f"{where}: report format version {_show(version)}; this massact reads versions 1 and {REPORT_VERSION}")
    return _read_as(Report, data, where, "a massact report")


def load_report(directory: Path) -> Report:
    """``directory``/report.json, checked and built (see ``read_report``).

    Args:
        directory: The report's folder (what ``massact scan --out`` wrote into).

    Returns:
        The report, every field checked while its dataclasses are built.

    Raises:
        UsageError: report.json is missing or unreadable, is not a massact report, has a format version other than
            1 or 2, or a field is missing, of the wrong type or out of range (one line naming the field).
    """
    path = Path(directory) / "report.json"
    return read_report(parse(path, "a massact report"), str(path))


def write_profile(profile: Profile) -> str:
    """profile.json's text: its format and version, then the profile."""
    return write(profile, {"format": PROFILE_FORMAT, "version": PROFILE_VERSION})


def load_profile(path: Path) -> Profile:
    """A profile.json, checked and built; a wrong format, version or field is one UsageError line. Beyond the types:
    one block per layer in order, at most ``tokens`` massive tokens per block, and each rule with the position or the
    token id its kind needs (ids and positions from 0 to MAX_COUNT).

    Args:
        path: The profile.json file.

    Returns:
        The profile, every field checked.

    Raises:
        UsageError: The file is missing or unreadable, is not a massact profile, has another version, or a field is
            wrong (one line naming the field).
    """
    return _load_headed(path, Profile, PROFILE_FORMAT, PROFILE_VERSION, "a massact profile")


def write_track(track: Track) -> str:
    """track.json's text: its format and version, then the track."""
    return write(track, {"format": TRACK_FORMAT, "version": TRACK_VERSION})


def load_track(path: Path) -> Track:
    """A track.json, checked and built; a wrong format, version or field is one UsageError line."""
    return _load_headed(path, Track, TRACK_FORMAT, TRACK_VERSION, "a massact track")


def write_atlas(atlas: Atlas) -> str:
    """atlas.json's text: its format and version, then the atlas."""
    return write(atlas, {"format": ATLAS_FORMAT, "version": ATLAS_VERSION})


def load_atlas(path: Path) -> Atlas:
    """An atlas.json, checked and built; a wrong format, version or field is one UsageError line."""
    return _load_headed(path, Atlas, ATLAS_FORMAT, ATLAS_VERSION, "a massact atlas")


def write_architecture(architecture: Architecture) -> str:
    """An atlas model's architecture.json (beside its report.json): its format and version, then the architecture."""
    return write(architecture, {"format": ARCHITECTURE_FORMAT, "version": ARCHITECTURE_VERSION})


def load_architecture(path: Path) -> Architecture:
    """An architecture.json, checked and built; a wrong format, version or field is one UsageError line."""
    return _load_headed(path, Architecture, ARCHITECTURE_FORMAT, ARCHITECTURE_VERSION, "a massact architecture")


def write_quantization(quantization: Quantization) -> str:
    """quantization.json's text (``massact quant MODEL --protect``: the sweep without a report): its format and
    version, then the sweep under ``quantization``, as in report.json."""
    return _text({"format": QUANTIZATION_FORMAT, "version": QUANTIZATION_VERSION, "quantization": to_data(quantization)})


def load_quantization(path: Path) -> Quantization:
    """A quantization.json, checked and built; a wrong format, version or field is one UsageError line."""
    data = _headed(path, QUANTIZATION_FORMAT, QUANTIZATION_VERSION, "a massact quantization sweep")
    if set(data) != {"quantization"}:
        raise UsageError(f"{path}: not a massact quantization sweep (it must hold the one field quantization)")
    return _read_as(Quantization, data["quantization"], str(path), "a massact quantization sweep")


def write_export(config: dict) -> str:
    """An engine's configuration (``massact protect export``): the keys the engine's API names, as they are, so
    that the engine's own code reads the file."""
    return _text(config)


def write_monitor_line(record: dict) -> str:
    """One line of a training monitor's JSONL file: a ``MonitorRecord`` as data, strict JSON, no newline inside."""
    return json.dumps(finite(record), allow_nan=False)


def read_monitor_line(line: str, where: str) -> MonitorRecord | None:
    """One line of a monitor's JSONL file, checked and built; None when it is not JSON at all (a line cut short by a
    kill mid-write reads so), one UsageError line naming ``where`` and the field when it is JSON but not a record."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: brackets nested past the parser's depth
        return None
    return read(MonitorRecord, data, where)


def _headed(path: Path, kind: str, version: int, what: str) -> dict:
    """The parsed file at ``path`` without its ``format`` and ``version``, once they are the ones this massact reads
    (``what``: "a massact profile"; its version is then called the "profile version")."""
    data = parse(path, what)
    if not isinstance(data, dict) or data.get("format") != kind:
        raise UsageError(f"{path}: not {what} (format {_show(data.get('format') if isinstance(data, dict) else None)})")
    if data.get("version") != version:
        raise UsageError(f"{path}: {what.removeprefix('a massact ')} version {_show(data.get('version'))}; this massact reads "
                         f"version {version}")
    return {k: v for k, v in data.items() if k not in ("format", "version")}


def _load_headed(path: Path, kind: type, format_: str, version: int, what: str):
    return _read_as(kind, _headed(path, format_, version, what), str(path), what)


def load_protect(path: Path) -> Protect:
    """A protect.json, checked and built; a wrong format, version or field is one UsageError line.

    Args:
        path: The protect.json file.

    Returns:
        The protect list, every field checked.

    Raises:
        UsageError: The file is missing or unreadable, is not a protect list, has another version, or a field is
            wrong (one line naming the field).
    """
    data = parse(path, "a protect list")
    if isinstance(data, dict) and data.get("format") == PROTECT_FORMAT and data.get("version") != PROTECT_VERSION:
        raise UsageError(f"{path}: protect list version {_show(data.get('version'))}; this massact reads version {PROTECT_VERSION}")
    return _read_as(Protect, data, str(path), "a protect list")
