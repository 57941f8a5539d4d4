"""Input texts: the built-in sentences, ``--text`` values, or a file of lines or paragraphs."""

from __future__ import annotations

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


def read_text_file(path: str) -> list[str]:
    """Texts of a UTF-8 file: paragraphs when it has blank lines between them, else one text per line."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    raw = file.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})") from None
    lines = content.strip().splitlines()
    if any(not line.strip() for line in lines):
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        texts = paragraphs
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise UsageError(f"{path} holds no text")
    return texts


def gather_texts(texts: list[str] | None = None, file: str | None = None, max_texts: int | None = None) -> list[str]:
    """The texts to scan: ``texts`` and the file's (the first ``max_texts`` in all), or the built-in sentences."""
    gathered = list(texts or [])
    for index, text in enumerate(gathered, 1):
        if not text.strip():
            raise UsageError(f"text {index} is empty")
    if file is not None:
        gathered += read_text_file(file)
    return (gathered or list(DEFAULT_TEXTS))[:max_texts]
