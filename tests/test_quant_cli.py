"""massact scan --quant and massact quant end to end on a tiny saved model, and their bad input."""

import json
from dataclasses import replace

import pytest

from conftest import run_massact, save_planted
from massact.report.schema import load_protect, load_quantization, load_report

LAYER, NEURON, DIM = 2, 11, 30
EVAL = "She poured the tea, opened the window, and watched the rain fall on the garden. The kettle sang."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_planted(tmp_path_factory.mktemp("tiny-gpt2-quant"), "gpt2", tokenizer, LAYER, NEURON, DIM)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(EVAL, encoding="utf-8")
    return path


def _rows(data: dict) -> list[dict]:
    """The sweep's rows without their times, from report.json (under deploy) or quantization.json."""
    sweep = data["deploy"]["quantization"] if "deploy" in data else data["quantization"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in sweep["rows"]]


def test_scan_quant_and_quant_on_the_saved_report_agree(model_dir, eval_file, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_massact("scan", model_dir, "--text", "Summer is warm.", "--no-verify", "--quant", "--eval-file", eval_file, "--out", first)
    assert result.returncode == 0, result.stderr
    data = json.loads((first / "report.json").read_text(encoding="utf-8"))
    q = data["deploy"]["quantization"]
    assert q["dim"] == DIM and q["birth_layer"] == LAYER and len(q["rows"]) == 20 and q["grid"] == "default"
    assert q["super_weights"] == [["transformer.h.2.mlp.c_proj.weight", [NEURON, DIM], 100.0]]  # Conv1D: stored [in, out]
    assert data["deploy"]["precision"]["largest_dim"] == DIM and data["deploy"]["precision"]["overflows"] == []
    text = (first / "report.txt").read_text(encoding="utf-8")
    assert "11. Quantization" in text and "12. Precision headroom" in text and "GGUF Q4_1" in text
    page = (first / "report.html").read_text(encoding="utf-8")
    assert "<h2>11. Quantization" in page and 'id="quantization"' in page and (first / "quantization.png").is_file()
    protect = load_protect(first / "protect.json")
    assert [(w.parameter, w.row, w.col, w.value) for w in protect.super_weights] == [
        ("transformer.h.2.mlp.c_proj.weight", NEURON, DIM, 100.0)]

    assert run_massact("scan", model_dir, "--text", "Summer is warm.", "--no-verify", "--quiet", "--out", second).returncode == 0
    assert json.loads((second / "report.json").read_text(encoding="utf-8"))["deploy"]["quantization"] is None
    result = run_massact("quant", second, "--eval-file", eval_file, "--quiet")
    assert result.returncode == 0, result.stderr
    again = json.loads((second / "report.json").read_text(encoding="utf-8"))
    assert _rows(again) == _rows(data)  # the same sweep, from the saved report, without scanning again
    assert "11. Quantization" in (second / "report.txt").read_text(encoding="utf-8")

    # verify scans again: the sweep is kept where nothing it depends on changed, measured again where something did.
    saved = again["deploy"]["quantization"]
    assert len(saved["inputs_sha256"]) == 64
    result = run_massact("verify", second)
    assert result.returncode == 0, result.stderr
    assert "kept the saved quantization sweep" in result.stderr
    verified = json.loads((second / "report.json").read_text(encoding="utf-8"))
    assert verified["causal"]["verification"] is not None and verified["deploy"]["quantization"] == saved  # its seconds too: not re-run
    other = tmp_path / "other-eval.txt"
    other.write_text(EVAL + " The garden was wet for days after.", encoding="utf-8")
    result = run_massact("verify", second, "--eval-file", other, "--quiet")
    assert result.returncode == 0, result.stderr
    measured = json.loads((second / "report.json").read_text(encoding="utf-8"))["deploy"]["quantization"]
    assert measured["inputs_sha256"] != saved["inputs_sha256"] and measured["eval_tokens"] > saved["eval_tokens"]

    result = run_massact("quant", model_dir, "--protect", first / "protect.json", "--eval-file", eval_file, "--out", tmp_path / "third",
                         "--quiet")
    assert result.returncode == 0, result.stderr
    alone = json.loads((tmp_path / "third" / "quantization.json").read_text(encoding="utf-8"))
    assert _rows(alone) == _rows(data) and (tmp_path / "third" / "quantization.txt").is_file()
    assert (alone["format"], alone["version"]) == ("massact-quantization", 1)
    # The schema reads it back as the sweep report.json holds: the same rows, timings aside.
    read_back = load_quantization(tmp_path / "third" / "quantization.json").rows
    assert [replace(r, seconds=0.0) for r in read_back] == [replace(r, seconds=0.0) for r in load_report(first).deploy.quantization.rows]


def test_bad_quant_input_is_one_line_and_exit_2(model_dir, tmp_path):
    old = tmp_path / "old-protect.json"
    old.write_text(json.dumps({"format": "massact-protect", "version": 0}), encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["scan", model_dir, "--quant", "--quant-grid", "huge"],
         "--quant-grid: invalid choice: 'huge' (choose from 'default', 'full', 'none')"),
        (["quant", model_dir, "--quant-grid", "huge"], "--quant-grid: invalid choice: 'huge' (choose from 'default', 'full', 'none')"),
        (["quant", empty], "no report.json"),
        (["quant", model_dir, "--protect", old, "--out", tmp_path / "out"], "protect list version 0"),
        (["quant", model_dir, "--block-size", "0"], "--block-size must be a whole number of at least 1"),
    ]
    for args, message in cases:
        result = run_massact(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("massact: error:") and message in lines[0], lines[0]
