"""Input texts: the built-in sentences, ``--text`` values, a file of lines or paragraphs, or a Hugging Face dataset."""

from __future__ import annotations

import os
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


def dataset_texts(spec: str, max_texts: int | None = None) -> list[str]:
    """Texts of a Hugging Face dataset, ``NAME[:CONFIG[:SPLIT]]`` (split "train" by default): a directory written by
    ``save_to_disk``, a local folder of data files, or a hub name (from the local cache, or downloaded when the hub
    can be reached). The column is "text" when there is one, else the first column of strings. Rows are read one by
    one and only the first ``max_texts`` are kept."""
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset needs the package datasets: pip install datasets") from None
    from itertools import chain, islice

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
    texts = list(islice((text for text in values if isinstance(text, str) and text.strip()), max_texts))
    if not texts:
        raise UsageError(f"dataset {spec!r} holds no text in column {column!r}")
    return texts


def gather_texts(
    texts: list[str] | None = None, file: str | None = None, max_texts: int | None = None, dataset: str | None = None
) -> list[str]:
    """The texts to scan: ``texts``, the file's and the dataset's (the first ``max_texts`` in all), or the built-in
    sentences when none is given."""
    gathered = list(texts or [])
    for index, text in enumerate(gathered, 1):
        if not text.strip():
            raise UsageError(f"text {index} is empty")
    if file is not None:
        gathered += read_text_file(file)
    if dataset is not None and (max_texts is None or len(gathered) < max_texts):
        gathered += dataset_texts(dataset, None if max_texts is None else max_texts - len(gathered))
    return (gathered or list(DEFAULT_TEXTS))[:max_texts]
