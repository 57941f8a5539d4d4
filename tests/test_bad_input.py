"""Bad input: each ends in one line on stderr and exit code 2, before any slow work where it can be known then."""

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import massact
from conftest import PLANTED, TINY, one_line_error, run_massact, save_planted
from massact.errors import UsageError
from massact.models.loading import load
from massact.texts import MAX_TEXT_CHARS, Corpus

LAYER, NEURON, DIM = PLANTED


# Where the report cannot be written


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


# Damaged weights and devices


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


# Thresholds


@pytest.mark.parametrize("option,value", [("--min-ratio", "-5"), ("--min-abs", "0"), ("--min-abs", "nan")])
def test_thresholds_must_be_positive(option, value, model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, option, value, "--out", tmp_path / "r"), f"{option} must be a positive number")


# A huge line


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
        list(Corpus(texts=("Short.", "x" * (MAX_TEXT_CHARS + 1))))


# Smaller ones


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


# Every numeric option, the Python API, odd models, a report's model replaced


def run_main(capsys, *args) -> tuple[int, str]:
    """The command line in this process (no interpreter start): exit code and stderr."""
    from massact.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


NUMERIC = {"scan": ["--top-k", "--min-abs", "--min-ratio", "--top-neurons", "--chain-depth", "--super-weight-steps", "--max-texts",
                    "--max-length", "--checkpoint-every", "--batch-size", "--sink-epsilon", "--clip-z", "--block-size"],
           "quant": ["--clip-z", "--block-size"]}
HUGE = "100000000000000000000000000000"
# In range (a threshold nothing reaches, no clipping): the run goes on to the model, here one that does not exist.
ACCEPTED = {(option, value) for option in ("--min-abs", "--min-ratio", "--clip-z") for value in ("1e30", HUGE)}


@pytest.mark.parametrize("command,option", [(c, o) for c, options in NUMERIC.items() for o in options])
def test_every_numeric_option_refuses_zero_negative_huge_nan_and_words(command, option, tmp_path, capsys):
    for value in ("0", "-1", "1e30", HUGE, "nan", "inf", "abc"):
        code, err = run_main(capsys, command, tmp_path / "no-model", option, value, "--out", tmp_path / "out")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("massact: error:"), (option, value, err)
        expected = "no-model: no such file or directory" if (option, value) in ACCEPTED else option
        assert expected in lines[0], (option, value, lines[0])


def test_the_api_checks_its_arguments(tokenizer):
    from torch import nn

    from conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    for texts, message in (("Hello", "texts must be a list of strings"), ([1, 2, 3], r"texts\[0\] must be a string, not int"),
                           ([None], r"texts\[0\] must be a string, not NoneType"), ([b"Hello"], r"texts\[0\] must be a string, not bytes"),
                           (42, "texts must be a list of strings")):
        with pytest.raises(TypeError, match=message):
            massact.scan(model, texts, tokenizer=tokenizer)
    for bad_model in (123, nn.Linear(3, 3)):
        with pytest.raises(TypeError, match="model must be a model name or path, a LoadedModel or a transformers model"):
            massact.scan(bad_model, ["Hello"], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer"):
        massact.scan(model, ["Hello"], tokenizer="x")
    for option, value in (("top_neurons", 0), ("top_k", -1), ("batch_size", 0), ("chain_depth", -1), ("sink_epsilon", 5),
                          ("min_abs", -1), ("top_k", 10**30)):
        with pytest.raises(ValueError, match="--" + option.replace("_", "-")):
            massact.scan(model, ["Hello"], tokenizer=tokenizer, **{option: value})


def test_unused_weights_are_refused_like_missing_ones(model_dir, tmp_path):
    """A config that says 1 block over weights of 4 would scan block 0 alone and miss the dim planted in block 1."""
    import json as _json

    shutil.copytree(model_dir, tmp_path / "short")
    config = _json.loads((tmp_path / "short" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "short" / "config.json").write_text(_json.dumps(dict(config, num_hidden_layers=1)), encoding="utf-8")
    with pytest.raises(UsageError, match=r"tensor\(s\) of the weights have no place in the model its config describes, first "
                                         r"model\.layers\.1\."):
        load(str(tmp_path / "short"), device="cpu", log=lambda message: None)


def test_a_relative_model_path_is_saved_absolute(model_dir, tmp_path, capsys, monkeypatch):
    """A report made with a relative model path is verified and quantized from any directory."""
    shutil.copytree(model_dir, tmp_path / "work" / "model")
    monkeypatch.chdir(tmp_path / "work")
    code, err = run_main(capsys, "scan", "model", "--text", "Summer is warm.", *TINY, "--out", tmp_path / "report")
    assert code == 0, err
    report = (tmp_path / "report" / "report.json").read_text(encoding="utf-8")
    assert f'"source": "{tmp_path / "work" / "model"}"' in report
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "verify", tmp_path / "report", "--format", "json", "--quiet")
    assert code == 0, err


def test_compare_refuses_to_write_over_a_report(model_dir, tmp_path, capsys):
    """compare A B --out A once replaced A's report with the comparison: data lost."""
    out = tmp_path / "a"
    assert run_main(capsys, "scan", model_dir, "--text", "Summer is warm.", *TINY, "--out", out)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    code, err = run_main(capsys, "compare", out, out, "--out", out)
    assert code == 2
    assert err.strip() == f"massact: error: --out {out} holds a report (report.json); write the comparison to another directory"
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("protect", [False, True])
def test_quant_checks_out_before_the_model_loads(protect, tmp_path, capsys):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    extra = ["--protect", tmp_path / "p.json"] if protect else []
    for out in (tmp_path / "file" / "sub", Path("/proc/massact-test")):
        code, err = run_main(capsys, "quant", tmp_path / "no-model", *extra, "--out", out)
        assert code == 2 and "cannot write the report to" in err and len(err.strip().splitlines()) == 1, err


def test_a_report_whose_model_was_replaced_is_refused(model_dir, tokenizer, tmp_path, capsys):
    """The report's source now holds another model of the same shapes: its weights (and super weights) are not the
    saved ones."""
    from conftest import plant_mlp, tiny_model

    shutil.copytree(model_dir, tmp_path / "model")
    assert run_main(capsys, "scan", tmp_path / "model", "--text", "Summer is warm.", *TINY, "--out", tmp_path / "r")[0] == 0
    other = tiny_model("llama", len(tokenizer), seed=1)
    plant_mlp(other, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=90.0)
    other.save_pretrained(tmp_path / "model")
    code, err = run_main(capsys, "quant", tmp_path / "r", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "r/report.json was made from other weights than the model loaded now" in err
    # A protect list of another model, the same check.
    code, err = run_main(capsys, "quant", tmp_path / "model", "--protect", tmp_path / "r" / "protect.json", "--quiet",
                         "--out", tmp_path / "q")
    assert code == 2 and "is this the model the list was made for?" in err and len(err.strip().splitlines()) == 1, err
