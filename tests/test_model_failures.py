"""A model whose own code fails, and configs that transformers refuses: one line and exit 2 from every command that
runs the model, naming the block and the module, and nothing written before is lost.

The configs are the ones users meet: more experts per token than experts (or none given, or -1) in every mixture of
experts, MLA attention with grouped key-value heads, DeepSeek-V3 groups that do not divide the experts, a Llama-4
chunk size of 0, an LFM2 layer of an unknown kind; fields of the wrong type, a layer list of the wrong length, a dtype
torch does not have. A planted module that raises on a padded batch stands for any other failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers.models.llama import modeling_llama

from conftest import MOE_FAMILIES, PLANTED, TINY, one_line_error, plant_mlp, run_massact, tiny_model
from massact.cli import main
from massact.models.failures import ModelCodeError
from massact.track.monitor import Monitor
from test_families import planted_moe

_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # what each family calls its expert count
_TOP_K = ("top_k_experts", "num_experts_per_tok", "num_experts_per_token")  # and its experts per token, in config.json


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _edited(source: Path, target: Path, edit) -> Path:
    """A copy of the model directory ``source`` whose config.json ``edit`` changed (the language part's config)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    edit(config.get("text_config") or config)
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def _in_process(capsys, *args) -> str:
    """Run the command in this interpreter; it must fail with exit 2 and one line on stderr, which is returned."""
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("massact: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe")
    with torch.no_grad():
        return {family: _save(planted_moe(family, tokenizer), tokenizer, root / family) for family in MOE_FAMILIES}


def _top_k(value):
    def edit(config):
        key = next((key for key in _TOP_K if key in config), _TOP_K[1])
        if value is None:
            config.pop(key, None)  # the config class's own default: more than the tiny model's experts
        else:
            config[key] = value
    return edit


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_more_experts_per_token_than_experts_is_one_line_in_every_mixture_of_experts(family, moe_dirs, tmp_path, capsys):
    config = json.loads((moe_dirs[family] / "config.json").read_text(encoding="utf-8"))
    experts = next((config.get("text_config") or config)[key] for key in _EXPERTS if key in (config.get("text_config") or config))
    bad = _edited(moe_dirs[family], tmp_path / "bad", _top_k(experts + 4))
    line = _in_process(capsys, "scan", bad, *TINY, "--out", tmp_path / "out")
    assert "forward pass failed" in line or "model config" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [None, -1])
def test_a_missing_or_negative_experts_per_token_is_one_line(value, moe_dirs, tmp_path, capsys):
    bad = _edited(moe_dirs["qwen3_moe"], tmp_path / "bad", _top_k(value))
    line = _in_process(capsys, "scan", bad, *TINY, "--out", tmp_path / "out")
    assert "the model's own forward pass failed at block 1 (transformers' Qwen3MoeTopKRouter)" in line, line


def test_mla_with_grouped_kv_heads_is_one_line_naming_the_block_and_module_from_scan_and_profile(moe_dirs, tmp_path):
    """The headline case, as a user runs it: MLA attention has no grouped key-value heads, so transformers builds the
    model and its attention fails on the first batch."""
    bad = _edited(moe_dirs["deepseek_v3"], tmp_path / "bad", lambda config: config.update(num_key_value_heads=2))
    for command in (["scan", bad, "--verify", "--quiet", "--out", tmp_path / "scan"],
                    ["profile", bad, "--quiet", "--out", tmp_path / "profile"]):
        line = one_line_error(run_massact(*command))
        assert line.startswith("massact: error: the model's own forward pass failed at block 0 (transformers' DeepseekV3Attention): "
                               "RuntimeError: The size of tensor a"), line
    assert not (tmp_path / "scan").exists() and not (tmp_path / "profile").exists()


@pytest.mark.parametrize(("key", "value", "fragment"), [("n_group", 3, "is invalid for input"), ("topk_group", 5, "out of range")])
def test_deepseek_v3_expert_groups_it_cannot_run_are_one_line(key, value, fragment, moe_dirs, tmp_path, capsys):
    bad = _edited(moe_dirs["deepseek_v3"], tmp_path / "bad", lambda config: config.update({key: value}))
    line = _in_process(capsys, "scan", bad, *TINY, "--out", tmp_path / "out")
    assert "forward pass failed at block 1 (transformers' DeepseekV3TopkRouter)" in line and fragment in line, line


def test_a_llama4_chunk_size_of_zero_and_an_unknown_lfm2_layer_are_one_line(moe_dirs, tokenizer, tmp_path, capsys):
    chunk = _edited(moe_dirs["llama4"], tmp_path / "chunk", lambda config: config.update(attention_chunk_size=0))
    assert "ZeroDivisionError" in _in_process(capsys, "scan", chunk, *TINY, "--out", tmp_path / "a")
    lfm2 = _save(tiny_model("lfm2", len(tokenizer)), tokenizer, tmp_path / "lfm2")
    kinds = json.loads((lfm2 / "config.json").read_text(encoding="utf-8"))["layer_types"]
    attention = kinds.index("full_attention")
    unknown = _edited(lfm2, tmp_path / "unknown", lambda config: config["layer_types"].__setitem__(attention, "mamba"))
    line = _in_process(capsys, "scan", unknown, *TINY, "--out", tmp_path / "b")
    assert "forward pass failed" in line or "cannot load" in line, line


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda config: config.update(hidden_size="64"), "'hidden_size'"),
    (lambda config: config.update(rms_norm_eps=None), "'rms_norm_eps'"),
    (lambda config: config.update(dtype="float8"), "float8"),
])
def test_config_values_of_the_wrong_kind_are_one_line_from_scan_and_track(edit, fragment, model_dir, tmp_path, capsys):
    bad = _edited(model_dir, tmp_path / "bad", edit)
    line = _in_process(capsys, "scan", bad, *TINY, "--out", tmp_path / "scan")
    assert "cannot read the model config" in line and fragment in line, line
    series = tmp_path / "run"
    shutil.copytree(bad, series / "checkpoint-100")
    line = _in_process(capsys, "track", series, "--quiet", "--out", tmp_path / "track")
    assert "cannot read the model config" in line and fragment in line, line


def test_a_layer_list_of_the_wrong_length_is_one_line(tokenizer, tmp_path, capsys):
    lfm2 = _save(tiny_model("lfm2", len(tokenizer)), tokenizer, tmp_path / "lfm2")
    short = _edited(lfm2, tmp_path / "short", lambda config: config.update(layer_types=config["layer_types"][:1]))
    assert "layer_types" in _in_process(capsys, "scan", short, *TINY, "--out", tmp_path / "out")


@pytest.fixture()
def planted_failure(monkeypatch):
    """transformers' LlamaMLP made to raise on a batch of more than one text (a padded batch, with the default texts),
    or on every call once ``always`` is set: a model whose own code fails, as code in a model's library can."""
    state = {"always": False}
    forward = modeling_llama.LlamaMLP.forward

    def failing(self, x):
        if state["always"] or x.shape[0] > 1:
            raise RuntimeError("this MLP takes one text at a time")
        return forward(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", failing)
    return state


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_every_command_that_runs_a_failing_model_says_one_line_and_keeps_what_was_written(model_dir, tokenizer, tmp_path, capsys,
                                                                                          planted_failure):
    expected = "the model's own forward pass failed at block 0 (transformers' LlamaMLP): RuntimeError: this MLP takes one text"
    assert expected in _in_process(capsys, "scan", model_dir, "--verify", "--quiet", "--out", tmp_path / "new")
    assert expected in _in_process(capsys, "profile", model_dir, "--quiet", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # A report saved while the model ran one text at a time; then the model fails on every call.
    saved = tmp_path / "saved"
    assert main(["scan", str(model_dir), "--text", "Summer is warm.", *TINY, "--out", str(saved)]) == 0
    capsys.readouterr()
    before = _files(saved)
    planted_failure["always"] = True
    for command in (["verify", saved, "--quiet"], ["quant", saved, "--quant-grid", "default", "--quiet"], ["profile", saved, "--quiet"]):
        assert expected in _in_process(capsys, *command)
        assert _files(saved) == before, command
    series = tmp_path / "run"
    for step in (100, 200):
        shutil.copytree(model_dir, series / f"checkpoint-{step}")
    assert expected in _in_process(capsys, "track", series, "--quiet", "--out", tmp_path / "track")


def test_the_monitor_raises_one_model_code_error(tokenizer, planted_failure):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, *PLANTED)
    model.train()  # in the middle of training
    planted_failure["always"] = True
    with pytest.raises(ModelCodeError, match=r"failed at block 0 \(transformers' LlamaMLP\)") as raised:
        Monitor(tokenizer, batch_size=2).measure(model, 0)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the model's own error, kept for whoever debugs it
    assert all(module.training for module in model.modules())  # put back in training mode, failure or not
