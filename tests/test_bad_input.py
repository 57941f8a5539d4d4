"""Bad input: each ends in one line on stderr and exit code 2, before any slow work where it can be known then."""

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import massact
from massact.errors import UsageError
from massact.models.loading import load
from massact.texts import MAX_TEXT_CHARS, Corpus

from conftest import one_line_error, run_massact, save_planted

LAYER, NEURON, DIM = 1, 37, 20
TINY = ["--no-verify", "--format", "json", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_planted(tmp_path_factory.mktemp("planted") / "llama", "llama", tokenizer, LAYER, NEURON, DIM)


# 4. Where the report cannot be written


@pytest.mark.parametrize("where", ["under a file", "a file", "under /proc"])
def test_an_unwritable_out_fails_before_the_model_loads(where, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    out = {"under a file": tmp_path / "file" / "report", "a file": tmp_path / "file", "under /proc": Path("/proc/massact-test/r")}[where]
    # The model does not exist: the error about --out must come first, before anything is loaded.
    result = run_massact("scan", tmp_path / "no-such-model", "--text", "Summer is warm.", "--out", out)
    one_line_error(result, "cannot write the report to")
    result = run_massact("compare", tmp_path / "no-report", "--out", out)
    one_line_error(result, "cannot write the report to")


def test_a_read_only_out(model_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    one_line_error(run_massact("scan", model_dir, "--text", "Summer is warm.", "--out", locked / "r"), "Permission denied")


# 5. Damaged weights and devices


def _damage(model_dir: Path, target: Path, how: str) -> Path:
    shutil.copytree(model_dir, target)
    weights = target / "model.safetensors"
    if how in ("wrong shape", "missing tensor"):
        tensors = load_file(weights)
        key = f"model.layers.{LAYER}.mlp.down_proj.weight"
        if how == "wrong shape":
            tensors[key] = torch.zeros(3, 3)
        else:
            del tensors[key]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "garbage":
        weights.write_bytes(os.urandom(2048))
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


@pytest.mark.parametrize("how,message", [("wrong shape", "has shape [3, 3] in the weights, the config needs [64, 256]"),
                                         ("missing tensor", "missing from the weights, first model.layers.1.mlp.down_proj.weight"),
                                         ("garbage", "cannot load"), ("truncated", "cannot load")])
def test_damaged_safetensors_are_one_line(how, message, model_dir, tmp_path):
    damaged = _damage(model_dir, tmp_path / "damaged", how)
    one_line_error(run_massact("scan", damaged, "--text", "Summer is warm.", *TINY, "--out", tmp_path / "r"), message)


def test_an_unknown_device_is_one_line(model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, "--device", "foo", "--out", tmp_path / "r"), "device 'foo' is not one of")


# 6. Thresholds


@pytest.mark.parametrize("option,value", [("--min-ratio", "-5"), ("--min-abs", "0"), ("--min-abs", "nan")])
def test_thresholds_must_be_positive(option, value, model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, option, value, "--out", tmp_path / "r"), f"{option} must be a positive number")


# 8. A huge line


def test_a_50_mb_line_is_refused_with_bounded_memory(model_dir, tmp_path):
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:
        for _ in range(50):
            handle.write(b"winter " * ((1 << 20) // 7 + 1))  # 50 MB, no newline
    tracemalloc.start()
    with pytest.raises(UsageError, match=f"line 1 of {huge} is longer than {MAX_TEXT_CHARS:,} characters"):
        Corpus(file=str(huge)).check()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * MAX_TEXT_CHARS, peak  # what one bounded read holds, not the 50 MB line
    one_line_error(run_massact("scan", model_dir, "--file", huge, "--out", tmp_path / "r"), "line 1 of", "split it")
    # Lines of a paragraph are bounded together.
    paragraph = tmp_path / "paragraph.txt"
    paragraph.write_text("Intro.\n\n" + ("word " * 100_000 + "\n") * 3 + "\nEnd.\n", encoding="utf-8")
    with pytest.raises(UsageError, match="a paragraph of"):
        list(Corpus(file=str(paragraph)))
    with pytest.raises(UsageError, match="text 2 is longer than"):
        list(Corpus(("Short.", "x" * (MAX_TEXT_CHARS + 1))))


# 9. Smaller ones


def test_a_one_token_eval_text_is_refused_before_the_scan(tmp_path):
    from tokenizers import processors

    from conftest import make_tokenizer

    no_bos = make_tokenizer()  # like SmolLM2's, it adds no BOS: "a" is one token
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    model_dir = save_planted(tmp_path / "model", "llama", no_bos, LAYER, NEURON, DIM)
    stages = []
    lm = load(str(model_dir), device="cpu", log=lambda message: None)
    with pytest.raises(UsageError, match="fewer than 2 tokens"):
        massact.scan(lm, ["Summer is warm."], verify=True, eval_text="a", progress=lambda stage, total: stages.append(stage))
    assert stages == []  # no forward pass was started
    one_token = tmp_path / "one.txt"
    one_token.write_text("a\n", encoding="utf-8")
    one_line_error(run_massact("scan", model_dir, "--text", "Summer is warm.", "--verify", "--eval-file", one_token,
                               "--quiet", "--out", tmp_path / "r"), "fewer than 2 tokens")


def test_a_directory_as_file_says_so(model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, "--file", tmp_path, "--out", tmp_path / "r"), "is a directory, not a file of texts")


def test_the_gguf_bar_follows_the_progress_bar_switch(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    from massact.models.loading import gguf_bar_follows_switch

    hf_logging.disable_progress_bar()
    try:
        with gguf_bar_follows_switch():
            list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert capfd.readouterr().err == ""
    finally:
        hf_logging.enable_progress_bar()
    with gguf_bar_follows_switch():
        list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" in capfd.readouterr().err  # the switch on: the bar is drawn
