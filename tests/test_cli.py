"""The command line end to end on a tiny saved model, and bad input: one line on stderr, exit code 2."""

import hashlib
import json
import os
import re

import pytest

from conftest import CONTEXT, run_massact, save_planted
from massact.report.schema import load_report
from massact.report.sections import SECTIONS
from massact.report.text import to_text

LAYER, NEURON, DIM = 2, 11, 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_planted(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tokenizer, LAYER, NEURON, DIM)


run = run_massact


def test_scan_writes_every_output(model_dir, tmp_path):
    out = tmp_path / "report"
    result = run("scan", model_dir, "--text", "The committee met on Tuesday.", "--text", "Summer is warm.", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["findings"]["texts"] == {"0": "The committee met on Tuesday.", "1": "Summer is warm."}
    assert [d["dim"] for d in data["findings"]["dims"]] == [DIM] and data["findings"]["dims"][0]["born_at"] == LAYER
    assert data["mechanism"]["attribution"][0]["neurons"][0]["neuron"] == NEURON
    assert data["mechanism"]["lifelines"][0]["dim"] == DIM and data["mechanism"]["lifelines"][0]["steps"][LAYER]["phase"] == "birth"
    assert data["trigger"][0]["chain"][0]["index"] == NEURON
    steps = data["causal"]["super_weights"]  # verification is on by default for a model this small
    assert [(s["neuron"], s["still_massive"]) for s in steps] == [(NEURON, False)]
    text = (out / "report.txt").read_text(encoding="utf-8")
    assert numbered(text) == list(range(1, len(SECTIONS) + 1)) and "## Conclusion" in text
    assert "\x1b[" not in text  # no terminal colour codes in the file
    # The terminal gets the one-screen summary, not the report: the dim, its birth block, its writer and super weight.
    lines = result.stdout.splitlines()
    screen = [line for line in lines if not line.startswith("wrote ")]  # the paths are as long as the directory's name
    assert len(lines) <= 60 and max(map(len, screen)) <= 120 and "## 1. Layer scan" not in result.stdout
    assert f"Dim {DIM} is born in block {LAYER}" in result.stdout and f"c_proj[{NEURON}, {DIM}]" in result.stdout
    assert f"wrote {out / 'report.json'}" in result.stdout


def numbered(text: str) -> list[int]:
    """The section numbers of a report.txt, in order."""
    return [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)]


def test_scan_reads_a_file_of_paragraphs(model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("First paragraph,\nstill the first.\n\nSecond one.\n", encoding="utf-8")
    result = run("scan", model_dir, "--file", texts, "--out", tmp_path / "r", "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert data["findings"]["texts"] == {"0": "First paragraph, still the first.", "1": "Second one."}
    assert data["corpus"]["texts"] == 2 and data["corpus"]["spec"]["file"] == str(texts.resolve())


def test_default_output_directory_is_named_after_the_model(model_dir, tmp_path):
    result = run("scan", model_dir, "--text", "Summer is warm.", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "massact-report" / model_dir.name / "report.json").is_file()


def _bad(tmp_path, model_dir):
    not_model = tmp_path / "notes.txt"
    not_model.write_text("hello", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    long_text = " ".join(["winter"] * (CONTEXT * 2))
    return {
        "unknown hub id": (["scan", "no-such-org/no-such-model-xyz"], "hub cannot be reached"),
        "missing path": (["scan", tmp_path / "missing" / "model"], "no such file or directory"),
        "not a model": (["scan", not_model], "is not a model"),
        "empty text": (["scan", model_dir, "--text", "  "], "text 1 is empty"),
        "non-UTF-8 file": (["scan", model_dir, "--file", latin1], "is not UTF-8 text"),
        "too long": (["scan", model_dir, "--text", long_text], f"more than the model's context of {CONTEXT}"),
        "bad option": (["scan", "--dtype", "int3"], "invalid choice"),
    }


@pytest.mark.parametrize(
    "case", ["unknown hub id", "missing path", "not a model", "empty text", "non-UTF-8 file", "too long", "bad option"]
)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, model_dir):
    args, message = _bad(tmp_path, model_dir)[case]
    result = run(*args, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("massact: error:") and message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_verify_adds_the_verification_to_a_saved_report(model_dir, tmp_path):
    out = tmp_path / "saved"
    assert run("scan", model_dir, "--text", "Summer is warm.", "--no-verify", "--quiet", "--out", out).returncode == 0
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["causal"]["verification"] is None and saved["causal"]["attention"] is None
    unverified = (out / "report.txt").read_text(encoding="utf-8")
    assert "## 9. Verification by intervention\n\nNot run: pass --verify" in unverified
    result = run("verify", out, "--full")
    assert result.returncode == 0, result.stderr
    text = (out / "report.txt").read_text(encoding="utf-8")
    body = text.removesuffix("\n").rsplit("\n", 1)[0] + "\n"  # report.txt without the line naming its report.json
    assert result.stdout.startswith(body) and result.stdout[len(body):].startswith("wrote ")  # --full: report.txt itself
    assert numbered(unverified) == numbered(text) == list(range(1, len(SECTIONS) + 1))  # no gap, with or without
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    names = [row["name"] for row in data["causal"]["verification"]["interventions"]]
    assert f"ablate neuron {NEURON}" in names and any(n.startswith("zero super weight") for n in names)
    assert len(data["causal"]["attention"]["share"]) == 4
    assert "9. Verification by intervention" in (out / "report.txt").read_text(encoding="utf-8")


def test_verify_on_a_directory_without_a_report(tmp_path):
    result = run("verify", tmp_path)
    assert result.returncode == 2 and "not a massact report" in result.stderr and "Traceback" not in result.stderr


def test_show_prints_a_saved_report_its_summary_or_one_section(model_dir, tmp_path):
    out = tmp_path / "shown"
    assert run("scan", model_dir, "--text", "Summer is warm.", "--no-verify", "--quiet", "--out", out).returncode == 0
    text = (out / "report.txt").read_text(encoding="utf-8")
    body, last = text.removesuffix("\n").rsplit("\n", 1)
    assert last == "Laid out from report.json sha256 " + hashlib.sha256((out / "report.json").read_bytes()).hexdigest()
    assert run("show", out).stdout == body + "\n" == to_text(load_report(out))  # the saved text, as laid out again
    trigger = run("show", out, "--section", "trigger").stdout
    assert trigger.startswith("## 7. Trigger") and trigger.strip() in text and "## 8." not in trigger
    assert run("show", out, "--section", "7").stdout == trigger
    summary = run("show", out, "--summary").stdout
    assert f"Dim {DIM} is born in block {LAYER}" in summary and "Not verified" in summary
    bad = run("show", out, "--section", "nothing")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "trigger (7)" in bad.stderr

    # A report.json changed after its report.txt was written: show lays out the report.json, not the older text.
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    data["warnings"] = ["a warning added by hand"]
    (out / "report.json").write_text(json.dumps(data), encoding="utf-8")
    later = (out / "report.txt").stat().st_mtime + 5
    os.utime(out / "report.json", (later, later))
    shown = run("show", out).stdout
    assert "- a warning added by hand" in shown and shown == to_text(load_report(out))


def test_scan_help_groups_its_options_and_states_the_defaults_a_scan_runs_with(model_dir, tmp_path):
    """``massact scan --help`` lists its options by group, corpus before output; each "(default X)" it states is the
    value a scan given no options ran with (the settings saved in its report.json), so a CLI that passed another
    default than the one it documents fails; an option that scan and track share reads the same in both."""
    import argparse

    from massact.cli import build_parser, main
    from massact.settings import QUANT_DEFAULTS

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    groups = {name: {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
              for name, parser in commands.items()}
    titles = [t for t in groups["scan"] if groups["scan"][t] and t not in ("positional arguments", "options")]
    assert titles == ["model", "loading", "corpus", "criterion", "analysis", "verification", "evaluation", "deployment",
                      "output", "scale"]
    assert "text" in groups["scan"]["corpus"] and "out" in groups["scan"]["output"] and "resume" in groups["scan"]["scale"]
    out = tmp_path / "defaults"
    assert main(["scan", str(model_dir), "--no-verify", "--format", "json", "--quiet", "--out", str(out)]) == 0
    ran = json.loads((out / "report.json").read_text(encoding="utf-8"))["settings"]
    stated = 0
    for action in commands["scan"]._actions:
        match = re.search(r"\(default ([^;)]+)\)", action.help or "")
        if match:
            assert action.dest in ran, action.dest  # a stated default is a setting the report saves
            value = ran[action.dest]  # None: the sweep's own default (saved as None, as reports have always saved it)
            assert match.group(1) == str(QUANT_DEFAULTS.get(action.dest) if value is None else value), action.dest
            assert action.default is None  # not given: the settings' default, or a saved report's
            stated += 1
    assert stated >= 8
    helps = [{a.dest: a.help for a in commands[name]._actions}.items() for name in ("scan", "track")]
    shared = helps[0] & helps[1]
    assert {"top_k", "min_abs", "min_ratio", "batch_size", "max_length", "text", "file", "dataset"} <= {dest for dest, _ in shared}
