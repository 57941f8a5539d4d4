"""The one settings object and the one massive test: checked once, saved in report.json, read back by verify."""

import json
import math

import pytest
import torch

from conftest import run_massact, save_planted
from massact.errors import UsageError
from massact.settings import Criterion, ScanSettings


def test_is_massive_agrees_with_the_threshold_on_numbers_and_tensors():
    criterion = Criterion(min_abs=100.0, min_ratio=1000.0)
    # below min_abs; at min_abs but under 1000x the median; at both; negative; NaN
    values = [99.0, 100.0, 2000.0, -2000.0, math.nan]
    medians = [0.01, 0.5, 2.0, 2.0, 0.01]
    expected = [False, False, True, True, False]
    assert [bool(criterion.is_massive(v, m)) for v, m in zip(values, medians)] == expected
    assert [abs(v) >= criterion.threshold(m) for v, m in zip(values, medians)] == expected
    as_tensor = criterion.is_massive(torch.tensor(values), torch.tensor(medians))
    assert as_tensor.tolist() == expected
    assert criterion.threshold(torch.tensor(medians)).tolist() == [100.0, 500.0, 2000.0, 2000.0, 100.0]


@pytest.mark.parametrize("change, message", [
    (dict(top_k=0), "--top-k must be a whole number of at least 1"),
    (dict(batch_size=2.5), "--batch-size must be a whole number"),
    (dict(min_abs=-1.0), "--min-abs must be a positive number"),
    (dict(min_ratio=math.nan), "--min-ratio must be a positive number"),
    (dict(sink_epsilon=5.0), "--sink-epsilon must be between 0 and 1"),
    (dict(max_length=1), "--max-length must be a whole number of at least 2"),
    (dict(dtype="float8"), "--dtype must be one of float32, bfloat16, float16"),
    (dict(quant_grid="huge"), "--quant-grid must be one of default, full"),
    (dict(verify="yes"), "--verify must be true or false"),
])
def test_check_names_the_option(change, message):
    with pytest.raises(UsageError, match=message):
        ScanSettings().replace(**change).check()


def test_replace_refuses_an_unknown_setting():
    with pytest.raises(TypeError, match="unknown scan setting.*top_kk"):
        ScanSettings().replace(top_kk=3)
    assert ScanSettings().replace(top_k=3).top_k == 3 and ScanSettings().top_k == 5


def test_verify_reads_the_saved_settings(tmp_path, tokenizer):
    model = save_planted(tmp_path / "model", "llama", tokenizer, 1, 7, 12)
    out = tmp_path / "report"
    scanned = run_massact("scan", model, "--text", "The committee met on Tuesday.", "--text", "Summer is warm.",
                          "--top-k", "3", "--min-abs", "50", "--top-neurons", "2", "--no-verify", "--out", out,
                          "--format", "json", "--quiet")
    assert scanned.returncode == 0, scanned.stderr
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["top_k"] == 3 and saved["settings"]["min_abs"] == 50 and saved["settings"]["verify"] is False
    verified = run_massact("verify", out, "--format", "json", "--quiet")
    assert verified.returncode == 0, verified.stderr
    again = json.loads((out / "report.json").read_text())
    assert again["settings"] == {**saved["settings"], "verify": True}
    assert [len(layer["top"]) for layer in again["findings"]["layers"]] == [3] * len(again["findings"]["layers"])
    assert again["findings"]["criterion"]["min_abs"] == 50
    attributions = again["mechanism"]["attribution"]
    assert [len(a["neurons"]) for a in attributions] == [2] * len(attributions)  # --top-neurons 2 kept
    assert again["causal"]["verification"] is not None and again["findings"]["dims"] == saved["findings"]["dims"]
