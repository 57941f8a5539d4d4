"""Input texts: the built-in sentences, ``--text`` values, a file of lines or paragraphs, or a Hugging Face dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, islice
from pathlib import Path

from .errors import UsageError

# Plain English of the kind Sun et al. (2024) scanned: several sentences, punctuation, a line break.
DEFAULT_TEXTS: tuple[str, ...] = (
    "The library opens at nine in the morning and closes at six in the evening.",
    "Summer is warm. Winter is cold. Spring and autumn sit in between.",
    "She poured the tea, opened the window, and watched the rain fall on the garden.",
    "A good map shows you where you are and where you could go next.",
    "The committee met on Tuesday.\nIt agreed to repair the old bridge before the winter.",
)


# The longest text massact reads, in characters (and a file's line, in bytes): 1 MiB, about 250,000 tokens of
# English. Tokenizing costs about 150 bytes of memory per character, so a text is refused above this before it is
# read whole (a 50 MB line would need 7 GB); a longer document is split into lines or paragraphs, and a text longer
# than the model's context into --max-length windows.
MAX_TEXT_CHARS = 1 << 20


def _too_long(what: str) -> UsageError:
    return UsageError(f"{what} is longer than {MAX_TEXT_CHARS:,} characters: split it into lines or paragraphs")


def _lines(path: str) -> Iterator[str]:
    """The file's lines, read one at a time (memory does not grow with the file, nor with a line: one longer than
    MAX_TEXT_CHARS bytes is refused after reading that much of it), each checked to be UTF-8."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{path} is a directory, not a file of texts")
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    offset = number = 0
    with file.open("rb") as handle:
        while raw := handle.readline(MAX_TEXT_CHARS + 2):  # a line, its line break, or a bounded part of it
            number += 1
            if len(raw.rstrip(b"\r\n")) > MAX_TEXT_CHARS:
                raise _too_long(f"line {number} of {path}")
            try:
                line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as error:
                bad = offset + error.start
                raise UsageError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {bad})") from None
            offset += len(raw)
            yield from line.splitlines() or [""]


def _is_paragraphs(path: str) -> bool:
    """True when a blank line separates two lines of text: the file holds paragraphs, else one text per line."""
    seen_text = seen_gap = False
    for line in _lines(path):
        if line.strip():
            if seen_gap:
                return True
            seen_text = True
        elif seen_text:
            seen_gap = True
    return False


def iter_text_file(path: str, paragraphs: bool | None = None) -> Iterator[str]:
    """Texts of a UTF-8 file, read lazily: paragraphs (lines joined by spaces) when blank lines separate them, else
    one text per line. ``paragraphs`` None: find out first (one more pass over the file); a caller that reads the
    file several times passes what it found once."""
    if paragraphs is None:
        paragraphs = _is_paragraphs(path)
    if not paragraphs:
        yield from (line.strip() for line in _lines(path) if line.strip())
        return
    current: list[str] = []
    size = 0
    for line in _lines(path):
        if line.strip():
            current.append(line.strip())
            size += len(current[-1]) + 1
            if size > MAX_TEXT_CHARS + 1:  # bounded before it is joined
                raise _too_long(f"a paragraph of {path}")
        elif current:
            yield " ".join(current)
            current, size = [], 0
    if current:
        yield " ".join(current)


def read_text_file(path: str) -> list[str]:
    """Every text of a (small) file, e.g. the evaluation text; see ``iter_text_file``."""
    texts = list(iter_text_file(path))
    if not texts:
        raise UsageError(f"{path} holds no text")
    return texts


def read_eval_file(path: str) -> str:
    """The evaluation text of ``--eval-file``: the file's texts joined by blank lines."""
    return "\n\n".join(read_text_file(path))


def iter_dataset(spec: str) -> Iterator[str]:
    """Texts of a Hugging Face dataset, ``NAME[:CONFIG[:SPLIT]]`` (split "train" by default): a directory written by
    ``save_to_disk``, a local folder of data files, or a hub name (from the local cache, or downloaded when the hub
    can be reached). The column is "text" when there is one, else the first column of strings. The dataset is opened
    and its first row checked now; rows are then read one at a time as the iterator is consumed."""
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset needs the package datasets: pip install datasets") from None
    from .models.loading import first_line, hub_reachable

    name, config, split = (spec.split(":") + ["", ""])[:3]
    path = Path(name).expanduser()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[split or ("train" if "train" in data else next(iter(data)))]
        else:
            offline = any(os.environ.get(v, "0") not in ("0", "", "false") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
            if not path.exists() and not offline and not hub_reachable():  # fail at once, not after a minute of retries
                raise UsageError(
                    f"dataset {name!r} is not a local path and the Hugging Face hub cannot be reached; "
                    "to read it from the local cache, set HF_DATASETS_OFFLINE=1"
                )
            data = datasets.load_dataset(str(path) if path.exists() else name, config or None, split=split or "train", streaming=True)
    except UsageError:
        raise
    except Exception as error:  # datasets raises many kinds (missing split, no cache, bad files)
        raise UsageError(f"cannot load dataset {spec!r}: {first_line(error)}") from None
    rows = iter(data)
    try:
        first = next(rows)
    except StopIteration:
        raise UsageError(f"dataset {spec!r} is empty") from None
    except Exception as error:
        raise UsageError(f"cannot read dataset {spec!r}: {first_line(error)}") from None
    # A streamed dataset may not know its features before reading: take the column from the first row.
    strings = [column for column, value in first.items() if isinstance(value, str)]
    column = "text" if "text" in first else (strings[0] if strings else None)
    if column is None:
        raise UsageError(f"dataset {spec!r} has no column of text (columns: {', '.join(first) or 'none'})")
    values = (row[column] for row in chain([first], rows))
    return (text for text in values if isinstance(text, str) and text.strip())


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """The texts to scan, read lazily each time the corpus is iterated: the given ``texts``, then the file's, then
    the dataset's, the first ``max_texts`` in all; the built-in sentences when none is given. Memory does not grow
    with the corpus: nothing is kept between iterations. A report keeps it (``CorpusInfo.spec``) to read the same
    texts again."""

    texts: tuple[str, ...] = ()
    file: str | None = None
    dataset: str | None = None
    max_texts: int | None = None

    def __iter__(self) -> Iterator[str]:
        if not (self.texts or self.file or self.dataset):
            return islice(DEFAULT_TEXTS, self.max_texts)
        sources = chain(
            self.texts,
            iter_text_file(self.file, self._paragraphs) if self.file else (),
            _deferred(iter_dataset, self.dataset) if self.dataset else (),
        )
        return _bounded(islice(sources, self.max_texts))

    def check(self) -> int | None:
        """Fail now, with one clear line, on input that would fail later. Returns the number of texts, or None for
        a dataset (known only once read). A file is read through once, lazily, as far as ``max_texts`` needs."""
        for index, text in enumerate(self.texts, 1):
            if not text.strip():
                raise UsageError(f"text {index} is empty")
        if not (self.texts or self.file or self.dataset):
            return len(list(self))
        count = len(self.texts)
        if self.file:
            remaining = None if self.max_texts is None else max(self.max_texts - count, 0)
            found = sum(1 for _ in islice(iter_text_file(self.file, self._paragraphs), remaining))
            if found == 0 and remaining != 0:
                raise UsageError(f"{self.file} holds no text")
            count += found
        if self.max_texts is not None and count >= self.max_texts:
            return self.max_texts
        if self.dataset:
            if next(iter_dataset(self.dataset), None) is None:  # opens it and reads up to its first text
                raise UsageError(f"dataset {self.dataset!r} holds no text")
            return None
        return count

    @cached_property
    def _paragraphs(self) -> bool:
        """The file's layout, found once: the corpus is read several times (check, scan, fetching texts)."""
        return _is_paragraphs(self.file)

    def describe(self) -> str:
        parts = [f"{len(self.texts)} given text(s)"] if self.texts else []
        parts += [f"file {self.file}"] if self.file else []
        parts += [f"dataset {self.dataset}"] if self.dataset else []
        limit = f", the first {self.max_texts}" if self.max_texts is not None else ""
        return (" + ".join(parts) or "the built-in sentences") + limit


def _bounded(texts: Iterator[str]) -> Iterator[str]:
    """The texts, refusing one longer than MAX_TEXT_CHARS (a --text value or a dataset row) before it is tokenized."""
    for number, text in enumerate(texts, 1):
        if len(text) > MAX_TEXT_CHARS:
            raise _too_long(f"text {number}")
        yield text


def _deferred(open_source, spec: str) -> Iterator[str]:
    """Open a source only when the texts before it have been read."""
    yield from open_source(spec)
