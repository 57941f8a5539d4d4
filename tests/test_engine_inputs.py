"""The real quantization engines on inputs they cannot take as they are: a mixture of experts' router (Llama-4's is an
``nn.Linear`` whose forward returns two tensors), projections whose size an engine's groups do not divide, a super
weight inside fused experts (no module an engine can keep out), and bad ``--engine`` lists; with the dtype a quant run
saves and the library messages it must not print."""

import json

import pytest
import torch
from torch import nn

import massact
from conftest import PLANTED, TINY, one_line_error, run_massact, save_planted
from massact.analysis.deploy.engines import engine, projections, refused_modules
from massact.analysis.deploy.exports import export
from massact.analysis.deploy.quant import measure_quantization
from massact.analysis.results import build_protect
from massact.cli import build_parser
from massact.report.schema import load_report, write_protect
from massact.report.text import quantization_text
from massact.settings import ScanSettings
from test_families import planted_moe

TEXT = "The library opens at nine in the morning. Summer is warm. Winter is cold."  # the evaluation text: a few windows
EXPERTS = "model.layers.1.mlp.experts.down_proj"  # where planted_moe puts the super weight (qwen-style experts)


def planted(family: str, tokenizer) -> tuple:
    """A planted mixture of experts of ``family``, wrapped, and the protect list its scan finds."""
    with torch.no_grad():
        model = planted_moe(family, tokenizer)
    lm = massact.wrap(model, tokenizer)
    return lm, build_protect(massact.scan(lm, [TEXT], ScanSettings(verify=False)))


@pytest.fixture(scope="module")
def llama4(tokenizer):
    return planted("llama4", tokenizer)


@pytest.fixture(scope="module")
def qwen3_moe(tokenizer):
    return planted("qwen3_moe", tokenizer)


# -- routers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quanto", "hqq", "bnb", "torchao"])
def test_llama4_router_is_left_alone_and_the_engine_runs(llama4, name):
    lm, protect = llama4
    router = "model.layers.1.feed_forward.router"
    kept = lm.model.get_submodule(router)
    assert isinstance(kept, nn.Linear) and router not in projections(lm)  # an nn.Linear, but no block projection
    assert "model.layers.1.feed_forward.shared_expert.down_proj" in projections(lm)
    result = measure_quantization(lm, protect, TEXT, ScanSettings(quant_grid="none", engines=[name]))
    assert [row.kind for row in result.engines] == ["all"] and result.engines[0].perplexity > 1
    assert lm.model.get_submodule(router) is kept and type(kept).__name__ == "Llama4Router"


def test_a_linear_with_a_forward_of_its_own_is_refused_by_name():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    refused = refused_modules(engine("quanto"), {"plain": nn.Linear(64, 64), "scaled": Scaled(64, 64)})
    assert list(refused) == ["scaled"] and "Scaled, whose forward is its own" in refused["scaled"]


# -- shapes an engine cannot take ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_torchao_keeps_what_it_cannot_take_in_float_and_names_it(tokenizer, family):
    lm, protect = planted(family, tokenizer)
    odd = {module: linear.in_features for module, linear in projections(lm).items() if linear.in_features % 64}
    assert odd  # qwen2_moe: the shared expert's down_proj (input 96); deepseek_v3: the latent projections (32, 16)
    result = measure_quantization(lm, protect, TEXT, ScanSettings(quant_grid="none", engines=["torchao"]))
    for row in result.engines:
        assert set(row.refused) == set(odd)
        for module, size in odd.items():
            assert row.refused[module] == f"its input size {size} is not a multiple of torchao's group size 64"
    all_ = result.engines[0]
    float_bytes = sum(linear.weight.nbytes for module, linear in projections(lm).items() if module in odd)
    assert float_bytes < all_.weight_bytes < all_.float_bytes  # the refused ones are counted at their float size
    text = quantization_text(result, None)
    assert all(module in text for module in odd) and "torchao cannot take" in text
    assert all(type(linear) is nn.Linear for linear in projections(lm).values())  # the model is its float self again


# -- super weights inside fused experts ----------------------------------------------------------------------------


def test_no_protect_list_comparison_where_the_super_weight_is_in_fused_experts(qwen3_moe):
    lm, protect = qwen3_moe
    assert [w.parameter for w in protect.super_weights] == [EXPERTS]
    result = measure_quantization(lm, protect, TEXT, ScanSettings(quant_grid="none", engines=["quanto", "hqq"]))
    assert [(row.engine, row.kind) for row in result.engines] == [("quanto", "all"), ("hqq", "all")]
    assert len(result.engine_words) == 2
    for words, name in zip(result.engine_words, ("quanto", "hqq")):
        assert "matter no more" not in words and "0 modules" not in words and "random" not in words
        assert f"{name} cannot keep it out" in words and EXPERTS in words and "fused experts" in words
    text = quantization_text(result, None)
    assert "matter no more" not in text and "cannot keep it out" in text


def test_export_says_what_it_cannot_keep_out_and_names_the_experts_where_it_can(qwen3_moe, tmp_path):
    _, protect = qwen3_moe
    path = tmp_path / "protect.json"
    path.write_text(write_protect(protect), encoding="utf-8")
    out = tmp_path / "quanto.json"
    result = run_massact("protect", "export", "--engine", "quanto", path, "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 0 and result.stdout.strip() == f"wrote {out}"
    assert len(lines) == 1 and lines[0].startswith("massact: note: quanto: ") and EXPERTS in lines[0], result.stderr
    config = json.loads(out.read_text(encoding="utf-8"))
    assert config["fused_experts"] == [EXPERTS] and len(config["notes"]) == 1 and "fused experts" in config["notes"][0]
    assert config["exclude"] == ["model.layers.1.mlp.experts", "model.layers.1.mlp.experts.*"]
    # Where an engine's list matches a module with everything under it, the experts module is listed whole.
    assert export(protect, "bnb")["llm_int8_skip_modules"] == ["model.layers.1.mlp.experts", "lm_head"]
    assert export(protect, "llama.cpp")["tensor_type"] == ["^blk\\.1\\.ffn_down_exps\\.weight$=f16"]
    for name in ("hqq", "torchao"):  # exact nn.Linear names: nothing to list, said in the note
        config = export(protect, name)
        assert config["skip_modules"] == [] and "cannot keep out" in config["notes"][0]


def test_llm_compressor_ignore_covers_the_experts_module_fused_or_unfused(qwen3_moe):
    from compressed_tensors.utils.match import is_match

    _, protect = qwen3_moe
    ignore = export(protect, "llm-compressor")["ignore"]

    class Experts(nn.Module):  # a stand-in with the names compressed-tensors sees, fused and unfused
        pass

    module = Experts()
    for name in ("model.layers.1.mlp.experts", "model.layers.1.mlp.experts.2.down_proj"):
        assert is_match(name, module, ignore), name
    for name in ("model.layers.11.mlp.experts.2.down_proj", "model.layers.1.mlp.experts_gate", "model.layers.0.mlp.down_proj"):
        assert not is_match(name, module, ignore), name


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("engine-inputs")
    model = save_planted(base / "llama", "llama", tokenizer, *PLANTED)
    out = base / "report"
    result = run_massact("scan", model, *TINY, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_quant_dtype_applies_to_its_sweep_only_and_verify_keeps_the_scans(report_dir):
    result = run_massact("quant", report_dir, "--engine", "bnb", "--quant-grid", "none", "--dtype", "bfloat16", "--quiet",
                         "--format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # (no bitsandbytes kernel message either)
    report = load_report(report_dir)
    assert report.settings.dtype == report.model.dtype == "float32"
    assert list(report.settings.engines) == ["bnb"] and report.settings.quant_grid == "none"
    assert any("bfloat16" in note and "float32" in note for note in report.deploy.quantization.notes)
    assert [row.engine for row in report.deploy.quantization.engines] == ["bnb"] * 4
    result = run_massact("verify", report_dir, "--quiet", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = load_report(report_dir)
    assert report.settings.dtype == report.model.dtype == "float32"
    assert not any("bfloat16" in note for note in report.deploy.quantization.notes)  # measured again, in the report's dtype


def test_engine_lists_are_checked_before_anything_loads(report_dir, tmp_path):
    saved = (report_dir / "report.json").read_bytes()
    one_line_error(run_massact("quant", report_dir, "--engine", ""), "--engine", "at least one engine")
    one_line_error(run_massact("quant", report_dir, "--engine", " , "), "--engine", "at least one engine")
    assert (report_dir / "report.json").read_bytes() == saved  # the saved engine rows are still there
    # An unknown name is refused while the options are read: the missing model is never reached.
    one_line_error(run_massact("quant", tmp_path / "no-such-model", "--engine", "quanto,gptq"), "--engine", "'gptq'")
    assert build_parser().parse_args(["quant", "x", "--engine", "quanto, hqq,quanto"]).engines == ("quanto", "hqq")


def test_bnb_usage_error_is_one_line(tmp_path, tokenizer):
    model = save_planted(tmp_path / "llama", "llama", tokenizer, *PLANTED)
    out = tmp_path / "report"
    result = run_massact("scan", model, *TINY, "--min-abs", "1e9", "--out", out)  # nothing is massive at that bound
    assert result.returncode == 0, result.stderr
    one_line_error(run_massact("quant", out, "--engine", "bnb", "--quant-grid", "none"), "nothing to measure")
