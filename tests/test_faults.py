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


def test_quant_files_join_a_report_as_one_set_and_a_killed_runs_partial_goes(tmp_path):
    """quant --out D over a report and an earlier run killed while writing: the report stays, the quantization files are
    replaced together, and the killed run's partial file is gone."""
    out = tmp_path / "out"
    atomic.write_set(out, {"report.json": "report", "quantization.json": "1", "quantization.txt": "1"})
    (out / ".quantization.txt.partial-999999999").write_text("half", encoding="utf-8")  # left by a SIGKILL
    atomic.write_set(out, {"quantization.json": "2", "quantization.txt": "2"}, keep=True)
    assert {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()} == {
        "report.json": "report", "quantization.json": "2", "quantization.txt": "2"}


def test_a_float16_overflow_writes_the_whole_report_naming_it(tokenizer, tmp_path, capsys):
    """A massive value past float16's 65504 becomes inf: the report (and protect.json) is still written, with null
    where JSON has no inf, and names the overflow."""
    import json

    from conftest import plant_mlp, tiny_model
    from massact.cli import main
    from massact.report.schema import load_protect, load_report

    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, 1, 37, 20, out_weight=2500.0)  # about 2.5e5
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = main([str(a) for a in ("scan", tmp_path / "model", "--dtype", "float16", "--text", "Summer is warm.", "--no-verify",
                                  "--format", "json,txt", "--quiet", "--out", tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert any(w.startswith("non-finite") and "dim 20" in w for w in data["warnings"])
    assert data["findings"]["layers"][1]["top"][0]["value"] is None  # inf, written as null
    assert load_report(tmp_path / "r").findings.dims and load_protect(tmp_path / "r" / "protect.json").massive_dims


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2])
def test_ctrl_c_at_any_moment_is_one_line(delay, tmp_path):
    """SIGINT while the command line starts (imports, model load): one line and exit 130, never a traceback."""
    import signal
    import subprocess
    import time

    from conftest import massact_command

    process = subprocess.Popen(massact_command("scan", "--text", "Summer is warm.", "--out", tmp_path / "r"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().splitlines() == ["massact: interrupted"], err
