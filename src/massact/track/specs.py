"""What ``massact track SPEC [SPEC ...]`` loads, in training order.

A SPEC is a model directory, a .gguf file, a hub id (``id@revision`` loads that branch, tag or commit, e.g.
``EleutherAI/pythia-160m@step3000``), or a directory of HF Trainer checkpoints (``checkpoint-<step>/`` folders),
which becomes one checkpoint per folder ordered by step: the step from its ``trainer_state.json`` (``global_step``),
else from the folder's name. Every problem is found here, before any model loads, and said in one line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..models.loading import _HUB_ID, _hub_source, hub_reachable, split_revision

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One model of the track: ``spec`` as the user (or the Trainer folder) names it; ``target`` what
    ``massact.models.load`` takes (a path, or a hub id with its revision); ``step`` where known."""

    spec: str
    target: str
    step: int | None = None

    @property
    def local(self) -> Path | None:
        """The model directory on disk (None for a .gguf file or a hub id)."""
        path = Path(self.target)
        return path if path.is_dir() else None


def expand(specs: Sequence[str]) -> list[Checkpoint]:
    """Every SPEC as its checkpoints, in the order given; a Trainer directory's checkpoints in step order."""
    if not specs:
        raise UsageError("track needs at least one SPEC")
    found = [checkpoint for spec in specs for checkpoint in _one(spec)]
    check_series(found)
    return found


def _one(spec: str) -> list[Checkpoint]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{spec} is not a model: expected a model directory, a .gguf file or a directory of "
                             "checkpoint-<step>/ folders")
        return [Checkpoint(spec=spec, target=str(path))]
    if path.is_dir():
        if (path / "config.json").is_file():
            return [Checkpoint(spec=spec, target=str(path), step=step_of(path))]
        return trainer_checkpoints(path, spec)
    model_id, revision = split_revision(spec)  # "id@" or "@rev" fails here, before any load
    if spec.startswith((".", "/", "~", os.sep)) or not _HUB_ID.match(model_id):
        raise UsageError(f"{spec}: no such file or directory")
    if _offline():
        _hub_source(model_id, revision)  # only the cache can serve it: a missing revision fails now, in one line
    return [Checkpoint(spec=spec, target=spec, step=None if revision is None else _revision_step(revision))]


def single(spec: str) -> Checkpoint:
    """One model, not a series: a model directory, a .gguf file or a hub id (``ID@REVISION``), checked as a SPEC is
    (before any model loads); a directory without config.json is refused, not read as Trainer checkpoints."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{spec} is a directory but not a Hugging Face model (no config.json)")
    return _one(spec)[0]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable()


def _revision_step(revision: str) -> int | None:
    """Pythia's and OLMo's checkpoint branches name their step: "step3000", "stage1-step5000-tokens21B"."""
    match = re.search(r"(?:^|-)step(\d+)(?:-|$)", revision)
    return int(match[1]) if match else None


def trainer_checkpoints(directory: Path, spec: str) -> list[Checkpoint]:
    """The ``checkpoint-<step>/`` folders of a Trainer output directory, by step."""
    # A checkpoint-<step> entry that is not a folder (a broken link, a file) is refused below, not skipped.
    folders = [entry for entry in directory.iterdir() if (entry.is_dir() or entry.is_symlink()) and _CHECKPOINT.match(entry.name)]
    if not folders:
        raise UsageError(f"{spec}: neither a model directory (no config.json) nor a directory of checkpoint-<step>/ folders")
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{folder}: a link to {os.readlink(folder)}, which is not a folder (a checkpoint deleted or moved?)")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{folder}: a checkpoint folder without config.json (not saved whole?)")
    checkpoints = [Checkpoint(spec=str(Path(spec) / folder.name), target=str(folder), step=step_of(folder)) for folder in folders]
    return sorted(checkpoints, key=lambda c: c.step)


def step_of(folder: Path) -> int | None:
    """The training step of a saved checkpoint: ``global_step`` of its trainer_state.json, else the number in a
    ``checkpoint-<step>`` name, else None."""
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
        except (OSError, ValueError, AttributeError):
            step = None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
    match = _CHECKPOINT.match(folder.name)
    return int(match[1]) if match else None


def shape(config) -> tuple[str, int, int]:
    """What must agree across a track for dims to be matched by index: the model type, the width and the depth."""
    # transformers' configs answer the common names whatever their own (GPT-2's n_embd is its hidden_size).
    return config.model_type, getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)


def describe(found: tuple[str, int, int]) -> str:
    return f"{found[0]}, d_model {found[1]}, {found[2]} blocks"


def check_series(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse, before any load, a local checkpoint of another architecture or shape than the first local one."""
    from ..models.loading import read_config

    first: tuple[Checkpoint, tuple] | None = None
    for checkpoint in checkpoints:
        if checkpoint.local is None:
            continue
        found = shape(read_config(checkpoint.local, checkpoint.spec))
        if first is None:
            first = checkpoint, found
        elif found != first[1]:
            raise UsageError(f"{checkpoint.spec} is another architecture ({describe(found)}) than {first[0].spec} "
                             f"({describe(first[1])}): a track compares checkpoints of one model")
