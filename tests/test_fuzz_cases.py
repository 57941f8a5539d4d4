"""Refusals and guarantees of track, the monitor, verify, show, the Python API and signals, one test each, against:
the wrong model's numbers under another's name, a training flag lost, a traceback, a silent merge, files of two runs
side by side, an argument accepted that fails mid-training, a silent skip, stray lines before the error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer

import massact
from conftest import TINY, massact_command, one_line_error, plant_mlp, run_massact, save_planted, tiny_model
from massact.analysis.track.results import MonitorBlock
from massact.cli import main
from massact.models.loading import _gguf_dir, default_gguf
from massact.report.sections import EXTRAS, SECTIONS
from massact.settings import Criterion
from massact.track.monitor import Monitor

NEURON, DIM = 7, 20


def _checkpoint(path, tokenizer, seed: int = 0, layer: int = 2, weight: float = 100.0):
    model = tiny_model("llama", len(tokenizer), seed=seed)
    plant_mlp(model, tokenizer.bos_token_id, layer, NEURON, DIM, out_weight=weight)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _error(capsys) -> str:
    """The one line a refused command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("massact: error:"), lines
    return lines[0]


# A track's finished checkpoint folder is reused only for the same model.
def test_a_track_into_another_runs_folder_is_refused(tokenizer, tmp_path, capsys):
    _checkpoint(tmp_path / "run-a" / "checkpoint-100", tokenizer, seed=0)
    _checkpoint(tmp_path / "run-b" / "checkpoint-100", tokenizer, seed=1)  # the same planted writer, other weights
    out = tmp_path / "out"
    assert main(["track", str(tmp_path / "run-a"), "--out", str(out), "--quiet", "--format", "json"]) == 0
    made = (out / "step-00000100" / "report.json").read_bytes()
    assert main(["track", str(tmp_path / "run-a"), "--out", str(out), "--quiet", "--format", "json"]) == 0  # same run: kept
    capsys.readouterr()
    assert main(["track", str(tmp_path / "run-b"), "--out", str(out), "--quiet", "--format", "json"]) == 2
    assert "step-00000100/report.json was made from other weights" in _error(capsys)
    assert (out / "step-00000100" / "report.json").read_bytes() == made  # nothing lost, nothing overwritten


# The monitor restores every module's own training flag.
def test_the_monitor_restores_every_modules_training_flag(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.train()
    frozen = model.model.layers[1]
    frozen.eval()  # a frozen block: its dropout stays off while the rest trains
    before = {name: module.training for name, module in model.named_modules()}
    assert Monitor(tokenizer, every=1).step(model, 1) is not None
    assert {name: module.training for name, module in model.named_modules()} == before
    assert model.training and not frozen.training and not frozen.self_attn.training


def _record(step: int, blocks: int = 2, min_ratio: float = 1000.0) -> str:
    block = [asdict(MonitorBlock(layer=i, top1=5.0, median=0.1, ratio=50.0, massive=0, top_dim=7)) for i in range(blocks)]
    return json.dumps({"step": step, "texts": 2, "blocks": block, "criterion": asdict(Criterion(min_ratio=min_ratio))})


# Monitor journals that cannot be one timeline are one line each, never a traceback or a silent merge.
@pytest.mark.parametrize("lines, expected", [
    ([_record(1, blocks=2), _record(2, blocks=3)], "step 2 has 3 blocks"),
    (["[" * 100_000 + "]" * 100_000, _record(2)], "monitor.jsonl:1: not a JSON line"),
    ([_record(1), _record(2, min_ratio=100.0)], "step 2 was measured with another criterion"),
    ([_record(1), _record(1)], "step 1 is recorded twice"),
    ([json.dumps({**json.loads(_record(1)), "blocks": json.loads(_record(1))["blocks"][::-1]})], "blocks 0, 1, 2, ... in order"),
])
def test_a_monitor_journal_that_is_not_one_timeline_is_one_line(lines, expected, tmp_path, capsys):
    path = tmp_path / "monitor.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["track", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert expected in _error(capsys)


def test_two_journals_with_the_same_step_are_refused(tmp_path, capsys):
    for name, steps in (("a", (1, 2, 3)), ("b", (3, 4))):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(_record(s) for s in steps) + "\n", encoding="utf-8")
    assert main(["track", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "step 3 is recorded twice" in _error(capsys) and not (tmp_path / "out" / "track.json").exists()
    assert main(["track", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl").replace("b.jsonl", "a.jsonl"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2  # the same file twice is the same steps twice


# verify re-runs a report only on the model it was made from.
@pytest.mark.parametrize("change", ["retrained", "super weight"])
def test_verify_refuses_a_model_whose_weights_changed(change, tokenizer, tmp_path, capsys):
    model_dir = _checkpoint(tmp_path / "model", tokenizer)
    out = tmp_path / "report"
    assert main(["scan", str(model_dir), "--text", "Summer is warm.", "--out", str(out), *TINY]) == 0
    before = (out / "report.json").read_bytes()
    if change == "retrained":  # every weight moved: another seed, the same planted writer
        _checkpoint(model_dir, tokenizer, seed=3)
    else:  # only the super weight: the sampled bytes may miss it, the super weight check does not
        _checkpoint(model_dir, tokenizer, weight=90.0)
    capsys.readouterr()
    assert main(["verify", str(out), "--quiet", "--format", "json"]) == 2
    line = _error(capsys)
    assert ("made from other weights" in line) if change == "retrained" else ("the list says +100" in line), line
    assert (out / "report.json").read_bytes() == before
    assert main(["quant", str(out), "--quiet", "--format", "json"]) == 2  # quant makes the same check
    _error(capsys)


# A track's files are replaced as one set.
def test_a_track_rerun_with_fewer_outputs_leaves_none_of_the_earlier_files(tokenizer, tmp_path):
    run = tmp_path / "run"
    for step, layer in ((100, 2), (200, 1)):
        _checkpoint(run / f"checkpoint-{step}", tokenizer, layer=layer)
    out = tmp_path / "out"
    assert main(["track", str(run), "--out", str(out), "--quiet"]) == 0
    assert {"track.html", "track.txt", "track_values.png"} <= {p.name for p in out.iterdir()}
    (out / "notes.md").write_text("mine", encoding="utf-8")
    assert main(["track", str(run), "--out", str(out), "--quiet", "--format", "json"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["notes.md", "track.json"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step-00000100", "step-00000200"]


# The monitor checks its arguments when it is made, and the model at every step.
@pytest.fixture(scope="module")
def plain_tokenizer():
    """The default model's tokenizer: it adds no BOS, so an empty text has no token."""
    return AutoTokenizer.from_pretrained(_gguf_dir(default_gguf(), lambda message: None))


@pytest.mark.parametrize("arguments, error, words", [
    (dict(path="/proc/massact/m.jsonl"), ValueError, "path '/proc/massact/m.jsonl' cannot be appended to"),
    (dict(every=2.5), ValueError, "every must be a whole number of at least 1, not 2.5"),
    (dict(every=True), ValueError, "every must be a whole number of at least 1, not True"),
    (dict(batch_size=0), ValueError, "batch_size must be a whole number of at least 1, not 0"),
    (dict(texts=[""]), ValueError, "texts[0] has no tokens"),
    (dict(texts="one text"), ValueError, "texts must be a non-empty list of strings"),
    (dict(criterion={"min_abs": 10}), TypeError, "criterion must be a massact Criterion"),
])
def test_the_monitor_refuses_a_bad_argument_when_made(arguments, error, words, plain_tokenizer, tmp_path):
    with pytest.raises(error, match=re.escape(words)):
        Monitor(plain_tokenizer, **arguments)
    assert not os.path.exists("/proc/massact")


def test_the_monitor_refuses_a_model_it_cannot_scan_at_any_step(plain_tokenizer, tmp_path):
    monitor = Monitor(plain_tokenizer, every=100, path=tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()  # the write was tried, and the file made for it removed
    with pytest.raises(TypeError, match="model must be a transformers model"):
        monitor.step(torch.nn.Linear(2, 2), 1)  # not a multiple of every: still refused now


# An empty list of texts is not "no texts given".
def test_scan_refuses_an_empty_list_of_texts(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="texts is empty"):
        massact.scan(model, [], tokenizer=tokenizer)


# A broken checkpoint link is refused, not skipped.
def test_a_broken_checkpoint_link_is_refused(tokenizer, tmp_path, capsys):
    _checkpoint(tmp_path / "run" / "checkpoint-10", tokenizer)
    (tmp_path / "run" / "checkpoint-20").symlink_to(tmp_path / "gone")
    assert main(["track", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "checkpoint-20: a link to" in _error(capsys)


# One line, with nothing of transformers' before it.
def test_a_track_of_two_architectures_is_one_line(tokenizer, tmp_path):
    save_planted(tmp_path / "llama", "llama", tokenizer, 1, NEURON, DIM)
    save_planted(tmp_path / "gpt2", "gpt2", tokenizer, 1, NEURON, DIM)
    config = json.loads((tmp_path / "llama" / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"] = {"rope_type": "linear", "factor": 0.5, "rope_theta": 10000.0}  # transformers warns on reading it
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    one_line_error(run_massact("track", tmp_path / "llama", tmp_path / "gpt2", "--out", tmp_path / "out"), "another architecture")


# --section takes a section, and its error names every one.
@pytest.mark.parametrize("name", ["", "15", "x"])
def test_show_refuses_a_section_that_does_not_exist(name, tmp_path, capsys):
    assert main(["show", str(tmp_path), "--section", name]) == 2
    line = _error(capsys)
    assert all(s.key in line for s in SECTIONS + EXTRAS) and "precision (12)" in line


# SIGTERM: what a batch scheduler sends before it kills a job.
def test_sigterm_stops_a_scan_with_one_line_and_it_resumes(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Summer is warm on day {i}." for i in range(400)) + "\n", encoding="utf-8")
    out = tmp_path / "r"
    common = [model_dir, "--file", corpus, *TINY, "--batch-size", "2", "--out", out]
    process = subprocess.Popen(massact_command("scan", *common, "--checkpoint-every", "1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "scan-state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err.strip().splitlines() == ["massact: terminated (SIGTERM)"], err
    done = torch.load(out / "scan-state.pt", weights_only=True)["done"]
    assert 0 < done < 400  # stopped part way, its state saved
    resumed = run_massact("scan", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    clean = run_massact("scan", *common[:-1], tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    assert (out / "report.json").read_bytes() == (tmp_path / "clean" / "report.json").read_bytes()
    shutil.rmtree(tmp_path / "clean")
