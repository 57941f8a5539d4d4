"""Faults while writing: a full disk, an interrupt, a kill. Nothing half-written stays, and the previous set stays whole."""

import errno
import os
from pathlib import Path

import pytest

from massact.errors import UsageError
from massact.report import atomic


@pytest.mark.parametrize("layout", ["swapped", "in place"])
def test_a_full_disk_leaves_no_partial_file(layout, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old", encoding="utf-8")
    if layout == "in place":
        (out / "sub").mkdir()  # a subdirectory: the set is written file by file
    real = Path.write_bytes

    def full(path, data):
        real(path, data[:10])  # part of it reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UsageError, match="No space left on device"):
        atomic.write_set(out, {"report.json": "new", "layout.png": b"\x89PNG" * 100})
    assert (out / "report.json").read_text(encoding="utf-8") == "old"
    left = sorted(p.name for p in out.iterdir()) + sorted(p.name for p in tmp_path.iterdir())
    assert left == (["report.json", "sub"] if layout == "in place" else ["report.json"]) + ["out"], left


def test_the_set_is_replaced_whole_and_the_users_files_stay(tmp_path):
    out = tmp_path / "out"
    atomic.write_set(out, {"report.json": "1", "report.txt": "1", "report.html": "1", "layer_profile.png": b"1"})
    (out / "notes.md").write_text("mine", encoding="utf-8")
    inode = (out / "notes.md").stat().st_ino
    atomic.write_set(out, {"report.json": "2"})  # e.g. --format json: the old txt, html and figure were run 1's
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "report.json"]
    assert (out / "report.json").read_text(encoding="utf-8") == "2" and (out / "notes.md").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden staging directory left


def test_an_interrupted_write_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic.write_set(out, {"report.json": "1", "report.txt": "1"})
    real, calls = atomic._write, []

    def interrupted(path, content):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between the first and the second file
        real(path, content)

    monkeypatch.setattr(atomic, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_set(out, {"report.json": "2", "report.txt": "2"})
    assert {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()} == {"report.json": "1", "report.txt": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A SIGKILL leaves its staging directory: the next write removes it once its process is gone.
    stale = tmp_path / ".out.massact-999999999"
    stale.mkdir()
    (stale / "report.json").write_text("half", encoding="utf-8")
    monkeypatch.setattr(atomic, "_write", real)
    atomic.write_set(out, {"report.json": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
