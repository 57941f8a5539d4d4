"""Files written whole or not at all, never stale beside a new report, and stops that always say so.

Each case is the command a user ran: a profile or an export onto a full disk or into /proc, ``massact show`` on a
report.json edited after the scan or beside a report.txt copied from another report, a scan into a folder holding
another model's profile.json, a SIGTERM that Python swallowed inside a garbage-collection callback, a Ctrl-C while the
interpreter shuts down after the last line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, one_line_error, run_massact, save_planted
from massact.cli import main
from massact.report.schema import load_report
from massact.report.text import to_text


@pytest.fixture(scope="module")
def report_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "report"
    assert main(["scan", str(model_dir), "--text", "Summer is warm.", "--no-verify", "--format", "txt,json", "--quiet",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture()
def full_disk(tmp_path):
    """A 12 KiB filesystem filled to the last byte (tmpfs; root can mount one, as make test and CI run)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["dd", "if=/dev/zero", f"of={mount / 'fill'}", "bs=1k", "count=100"], capture_output=True)
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_profile_onto_a_full_disk_is_one_line_and_leaves_no_folder(model_dir, full_disk):
    result = run_massact("profile", model_dir, "--quiet", "--out", full_disk / "p")
    one_line_error(result, "No space left on device")
    assert sorted(path.name for path in full_disk.iterdir()) == ["fill"]  # no folder, no partial file


def test_an_export_onto_a_full_disk_or_into_proc_is_one_line(report_dir, full_disk):
    one_line_error(run_massact("protect", "export", "--engine", "quanto", report_dir / "protect.json", "--out", full_disk / "x.json"),
                   f"cannot write {full_disk / 'x.json'}", "No space left on device")
    assert sorted(path.name for path in full_disk.iterdir()) == ["fill"]
    one_line_error(run_massact("protect", "export", "--engine", "quanto", report_dir / "protect.json", "--out", "/proc/x.json"),
                   "cannot write /proc/x.json")


def _show(directory: Path, capsys) -> str:
    assert main(["show", str(directory)]) == 0
    return capsys.readouterr().out


def test_show_lays_out_a_report_json_edited_within_the_same_second(report_dir, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(report_dir, edited)
    saved = edited / "report.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    data["model"]["name"] = "EDITED"
    stamp = saved.stat()
    saved.write_text(json.dumps(data), encoding="utf-8")
    os.utime(saved, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the times cannot tell the edit
    shown = _show(edited, capsys)
    assert shown.startswith("massact report: EDITED") and shown == to_text(load_report(edited))
    assert _show(report_dir, capsys) == to_text(load_report(report_dir))  # the saved text where it is the report's


def test_show_lays_out_the_report_json_beside_a_report_txt_copied_from_another_report(report_dir, tokenizer, tmp_path, capsys):
    other_model = save_planted(tmp_path / "other-model", "llama", tokenizer, 2, 11, 5)
    other = tmp_path / "other"
    assert main(["scan", str(other_model), "--text", "Winter is cold.", *TINY[:-3], "--format", "txt,json", "--quiet",
                 "--out", str(other)]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(report_dir, mixed)
    shutil.copy2(other / "report.txt", mixed / "report.txt")  # with its times, as cp -p or a git checkout would leave them
    os.utime(mixed / "report.txt", ns=(mixed.joinpath("report.json").stat().st_atime_ns, mixed.joinpath("report.json").stat().st_mtime_ns))
    capsys.readouterr()
    shown = _show(mixed, capsys)
    assert shown == to_text(load_report(mixed)) and shown.startswith(f"massact report: {load_report(report_dir).model.name}")
    assert "other-model" not in shown


def test_a_new_scan_drops_another_models_profile_and_keeps_its_own(report_dir, tokenizer, tmp_path, capsys):
    folder = tmp_path / "folder"
    shutil.copytree(report_dir, folder)
    assert main(["profile", str(folder), "--quiet"]) == 0
    profile = (folder / "profile.json").read_bytes()
    saved = load_report(folder)
    # The same model scanned again into the folder (what verify does): its profile stays, byte for byte.
    assert main(["scan", saved.model.source, "--text", "Summer is warm.", "--no-verify", "--format", "txt,json", "--quiet",
                 "--out", str(folder)]) == 0
    assert (folder / "profile.json").read_bytes() == profile
    other_model = save_planted(tmp_path / "other-model", "llama", tokenizer, 2, 11, 5)
    assert main(["scan", str(other_model), "--text", "Summer is warm.", "--no-verify", "--format", "txt,json", "--quiet",
                 "--out", str(folder)]) == 0
    capsys.readouterr()
    assert not (folder / "profile.json").exists()
    assert load_report(folder).model.source == str(other_model.resolve())


class _SignalOnCollection:
    """An object whose finalizer sends this process a signal: the handler's KeyboardInterrupt is then raised inside
    the finalizer, where Python prints "Exception ignored" and goes on, as it does in a weakref or GC callback."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)


def test_a_sigterm_python_swallowed_still_ends_the_run_as_a_stop(report_dir, monkeypatch, capsys):
    from massact.report import files

    saved_text = files.saved_text

    def collected_then_read(directory):
        _SignalOnCollection(signal.SIGTERM)  # made and collected at once: the signal lands inside __del__
        return saved_text(directory)

    monkeypatch.setattr(files, "saved_text", collected_then_read)
    assert main(["show", str(report_dir)]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "massact: terminated (SIGTERM)"
    assert captured.out == to_text(load_report(report_dir))  # the work was done; nothing is lost


def test_a_ctrl_c_while_the_interpreter_shuts_down_is_the_interrupted_line(report_dir):
    """The signal sent from an exit handler, which runs after the command returned: as in the half second after the
    last line, while torch is torn down."""
    program = ("import atexit, os, signal, sys\n"
               "from massact import cli\n"
               "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
               f"sys.argv = ['massact', 'show', {str(report_dir)!r}]\n"
               "cli.run()\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGINT, result
    assert result.stderr.strip().splitlines() == ["massact: interrupted"]
    assert result.stdout == to_text(load_report(report_dir))  # printed whole before the stop
