"""The report's sections, in reading order: the one list that numbers them for report.txt, the HTML page, the CLI help
and `massact show --section`.

Every report prints every numbered section, so a number always means the same section: a section the run did not fill
says in one line why (not asked for, nothing to trace), instead of leaving a gap in the numbering.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    key: str  # the name `massact show --section` takes, and the HTML anchor
    title: str

    @property
    def number(self) -> int:
        return SECTIONS.index(self) + 1

    @property
    def heading(self) -> str:
        return f"{self.number}. {self.title}"


SECTIONS: tuple[Section, ...] = (
    Section("layers", "Layer scan: each block's residual output"),
    Section("massive", "Massive activations"),
    Section("lifeline", "Lifeline: how each massive dim is built, held and erased"),
    Section("origin", "Origin: which sublayer writes and erases them"),
    Section("anatomy", "MLP anatomy at the writing blocks"),
    Section("attribution", "Neuron attribution and super weight"),
    Section("trigger", "Trigger: why the writing neurons fire there"),
    Section("super-weights", "Super weights, zeroed one after another"),
    Section("verification", "Verification by intervention"),
    Section("sinks", "Attention sinks on the massive tokens"),
    Section("quantization", "Quantization: what it does to the massive activations"),
    Section("precision", "Precision headroom (float16, bfloat16)"),
    Section("valley", "Compression valley: the entropy of the token representations per block"),
    Section("qk", "Massive values in the queries and keys"),
)
# Unnumbered parts after the sections: they are not measurements of their own.
EXTRAS: tuple[Section, ...] = (Section("warnings", "Warnings"), Section("conclusion", "Conclusion"))


def section(key: str) -> Section:
    """The section named ``key`` (a key such as 'trigger', or its number as text); KeyError for neither."""
    for s in SECTIONS:
        if key in (s.key, str(s.number)):
            return s
    for s in EXTRAS:  # unnumbered: by name only
        if key == s.key:
            return s
    raise KeyError(key)


def names() -> str:
    """'layers (1), massive (2), ...': what `massact show --section` accepts, for its help and its error line."""
    return ", ".join([f"{s.key} ({s.number})" for s in SECTIONS] + [s.key for s in EXTRAS])
