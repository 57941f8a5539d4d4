"""Quantization, precision headroom and the protect list, on hand-made tensors and planted tiny models."""

import json
import math

import numpy as np
import pytest
import torch

import massact
from conftest import plant_mlp, tiny_model, weights_hash
from massact.analysis.deploy import protect as protect_list
from massact.analysis.deploy.precision import FLOAT16_MAX, rounding_step
from massact.analysis.deploy.quant import (
    ActivationQuant,
    Setting,
    gguf_roundtrip,
    grid,
    int8_rows,
    projections,
    quantized_weights,
    rtn,
    rtn_rows,
    siblings,
    sweep,
)
from massact.analysis.deploy.results import VERSION as PROTECT_VERSION
from massact.analysis.results import build_protect
from massact.errors import UsageError
from massact.report.files import write_report
from massact.report.schema import load_protect, load_report, write_protect
from massact.report.schema import write_report as report_json

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
EVAL = "She poured the tea, opened the window, and watched the rain fall on the garden. " * 3


def reference_rtn(values: list[float], bits: int) -> list[float]:
    """Asymmetric min-max round-to-nearest written out in plain Python (round half to even, like torch.round)."""
    levels = 2**bits - 1
    low, high = min(values), max(values)
    scale = (high - low) / levels
    zero = min(max(round(-low / scale), 0), levels)
    return [(min(max(round(v / scale) + zero, 0), levels) - zero) * scale for v in values]


@pytest.fixture(scope="module")
def planted(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    lm = massact.wrap(model, tokenizer)
    return lm, massact.scan(lm, TEXTS)


def test_rtn_levels_scale_zero_point_and_clamping():
    # scale = 3 / 3 = 1, zero = round(1.5) = 2; 1.5 -> round(1.5) + 2 = 4, clamped to 3 -> (3 - 2) x 1 = 1
    assert rtn_rows(torch.tensor([[-1.5, -0.5, 0.5, 1.5]]), 2).tolist() == [[-2.0, 0.0, 0.0, 1.0]]
    assert rtn_rows(torch.tensor([[0.25, 0.25, 0.25]]), 4).tolist() == [[0.25, 0.25, 0.25]]  # a constant row is exact
    torch.manual_seed(0)
    x = torch.randn(3, 40, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [30.0]], dtype=torch.float64)
    for bits in (3, 4, 8):
        got = rtn_rows(x, bits)
        for row, expected in zip(got.tolist(), x.tolist()):
            assert row == pytest.approx(reference_rtn(expected, bits), rel=1e-5, abs=1e-6)
        assert all(len(set(row)) <= 2**bits for row in got.tolist())
        steps = (x.amax(1) - x.amin(1)) / (2**bits - 1)  # inside the range every entry moves by at most half a step
        assert bool(((got - x).abs() <= steps.unsqueeze(1) * 0.5 + 1e-4).all()) or bits == 3


def test_rtn_granularities_are_the_groups_they_say():
    torch.manual_seed(1)
    weight = torch.randn(3, 300)
    rows = rtn(weight, 4, "row")
    for r in range(3):  # groups of 128 along each row, the last one 44 wide
        for start, stop in ((0, 128), (128, 256), (256, 300)):
            assert torch.equal(rows[r, start:stop], rtn_rows(weight[r : r + 1, start:stop], 4)[0])
    blocks = rtn(weight, 4, "block", block=256).flatten()
    flat = weight.flatten()
    for start in range(0, 900, 256):
        assert torch.equal(blocks[start : start + 256], rtn_rows(flat[start : start + 256].view(1, -1), 4)[0])
    assert torch.equal(rtn(weight, 4, "tensor"), rtn_rows(weight.view(1, -1), 4).view(3, 300))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_route_round_trips_through_the_gguf_package(fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    torch.manual_seed(2)
    weight = torch.randn(4, 96)
    weight[1, 40] = 9.0  # an outlier widens only its own block of 32
    kind = GGMLQuantizationType[fmt]
    expected = dequantize(quantize(weight.numpy(), kind), kind)
    back = gguf_roundtrip(weight, fmt)
    assert np.array_equal(back.numpy(), expected)
    assert torch.allclose(gguf_roundtrip(back, fmt), back, atol=1e-3)  # its own output is (nearly) on the grid again
    assert back[1, 40].item() == pytest.approx(9.0, rel=0.02)
    bits = int(fmt[1])
    others = torch.cat([weight[:, :32], weight[:, 64:]], dim=1)
    assert (back[:, :32] - weight[:, :32]).abs().max() < 2 * others.abs().max() / 2 ** (bits - 1)


def test_gguf_blocks_run_along_the_input_dim_of_a_transposed_weight(tokenizer):
    lm = massact.wrap(tiny_model("gpt2", len(tokenizer)), tokenizer)
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: stored [in 64, out 256]
    original = lm.model.get_parameter(name).detach().clone()
    with quantized_weights(lm, lambda w: gguf_roundtrip(w, "Q4_0")):
        stored = lm.model.get_parameter(name).detach().clone()
    assert torch.equal(stored, gguf_roundtrip(original.T, "Q4_0").T)
    assert torch.equal(lm.model.get_parameter(name), original)


def test_planted_super_weight_per_tensor_4bit(planted):
    lm, report = planted
    matrix = lm.adapter.param_name(lm.model, LAYER, lm.adapter.mlp_down)
    assert protect_list.super_weight_coordinates(report.causal.super_weights, report.mechanism.attribution,
                                                 report.mechanism.experts) == [(matrix, (DIM, NEURON), 100.0)]
    original = lm.model.get_parameter(matrix).detach().clone()
    others = torch.ones_like(original, dtype=torch.bool)
    others[DIM, NEURON] = False
    four_bit = lambda w: rtn(w, 4, "tensor")
    with quantized_weights(lm, four_bit):  # the super weight sets the range: a step of ~6.7, every other weight -> 0
        plain = lm.model.get_parameter(matrix).detach().clone()
    with quantized_weights(lm, four_bit, [(matrix, (DIM, NEURON))]):  # held out: the rest keeps a step of ~0.01
        held = lm.model.get_parameter(matrix).detach().clone()
    assert (plain[others] == 0).float().mean() > 0.99 and original[others].abs().max() < 0.2
    assert held[DIM, NEURON] == 100.0 and (held[others] == 0).float().mean() < 0.3  # only those within half a step of 0
    step = (original[others].max() - original[others].min()) / 15
    assert (held[others] - original[others]).abs().max() <= step * 0.5 + 1e-6
    assert torch.equal(lm.model.get_parameter(matrix), original)

    protect = build_protect(report)
    settings = [Setting("rtn", 4, "tensor", "plain"), Setting("rtn", 4, "tensor", "held out"),
                Setting("rtn", 4, "tensor", "held out + clip")]
    result = sweep(lm, protect, EVAL, "test", settings=settings, clip_z=4.0)
    plain_row, held_row, clipped = result.rows
    assert result.dim == DIM and result.birth_layer == LAYER and result.value_birth > 1000
    # The planted neuron's gate and up weights (2.0 among ~0.02) are their matrices' maxima too, so the value holds
    # within the rounding of those rows; clipping the rest at z 4 cuts them, and the massive value goes.
    assert 0.8 < plain_row.kept_birth < 1.1 and 0.8 < held_row.kept_birth < 1.1
    assert abs(clipped.kept_birth) < 0.05


def test_a_held_out_setting_after_its_plain_one_gives_what_it_gives_alone(planted):
    """The sweep serves a "held out" setting from its plain sibling's quantized weights and quantizes again only the
    matrix holding the super weight: its row is the row of the same setting swept alone, number for number."""
    lm, report = planted
    protect = build_protect(report)
    before = weights_hash(lm.model)
    plain, held, other = Setting("rtn", 4, "tensor", "plain"), Setting("rtn", 4, "tensor", "held out"), Setting("rtn", 4, "row", "held out")
    assert siblings([plain, held, other]) == [[plain, held], [other]]
    numbers = lambda row: (row.perplexity, row.value_birth, row.value_peak)
    together = [numbers(row) for row in sweep(lm, protect, EVAL, "test", settings=[plain, held, other]).rows]
    alone = [numbers(row) for row in sweep(lm, protect, EVAL, "test", settings=[held, other]).rows]
    assert together[1:] == alone
    assert together[0][1] != together[1][1]  # the super weight sets the plain 4-bit range: held out, the value differs
    assert weights_hash(lm.model) == before


def test_activation_int8_error_split(planted):
    lm, _ = planted
    x = torch.tensor([[1000.0, 1.0, -1.0], [0.4, -0.3, 0.2], [0.2, 0.1, -0.6]])
    quant = ActivationQuant(lm, per_token=False, keep_massive=False)
    quant.keep = torch.tensor([True, False, False])
    out = quant._quantize(x)  # one scale 1000/127 = 7.87: every small entry rounds to 0
    assert out[1:].abs().max() == 0 and out[0, 0] == pytest.approx(1000.0, rel=1e-6)
    small = float((x[1:] ** 2).sum())
    first = float(((x[0] - out[0]) ** 2).sum())
    assert quant.error_total == pytest.approx(small + first, rel=1e-6)
    assert quant.error_massive == pytest.approx(first, rel=1e-6)
    kept = ActivationQuant(lm, per_token=False, keep_massive=True)
    kept.keep = quant.keep
    out = kept._quantize(x)  # the massive row stays in float, the scale comes from the rest: 0.6 / 127
    assert torch.equal(out[0], x[0]) and kept.error_massive == 0
    assert torch.allclose(out[1:], int8_rows(x[1:], torch.ones(2, dtype=torch.bool)))
    assert (out[1:] - x[1:]).abs().max() <= 0.6 / 127 / 2 + 1e-7


def test_weights_are_identical_before_and_after_every_setting(planted):
    lm, report = planted
    before = weights_hash(lm.model)
    hashes = []
    settings = grid("full")
    result = sweep(lm, build_protect(report), EVAL, "test", settings=settings, step=lambda: hashes.append(weights_hash(lm.model)))
    assert len(result.rows) == len(settings) == len(hashes) and set(hashes) == {before}
    assert all(math.isfinite(r.perplexity) and r.perplexity > 0 for r in result.rows)
    tokens = sum(r.massive_error_share is not None for r in result.rows)
    assert tokens == 4 and result.massive_tokens >= 1


def test_grid_names():
    assert len(grid("default")) < len(grid("full"))
    with pytest.raises(UsageError, match="--quant-grid"):
        grid("everything")


def test_headroom_flags_a_planted_value_above_float16(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=400.0)
    report = massact.scan(massact.wrap(model, tokenizer), TEXTS)
    p = report.deploy.precision
    value = max((m.value for m in report.findings.massive if m.dim == DIM and m.layer == LAYER), key=abs)
    assert abs(value) > FLOAT16_MAX and p.largest == pytest.approx(abs(value)) and p.largest_dim == DIM
    assert p.overflows[0] == [LAYER, DIM, value] and [o[0] for o in p.overflows] == [1, 2, 3]
    assert p.blocks[LAYER].overflows and not p.blocks[0].overflows
    assert p.summary.startswith(f"this model cannot run in float16: dim {DIM} at block {LAYER} reaches {abs(value):,.0f}")
    assert p.headroom == pytest.approx(FLOAT16_MAX / abs(value))


def test_rounding_steps_match_torch():
    for value in (24494.1, 1797.5, 3.0):
        for dtype in (torch.bfloat16, torch.float16):
            step = rounding_step(value, dtype)
            base = torch.tensor(value).to(dtype).float()
            assert torch.tensor(base.item() + step).to(dtype).float() == base + step  # the next number up
            assert torch.tensor(base.item() + 0.49 * step).to(dtype).float() == base  # nothing in between
    assert rounding_step(24494.1, torch.bfloat16) == 128 and rounding_step(24494.1, torch.float16) == 16


def test_protect_json_validates_and_loads_back(planted, tmp_path):
    lm, report = planted
    protect = build_protect(report)
    data = json.loads(write_protect(protect))
    assert data["version"] == PROTECT_VERSION and data["format"] == "massact-protect"
    weight = data["super_weights"][0]
    assert lm.model.get_parameter(weight["parameter"])[weight["row"], weight["col"]].item() == weight["value"] == 100.0
    dim = data["massive_dims"][0]
    assert dim["dim"] == DIM and dim["born_at"] == LAYER and dim["probe_position"] == 0 and dim["carriers"][0]["token"] == "<s>"
    assert data["sink_positions"][0]["position"] == 0
    path = tmp_path / "protect.json"
    path.write_text(write_protect(protect), encoding="utf-8")
    assert load_protect(path) == protect
    for broken, message in ((dict(data, version=2), "version 2"),
                            ({k: v for k, v in data.items() if k != "super_weights"}, "super_weights"),
                            (dict(data, massive_dims=[dict(dim, dim="20")]), "massive_dims[0].dim")):
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_protect(path)


def test_saved_report_reads_back_equal(planted, tmp_path):
    lm, report = planted
    write_report(report, tmp_path, {"json"})
    again = load_report(tmp_path)
    assert report_json(again) == report_json(report)
    assert json.loads((tmp_path / "protect.json").read_text(encoding="utf-8"))["super_weights"][0]["value"] == 100.0


def test_projections_are_the_block_linears_only(planted):
    lm, _ = planted
    names = [name for name, _, _ in projections(lm)]
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 blocks
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
