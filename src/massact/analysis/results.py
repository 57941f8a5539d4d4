"""The report as a whole: the model, the corpus and every stage's results, and its JSON form; and what a saved
report gives the stages that run again on it (its protect list, the check that a model is its own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..models.info import ModelInfo
from ..settings import Criterion, ScanSettings
from .causal.results import SuperWeightStep, Verification
from .deploy.results import Precision, Protect, Quantization
from .detect.results import DimSummary, LayerStats, Massive
from .function.results import AttentionSinks
from .mechanism.results import Anatomy, Attribution, BirthState, ExpertAttribution, Lifeline, Origin, SuperExperts, TokenValues
from .trigger.results import Trigger

if TYPE_CHECKING:
    from ..models.loading import LoadedModel


@dataclass(kw_only=True)
class CorpusSpec:
    """How to read the corpus again: the given texts, a file, a dataset, at most ``max_texts`` texts, windows of at
    most ``max_length`` tokens (None: texts longer than the context are refused)."""

    texts: list[str]
    file: str | None
    dataset: str | None
    max_texts: int | None
    max_length: int | None


@dataclass(kw_only=True)
class CorpusInfo:
    """What was scanned: where the texts came from, how many texts, windows (forward passes) and real tokens, and
    the settings that read it again (``massact verify`` re-runs the scan from them)."""

    source: str
    texts: int
    windows: int
    tokens: int
    spec: CorpusSpec



@dataclass(kw_only=True)
class Report:
    model: ModelInfo
    corpus: CorpusInfo
    texts: dict[int, str]  # by window index: only the windows the report points at, and the first few
    tokens: dict[int, list[str]]
    criterion: Criterion
    settings: ScanSettings | None = None  # every option the scan ran with; None in a report made before settings were saved
    layers: list[LayerStats]
    massive: list[Massive]
    dims: list[DimSummary]
    origin: list[Origin]
    anatomy: list[Anatomy]
    attribution: list[Attribution]
    conclusion: list[str]
    warnings: list[str]
    versions: dict[str, str]
    verification: Verification | None = None
    attention: AttentionSinks | None = None
    birth_state: BirthState | None = None
    token_values: TokenValues | None = None  # the HTML page's token view
    experts: list[ExpertAttribution] = field(default_factory=list)
    lifeline: list[Lifeline] = field(default_factory=list)
    trigger: list[Trigger] = field(default_factory=list)
    super_weights: list[SuperWeightStep] = field(default_factory=list)
    precision: Precision | None = None
    quantization: Quantization | None = None
    super_experts: SuperExperts | None = None  # a mixture of experts' super experts (Su et al. 2025)

    @property
    def medians(self) -> list[float]:
        """Each block's median |a| over the scanned tokens: what the criterion's ratio is taken against."""
        return [stats.median for stats in self.layers]

    def __repr__(self) -> str:
        """One line: the model, each massive dim and its birth block, the sections present (a REPL or a notebook
        would otherwise print every field)."""
        dims = ", ".join(f"{d.dim} (born at block {d.born_at})" for d in self.dims[:6]) + (", ..." if len(self.dims) > 6 else "")
        present = [name for name, value in (("lifeline", self.lifeline), ("trigger", self.trigger), ("verification", self.verification),
                                            ("attention sinks", self.attention), ("super experts", self.super_experts),
                                            ("quantization", self.quantization), ("precision", self.precision)) if value]
        return (f"Report({self.model.name}: {f'massive dims {dims}' if self.dims else 'no massive activation'}; "
                f"{self.corpus.windows} window(s), {self.corpus.tokens:,} tokens; sections: detection, mechanism"
                + "".join(f", {name}" for name in present) + ")")

    def _repr_html_(self) -> str:
        """Jupyter's view: report.html's summary card (the presentation layer renders it; imported only here)."""
        from ..report.html import card

        return card(self)


def build_protect(report: Report) -> Protect:
    """The protect list of a scan (protect.json): ``massact.analysis.deploy.protect.build`` on the report's fields."""
    from .deploy.protect import build  # torch: only where a list is built, not where a report is read

    return build(model=report.model, criterion=report.criterion, dims=report.dims, massive=report.massive, texts=report.texts,
                 tokens=report.tokens, attribution=report.attribution, experts=report.experts, super_weights=report.super_weights)


def check_report_model(report: Report, lm: LoadedModel, where: str) -> None:
    """Refuse, in one line, to re-run or extend a saved report (``where``) on a model other than the one it was made
    from: its weights' identity (where the report saved one and the dtype is the same) and every super weight it
    names, at the value it saved (``massact.analysis.deploy.protect.check_saved_model``)."""
    from .deploy.protect import check_saved_model

    check_saved_model(lm, report.model, build_protect(report), where)
