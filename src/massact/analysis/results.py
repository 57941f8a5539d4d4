"""The report as a whole: the model, the corpus and every stage's results, and its JSON form; and what a saved
report gives the stages that run again on it (its protect list, the check that a model is its own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..models.info import ModelInfo
from ..settings import ScanSettings
from ..texts import Corpus
from .causal.results import Causal
from .deploy.results import Deploy, Protect
from .detect.results import Findings
from .function.results import CompressionValley, QkValues
from .mechanism.results import Mechanism
from .trigger.results import Trigger

if TYPE_CHECKING:
    from ..models.checkpoint import StreamedModel
    from ..models.loading import LoadedModel


@dataclass(kw_only=True)
class CorpusInfo:
    """What was scanned: where the texts came from, how many texts, windows (forward passes) and real tokens, and
    the corpus that reads it again (``massact verify`` re-runs the scan from it, in windows of the settings'
    ``max_length``)."""

    source: str
    texts: int
    windows: int
    tokens: int
    spec: Corpus


@dataclass(kw_only=True, slots=True)  # slots: a stale flat name (report.dims = ...) fails, not sets
class Report:
    """A scan, nested by stage (report.json's version 2): what was scanned and how (``model``, ``corpus``, every
    option in ``settings``), then each stage's results in the order they run, the conclusion's sentences, the
    warnings raised on the way and the versions of massact, torch and transformers that made it; last, the compression
    valley (the function stage's, measured in every scan)."""

    model: ModelInfo
    corpus: CorpusInfo
    settings: ScanSettings
    findings: Findings
    mechanism: Mechanism
    trigger: list[Trigger]  # one per lifeline: why its dim fires on its carrier
    causal: Causal
    deploy: Deploy
    conclusion: list[str]
    warnings: list[str]
    versions: dict[str, str]
    valley: CompressionValley | None = None  # None in a report made before the section existed
    qk: QkValues | None = None  # massive values in the queries and keys (None: an older report)

    @property
    def medians(self) -> list[float]:
        """Each block's median |a| over the scanned tokens: what the criterion's ratio is taken against."""
        return self.findings.medians

    def __repr__(self) -> str:
        """One line: the model, each massive dim and its birth block, the sections present (a REPL or a notebook
        would otherwise print every field)."""
        found = self.findings.dims
        dims = ", ".join(f"{d.dim} (born at block {d.born_at})" for d in found[:6]) + (", ..." if len(found) > 6 else "")
        present = [name for name, value in (("lifeline", self.mechanism.lifelines), ("trigger", self.trigger),
                                            ("verification", self.causal.verification), ("attention sinks", self.causal.attention),
                                            ("super experts", self.mechanism.super_experts),
                                            ("quantization", self.deploy.quantization), ("precision", self.deploy.precision),
                                            ("compression valley", self.valley),
                                            ("Q/K values", self.qk)) if value]
        return (f"Report({self.model.name}: {f'massive dims {dims}' if found else 'no massive activation'}; "
                f"{self.corpus.windows} window(s), {self.corpus.tokens:,} tokens; sections: detection, mechanism"
                + "".join(f", {name}" for name in present) + ")")

    def _repr_html_(self) -> str:
        """Jupyter's view: report.html's summary card (the presentation layer renders it; imported only here)."""
        from ..report.html import card

        return card(self)


def build_protect(report: Report) -> Protect:
    """The protect list of a scan (protect.json): ``massact.analysis.deploy.protect.build`` on the report's stages."""
    from .deploy.protect import build  # torch: only where a list is built, not where a report is read

    return build(report.model, report.findings, report.mechanism, report.causal.super_weights)


def check_report_model(report: Report, lm: LoadedModel, where: str) -> None:
    """Refuse, in one line, to re-run or extend a saved report (``where``) on a model other than the one it was made
    from: its weights' identity (where the report saved one and the dtype is the same) and every super weight it
    names, at the value it saved (``massact.analysis.deploy.protect.check_saved_model``)."""
    from .deploy.protect import check_saved_model

    check_saved_model(lm, report.model, build_protect(report), where)


def check_streamed_report_model(report: Report, streamed: StreamedModel, where: str) -> None:
    """``check_report_model`` on a model read block by block (``massact.analysis.deploy.protect.check_saved_streamed``:
    one pass over its blocks)."""
    from .deploy.protect import check_saved_streamed

    check_saved_streamed(streamed, report.model, build_protect(report), where)
