"""Three ways a scan meets numbers it must read with care.

- Half precision on the mixtures of experts whose router transformers keeps in float32 (DeepSeek-V2, DeepSeek-V3,
  GLM-4.5) while the experts and shared experts are bfloat16 or float16: the scan runs, names the planted expert and
  neuron, and the float64 recomputation of the block matches the block's own output within the format's rounding.
- A NaN weight in a float32 model: the warning says NaN, where it first appears and which weight holds it, and neither
  calls it an overflow nor asks for another dtype; the precision section does not call it inf.
- Hybrids whose convolution or linear-attention blocks have no softmax heads: the figures are drawn without numpy's
  warnings, and those blocks have no point (NaN) in the sink figure, not a zero.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch

import massact
from conftest import MIXERS, tiny_model
from massact.analysis.deploy.precision import headroom
from massact.analysis.detect.results import Entry, LayerStats
from massact.capture.routing import MoeBlock, model_routing, route
from massact.report import plots
from massact.report.text import to_text
from test_experts import router_inputs
from test_families import DIM, EXPERT, LAYER, NEURON, TEXTS, planted, planted_moe

FLOAT32_ROUTERS = ["deepseek_v2", "deepseek_v3", "glm4_moe"]  # transformers keeps these routers in float32
HALF = ["bfloat16", "float16"]
EVAL = " ".join(TEXTS * 6)


def _quiet(message: str) -> None:
    pass


def _eps(dtype: str) -> float:
    """The format's relative rounding step at 1: 2**-7 for bfloat16, 2**-10 for float16."""
    return torch.finfo(getattr(torch, dtype)).eps


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory, tokenizer):
    """Each family's planted mixture of experts saved as a model directory, so that loading it in half precision keeps
    the router in float32 as transformers does (casting the whole module would not)."""
    root = tmp_path_factory.mktemp("moe")
    for family in FLOAT32_ROUTERS:
        model = planted_moe(family, tokenizer)
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return root


def _hooked_block_output(lm, text: str) -> torch.Tensor:
    """The mixture-of-experts block's own output [positions, d_model] at LAYER during the model's forward on ``text``."""
    seen = {}
    moe = MoeBlock.at(lm, LAYER)
    handle = moe.block.register_forward_hook(lambda m, args, output: seen.update(out=(output[0] if isinstance(output, tuple) else output)))
    try:
        with torch.no_grad():
            lm.model(input_ids=lm.tokenizer(text, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    return seen["out"].detach()[0].double()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FLOAT32_ROUTERS)
def test_a_float32_router_beside_half_experts_scans_and_names_the_planted_expert(saved_moe, family, dtype):
    lm = massact.load(str(saved_moe / family), dtype=dtype, device="cpu", log=_quiet)
    moe = MoeBlock.at(lm, LAYER)
    # the mixture this is about: a float32 router beside experts in the half format
    assert moe.router.weight.dtype == torch.float32 and moe.experts.down_proj.dtype == getattr(torch, dtype)
    report = massact.scan(lm, TEXTS, verify=False)
    assert report.model.dtype == dtype
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    split = report.mechanism.experts[0]
    assert (split.layer, split.position, split.dim) == (LAYER, 0, DIM)
    m = split.moe
    assert m.top_expert == EXPERT and m.experts[0].expert == EXPERT and m.neurons[0].neuron == NEURON
    assert m.shared_expert is not None  # the shared experts ran in the half format beside the float32 router
    # The float64 recomputation against the block's output on the same token: the block rounds its sum to the format
    # once (half a step) and its parts' products before that; two steps bound both.
    assert m.error <= 2 * _eps(dtype), m.error
    # ... and that output is the block's own in the model's forward on the whole text, at BOS (position 0).
    hooked = float(_hooked_block_output(lm, report.findings.texts[split.text])[0, DIM])
    assert abs(m.actual - hooked) <= 2 * _eps(dtype) * abs(hooked), (m.actual, hooked)
    assert not any("miss the output" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FLOAT32_ROUTERS)
def test_the_recomputed_routing_is_the_models_own_in_half_precision(family, dtype, tokenizer, tmp_path):
    """On a padded batch of a random model loaded in the half format, at every mixture-of-experts block: the same
    experts, and weights within float32's rounding (the router computes in float32 from the half hidden states)."""
    tiny_model(family, len(tokenizer), seed=2).save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    lm = massact.load(str(tmp_path / family), dtype=dtype, device="cpu", log=_quiet)
    for layer, (moe, x) in router_inputs(lm, tokenizer).items():
        assert x.dtype == getattr(torch, dtype)  # what the router is given: the model's hidden states
        indices, weights = model_routing(moe, x)
        mine = route(moe, x)
        order = mine.indices.argsort(dim=-1)
        assert torch.equal(mine.indices.gather(1, order).cpu(), indices), (family, layer)
        assert torch.allclose(mine.weights.gather(1, order).float().cpu(), weights, rtol=1e-4, atol=1e-6), (family, layer)


def test_a_nan_weight_is_named_as_nan_at_its_block_not_as_an_overflow(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    report = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=False)
    assert report.model.dtype == "float32"
    warning = next(w for w in report.warnings if w.startswith("non-finite"))
    assert "NaN" in warning and "first at block 1," in warning and "dim 3" in warning
    assert "model.layers.1.mlp.down_proj.weight (1 entry)" in warning  # the one weight that holds it
    assert "overflow" not in warning and "bfloat16" not in warning and "float32" not in warning, warning
    summary = report.deploy.precision.summary
    assert "NaN" in summary and "from block 1 on" in summary, summary
    assert "reaches inf" not in summary and "use bfloat16" not in summary and "overflowed" not in summary, summary
    text = to_text(report)
    section = text[text.index("Precision headroom"):text.index("## Warnings")]
    assert "inf" not in section.replace("info", "") and "NaN" in section, section


def _entry(value: float, dim: int) -> Entry:
    return Entry(value=value, text=0, position=0, token="<s>", dim=dim)


def test_headroom_keeps_nan_apart_from_overflow():
    """A block whose largest entries are NaN has no largest |a| (NaN) and does not overflow; an inf overflows, and
    NaN after it are its doing. The headroom is measured on the values that are numbers."""
    finite = LayerStats(layer=0, median=1.0, ratio=10.0, top=[_entry(10.0, 5)])
    nan_block = LayerStats(layer=1, median=float("nan"), ratio=float("nan"), top=[_entry(float("nan"), 3), _entry(float("nan"), 4)])
    p = headroom([finite, nan_block])
    assert math.isnan(p.blocks[1].max_abs) and not p.blocks[1].overflows and p.overflows == []
    assert (p.largest, p.largest_layer, p.largest_dim) == (10.0, 0, 5)
    assert p.summary.startswith("the activations hold NaN (not a number) from block 1 on (first at dim 3)")
    assert "float16 holds the model's activations" in p.summary and "use bfloat16" not in p.summary

    inf_block = LayerStats(layer=1, median=1.0, ratio=float("inf"), top=[_entry(float("inf"), 20), _entry(2.0, 1)])
    after = LayerStats(layer=2, median=float("nan"), ratio=float("nan"), top=[_entry(float("nan"), 0)])
    p = headroom([finite, inf_block, after])
    assert p.blocks[1].overflows and p.overflows == [[1, 20, float("inf")]] and not p.blocks[2].overflows
    assert p.summary.startswith("this model cannot run in float16: dim 20 at block 1 reaches inf")
    assert p.summary.endswith("the activations hold NaN (not a number) from block 2 on (first at dim 0), "
                              "after the overflow to inf at block 1")


def _sink_figure_lines(report) -> dict[str, list[float]]:
    """The sink figure's lines as drawn: {label: y values per block}."""
    drawn = []
    original = plots.png_bytes
    plots.png_bytes = lambda fig: drawn.append(fig) or b""
    try:
        plots.attention_sinks(report)
    finally:
        plots.png_bytes = original
    fig = drawn[0]
    lines = {line.get_label(): [float(y) for y in line.get_ydata()] for axis in fig.axes for line in axis.get_lines()}
    plots.plt.close(fig)
    return lines


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next"])
def test_blocks_without_softmax_heads_are_left_out_of_the_figures_without_warnings(family, tokenizer):
    model = planted(family, tokenizer)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # a short evaluation text: the linear-attention reference kernels are slow on a CPU, and the sinks need no more
        report = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True, eval_text=EVAL)
        drawn = plots.figures(report)
    assert "attention_sinks.png" in drawn
    numpy_warnings = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert not numpy_warnings, numpy_warnings
    softmax = [block for block, mixer in enumerate(MIXERS[family]) if mixer == "attention"]
    medians = plots.median_over_heads(report.causal.attention.value_ratio)
    lines = _sink_figure_lines(report)
    assert [float(v) for v in medians] == pytest.approx(lines["value norm: sink / median other"], nan_ok=True)
    for block in range(len(MIXERS[family])):
        if block in softmax:  # the median of the heads' ratios
            heads = [v for v in report.causal.attention.value_ratio[block] if v == v]
            assert heads and medians[block] == pytest.approx(statistics.median(heads))
        else:  # absent, not zero: no point is drawn there
            assert math.isnan(medians[block]) and math.isnan(lines["value norm: sink / median other"][block])
            assert math.isnan(lines[next(label for label in lines if label.startswith("sink rate (>"))][block])
