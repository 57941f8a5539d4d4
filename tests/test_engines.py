"""Real quantization engines (optimum-quanto, HQQ, torchao, bitsandbytes): the protect list kept in float against a
seeded control, the super weights restored as a sparse correction, and the exported configurations fed to the
libraries themselves; on a planted Llama, and on the default model against the libraries driven directly."""

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from torch import nn

import massact
from conftest import PLANTED, one_line_error, plant_mlp, run_massact, tiny_model, weights_hash
from massact.analysis.deploy import protect as protect_list
from massact.analysis.deploy.engines import (
    ENGINES,
    control_modules,
    engine,
    engine_rows,
    engine_words,
    projections,
    protected_modules,
    sparse_corrections,
)
from massact.analysis.deploy.exports import EXPORTS, export
from massact.analysis.deploy.quant import measure_quantization
from massact.analysis.evaluation.perplexity import default_eval_text, eval_windows
from massact.analysis.results import build_protect
from massact.report.files import write_report
from massact.report.schema import load_report, write_protect
from massact.settings import ScanSettings

LAYER, NEURON, DIM = PLANTED
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
DOWN = f"model.layers.{LAYER}.mlp.down_proj"


def quantized(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is the engine ``name``'s quantized module (each library's own class or tensor type)."""
    if name == "quanto":
        from optimum.quanto import QModuleMixin

        return isinstance(module, QModuleMixin)
    if name == "hqq":
        from hqq.core.quantize import HQQLinear

        return isinstance(module, HQQLinear)
    if name == "torchao":
        from torchao.utils import TorchAOBaseTensor

        return isinstance(module.weight, TorchAOBaseTensor)
    from bitsandbytes.nn import Linear4bit

    return isinstance(module, Linear4bit)


@pytest.fixture(scope="module")
def planted(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    lm = massact.wrap(model, tokenizer)
    report = massact.scan(lm, TEXTS)
    return lm, build_protect(report), report


@pytest.mark.parametrize("name", list(ENGINES))
def test_each_way_keeps_exactly_its_modules_in_float(planted, name):
    lm, protect, _ = planted
    before = weights_hash(lm.model)
    originals = projections(lm)
    assert protected_modules(lm, protect) == [DOWN]
    seen = []

    def score() -> float:  # what the model holds while each row is scored
        modules = {module: lm.model.get_submodule(module) for module in originals}
        seen.append({module: quantized(name, m) for module, m in modules.items()})
        assert all(type(m) is nn.Linear for module, m in modules.items() if not seen[-1][module])
        return 1.0

    rows = engine_rows(lm, protect, name, score, lambda: 1.0, baseline=1.0, float_value=1.0)
    assert [row.kind for row in rows] == ["all", "protected", "control", "sparse"]
    for row, state in zip(rows, seen):
        assert row.engine == name and row.settings["library"]
        assert sorted(module for module, q in state.items() if not q) == row.modules_in_float
    assert rows[1].modules_in_float == [DOWN]
    assert rows[2].modules_in_float == control_modules(lm, [DOWN])
    assert rows[0].modules_in_float == rows[3].modules_in_float == [] and rows[3].corrections == 1
    # Memory: a module kept in float costs its float bytes; the correction 12 bytes (row, col, value).
    quantized_bytes, float_bytes = rows[0].weight_bytes, rows[0].float_bytes
    assert quantized_bytes < float_bytes / 3
    down_bytes = originals[DOWN].weight.nbytes
    assert rows[1].weight_bytes > quantized_bytes + down_bytes * 0.6 and rows[3].weight_bytes == quantized_bytes + 12
    # Afterwards the model is its float self again, module for module.
    assert all(lm.model.get_submodule(module) is linear for module, linear in originals.items())
    assert weights_hash(lm.model) == before


def test_the_control_is_seeded_and_keeps_as_many_modules_of_the_same_kind(planted):
    lm, _, _ = planted
    names = projections(lm)
    kept = [DOWN, "model.layers.2.self_attn.q_proj"]
    draws = {tuple(control_modules(lm, kept, seed)) for seed in range(20)}
    assert {tuple(control_modules(lm, kept)) for _ in range(3)} == {tuple(control_modules(lm, kept, 0))}  # seeded
    assert len(draws) > 1  # ... and a draw: another seed, another choice
    for draw in draws:
        assert len(draw) == 2 and not set(draw) & set(kept) and set(draw) <= set(names)
        kinds = sorted(re.sub(r"\.\d+\.", ".N.", module) for module in draw)
        assert kinds == ["model.layers.N.mlp.down_proj", "model.layers.N.self_attn.q_proj"]


def test_the_sparse_correction_restores_the_float_output_at_the_super_weight(planted):
    lm, _, _ = planted
    the_engine = engine("hqq")  # (quanto's and bnb's absmax scales store a group's largest weight exactly)
    original = projections(lm)[DOWN]
    module = the_engine.quantize(original)
    w, w_q = original.weight.detach(), the_engine.weight(module).detach().float()
    error = float(w[DIM, NEURON] - w_q[DIM, NEURON])
    assert abs(error) > 0.01  # HQQ's optimised zero point moves even the group's largest weight (here by ~0.06)
    x = torch.randn(2, 3, original.in_features)
    with torch.no_grad():
        plain = module(x)
        with sparse_corrections({DOWN: module}, the_engine, {DOWN: original}, [(DOWN, DIM, NEURON)]) as (count, largest):
            fixed = module(x)
        assert torch.equal(module(x), plain)  # the hook is gone once the block closes
        exact = original(x)
    assert count == 1 and math.isclose(largest, abs(error) / 100.0, rel_tol=1e-6)
    # By hand: only the super weight's output coordinate moves, by the error times its input ...
    assert torch.allclose(fixed[..., DIM], plain[..., DIM] + error * x[..., NEURON], atol=1e-4)
    others = torch.arange(original.out_features) != DIM
    assert torch.equal(fixed[..., others], plain[..., others])
    # ... so there the output is the float one but for the other weights' rounding in that row.
    rest = (w[DIM] - w_q[DIM]) * x
    rest[..., NEURON] = 0
    assert torch.allclose(exact[..., DIM] - fixed[..., DIM], rest.sum(-1), atol=1e-3)


def test_engine_rows_go_through_the_sweep_its_words_and_the_schema(planted, tmp_path):
    lm, protect, report = planted
    result = measure_quantization(lm, protect, " ".join(TEXTS * 4), ScanSettings(quant_grid="none", engines=["quanto"]))
    assert result.rows == [] and [row.kind for row in result.engines] == ["all", "protected", "control", "sparse"]
    baseline = result.baseline_perplexity
    for row in result.engines:
        assert math.isclose(row.perplexity_ratio, row.perplexity / baseline, rel_tol=1e-9)
        assert math.isclose(row.kept_birth, row.value_birth / result.value_birth, rel_tol=1e-9)
    words = result.engine_words[0]
    assert words == engine_words(result.engines) and f"{result.engines[0].perplexity:,.2f}" in words
    better = result.engines[1].perplexity < result.engines[2].perplexity
    assert ("does better than the control" in words) == better and ("does no better" in words) == (not better)
    saved = dataclasses.replace(report, deploy=dataclasses.replace(report.deploy, quantization=result))
    write_report(saved, tmp_path, {"json", "txt"})
    assert load_report(tmp_path).deploy.quantization.engines == result.engines
    assert "super weights restored" in (tmp_path / "report.txt").read_text(encoding="utf-8")


def test_a_missing_or_unknown_engine_is_one_line(model_dir, tmp_path):
    one_line_error(run_massact("quant", model_dir, "--engine", "gptq", "--protect", tmp_path / "none.json"), "--engine", "gptq")


# -- exports, fed to the libraries -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protect_file(planted, tmp_path_factory):
    _, protect, _ = planted
    path = tmp_path_factory.mktemp("protect") / "protect.json"
    path.write_text(write_protect(protect), encoding="utf-8")
    return path


def exported(protect_file, engine_name: str, tmp_path, *extra) -> dict:
    """What `massact protect export` writes for ``engine_name``, read back."""
    out = tmp_path / f"{engine_name}.json"
    result = run_massact("protect", "export", "--engine", engine_name, protect_file, "--out", out, *extra)
    assert result.returncode == 0 and result.stdout.strip() == f"wrote {out}", result.stderr
    return json.loads(out.read_text(encoding="utf-8"))


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]


def test_quanto_exclude_is_taken_by_quanto(planted, protect_file, tmp_path):
    from optimum.quanto import freeze, qint4, quantize

    lm, _, _ = planted
    config = exported(protect_file, "quanto", tmp_path)
    assert config["exclude"] == config["modules"] == [DOWN]
    model = copy.deepcopy(lm.model)
    quantize(model, weights=qint4, exclude=config["exclude"])
    freeze(model)
    assert [n for n in linear_names(model) if not quantized("quanto", model.get_submodule(n))] == [DOWN]


def test_hqq_skip_modules_are_taken_by_hqq(planted, protect_file, tmp_path):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    lm, _, _ = planted
    config = exported(protect_file, "hqq", tmp_path)

    class Skipping(AutoHQQHFModel):  # the export's usage line: HQQ's own ignore list, plus skip_modules
        @classmethod
        def get_ignore_layers(cls, model):
            return AutoHQQHFModel.get_ignore_layers(model) + config["skip_modules"]

    model = copy.deepcopy(lm.model)
    Skipping.quantize_model(model, quant_config=BaseQuantizeConfig(**config["quant_config"]), compute_dtype=torch.float32, device="cpu")
    assert [n for n in linear_names(model) if not quantized("hqq", model.get_submodule(n))] == [DOWN]


def test_torchao_filter_is_taken_by_torchao(planted, protect_file, tmp_path):
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    lm, _, _ = planted
    skip = exported(protect_file, "torchao", tmp_path)["skip_modules"]
    model = copy.deepcopy(lm.model)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and ".layers." in fqn and fqn not in skip)
    assert [n for n in linear_names(model) if not quantized("torchao", model.get_submodule(n))] == [DOWN]


def test_bitsandbytes_skip_modules_are_taken_by_transformers(model_dir, protect_file, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = exported(protect_file, "bnb", tmp_path)
    assert config["llm_int8_skip_modules"] == [DOWN, "lm_head"]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=config["llm_int8_skip_modules"]))
    assert [n for n in linear_names(model) if not quantized("bnb", model.get_submodule(n))] == [DOWN]
    assert not quantized("bnb", model.lm_head)


def test_llm_compressor_ignore_matches_in_compressed_tensors(planted, protect_file, tmp_path):
    """llm-compressor matches ``ignore`` with compressed-tensors (its own library, which installs here; llm-compressor
    itself pins an older transformers)."""
    from compressed_tensors.utils.match import match_named_modules

    lm, _, _ = planted
    ignore = exported(protect_file, "llm-compressor", tmp_path)["ignore"]
    quantized_names = {name for name, _ in match_named_modules(lm.model, ["Linear"], ignore)}
    all_linears = {name for name, module in lm.model.named_modules() if isinstance(module, nn.Linear)}
    assert all_linears - quantized_names == {DOWN, "lm_head"}


def test_llama_cpp_overrides_name_the_default_gguf_tensor(tmp_path):
    """The default model's protect list against its own GGUF file: llama-quantize takes the first --tensor-type
    pattern found anywhere in a tensor's name (std::regex_search), so exactly blk.11.ffn_down.weight matches."""
    import gguf

    from massact.models.loading import default_gguf

    protect = protect_list.Protect(model="default", source=None, min_abs=100.0, min_ratio=1000.0, massive_dims=[], sink_positions=[],
                                   super_weights=[protect_list.ProtectedWeight(parameter="model.layers.11.mlp.down_proj.weight",
                                                                               row=507, col=1229, index=[507, 1229], value=1.0)])
    config = export(protect, "llama.cpp", "llama")
    tensors = [tensor.name for tensor in gguf.GGUFReader(default_gguf()).tensors]
    patterns = [override.rsplit("=", 1) for override in config["tensor_type"]]
    matched = [name for name in tensors if any(re.search(pattern, name) for pattern, _ in patterns)]
    assert matched == ["blk.11.ffn_down.weight"] and patterns[0][1] == "f16"
    assert "--tensor-type '^blk\\.11\\.ffn_down\\.weight$=f16'" in config["usage"]


def test_export_bad_input_is_one_line(protect_file, tmp_path):
    one_line_error(run_massact("protect", "export", "--engine", "gptq", protect_file), "--engine", "gptq")
    one_line_error(run_massact("protect", "export", "--engine", "quanto", tmp_path / "missing.json"), "missing.json")
    one_line_error(run_massact("protect", "export", "--engine", "llama.cpp", "--gguf-arch", "nope", protect_file), "nope")
    one_line_error(run_massact("protect", "export", "--engine", "quanto", protect_file, "--out", tmp_path / "no" / "x.json"),
                   "does not exist")
    printed = run_massact("protect", "export", "--engine", "quanto", protect_file)
    assert printed.returncode == 0 and json.loads(printed.stdout)["exclude"] == [DOWN]
    assert set(EXPORTS) == {"quanto", "hqq", "torchao", "bnb", "llm-compressor", "llama.cpp"}


# -- the default model: massact's rows against the libraries driven directly -------------------------------------


def direct_perplexity(model, windows) -> float:
    """exp(mean next-token loss), from the model's own loss (transformers' shift and cross-entropy)."""
    total = count = 0
    with torch.no_grad():
        for ids in windows:
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def test_default_model_quanto_and_hqq_rows_match_the_libraries_directly():
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from optimum.quanto import freeze, qint4, quantize

    lm = massact.load(None, device="cpu", log=lambda message: None)
    protect = build_protect(massact.scan(lm, ["The quick brown fox jumps over the lazy dog."]))
    text = default_eval_text()[:1500]
    result = measure_quantization(lm, protect, text, ScanSettings(quant_grid="none", engines=["quanto", "hqq"]))
    rows = {(row.engine, row.kind): row for row in result.engines}
    assert rows["quanto", "protected"].modules_in_float == ["model.layers.11.mlp.down_proj"]
    windows = eval_windows(lm, text)
    assert math.isclose(direct_perplexity(lm.model, windows), result.baseline_perplexity, rel_tol=1e-4)

    def quanto_model(keep):
        model = copy.deepcopy(lm.model)
        quantize(model, weights=qint4, exclude=["lm_head", *keep])
        freeze(model)
        return model

    def hqq_model(keep):
        class Skipping(AutoHQQHFModel):
            @classmethod
            def get_ignore_layers(cls, model):
                return AutoHQQHFModel.get_ignore_layers(model) + keep

        model = copy.deepcopy(lm.model)
        Skipping.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=3, group_size=64), compute_dtype=torch.float32, device="cpu")
        return model

    for name, build in (("quanto", quanto_model), ("hqq", hqq_model)):
        for kind in ("all", "protected", "control"):
            row = rows[name, kind]
            direct = direct_perplexity(build(row.modules_in_float), windows)
            assert math.isclose(row.perplexity, direct, rel_tol=2e-3), (name, kind, row.perplexity, direct)
        # The protect list matters on this model: far better than everything quantized.
        assert rows[name, "protected"].perplexity < 0.95 * rows[name, "all"].perplexity
