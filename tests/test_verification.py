"""Interventions on planted models: they confirm the planted cause, spare unrelated parts, and restore the model."""

import math

import pytest
import torch

import massact
from conftest import plant_mlp, tiny_model, weights_hash
from massact.analysis.evaluation.perplexity import eval_windows, perplexity
from massact.analysis.function.sinks import sink_pass
from massact.capture.edits import ablate_neurons, read_coordinate, set_weight

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
EVAL = "She poured the tea, opened the window, and watched the rain fall on the garden. " * 3


@pytest.fixture(params=["gpt2", "llama"])
def planted(request, tokenizer):
    model = tiny_model(request.param, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    return massact.wrap(model, tokenizer)


def test_verification_confirms_the_planted_neuron_and_weight(planted):
    before = weights_hash(planted.model)
    ticks: dict[str, int] = {}

    def progress(stage: str, total: int | None):
        def advance():
            ticks[stage] = ticks.get(stage, 0) + 1
        return advance

    report = massact.scan(planted, TEXTS, verify=True, eval_text=EVAL, progress=progress)
    assert weights_hash(planted.model) == before
    # The iterative search ticks once per weight it zeroes.
    assert ticks["super weights, zeroed one by one"] == len(report.causal.super_weights) >= 1

    rows = {r.name: r for r in report.causal.verification.interventions}
    baseline = rows["none (baseline)"]
    assert baseline.still_massive and baseline.perplexity == pytest.approx(report.causal.verification.baseline_perplexity)
    alone = rows[f"ablate neuron {NEURON}"]
    assert not alone.still_massive and abs(alone.value_birth) < 0.01 * abs(baseline.value_birth)
    top = rows[f"ablate top 1 neuron(s) [{NEURON}]"]
    assert top.confirms is True and top.value_last == pytest.approx(alone.value_last)
    control = next(r for r in report.causal.verification.interventions if r.name.startswith("control: ablate neuron"))
    assert control.still_massive and control.value_birth == pytest.approx(baseline.value_birth, rel=1e-3)
    weight = next(r for r in report.causal.verification.interventions if r.name.startswith("zero super weight"))
    assert weight.confirms is True
    weight_control = next(r for r in report.causal.verification.interventions if r.name.startswith("control: zero weight"))
    assert weight_control.still_massive
    zero = next(r for r in report.causal.verification.interventions if r.name.endswith(f"to zero at block {LAYER}"))
    assert zero.perplexity > 0 and math.isfinite(zero.perplexity_ratio)
    dependence = report.causal.verification.input_dependence[0]
    assert dependence.dim == DIM and dependence.first_token_massive == dependence.inputs  # BOS always carries it
    assert dependence.other_positions == 0 and dependence.carriers[0][0] == "<s>"


def test_interventions_change_the_value_only_while_active(planted):
    ids = planted.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    base = read_coordinate(planted, ids, [LAYER], 0, DIM)[LAYER]
    with ablate_neurons(planted, LAYER, [NEURON]):
        ablated = read_coordinate(planted, ids, [LAYER], 0, DIM)[LAYER]
    with ablate_neurons(planted, LAYER, [NEURON + 1]):
        unrelated = read_coordinate(planted, ids, [LAYER], 0, DIM)[LAYER]
    assert abs(ablated) < 0.01 * abs(base) and unrelated == pytest.approx(base, rel=1e-3)
    assert read_coordinate(planted, ids, [LAYER], 0, DIM)[LAYER] == base
    matrix = planted.adapter.param_name(planted.model, LAYER, planted.adapter.mlp_down)
    before = weights_hash(planted.model)
    with pytest.raises(RuntimeError), set_weight(planted, matrix, (0, 0), 123.0):
        assert planted.model.get_parameter(matrix)[0, 0].item() == 123.0
        raise RuntimeError("the weight is put back even when the body fails")
    assert weights_hash(planted.model) == before


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_matches_transformers_loss(family, tokenizer):
    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=5), tokenizer)
    windows = eval_windows(lm, TEXTS[0] + " " + TEXTS[1], window=1000)
    assert len(windows) == 1 and windows[0].shape[1] > 10
    with torch.no_grad():
        loss = lm.model(windows[0], labels=windows[0]).loss
    assert perplexity(lm, windows) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_weights_windows_by_tokens(tokenizer):
    lm = massact.wrap(tiny_model("llama", len(tokenizer), seed=6), tokenizer)
    windows = eval_windows(lm, EVAL, window=16)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            n = ids.shape[1] - 1
            nll += lm.model(ids, labels=ids).loss.item() * n
            count += n
    assert perplexity(lm, windows) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_uniform_attention_model_gives_the_uniform_share(tokenizer):
    model = tiny_model("llama", len(tokenizer), seed=7)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()  # every score is 0: softmax spreads evenly over visible keys
    lm = massact.wrap(model, tokenizer)
    implementation = model.config._attn_implementation
    inputs = [tokenizer(t, return_tensors="pt").input_ids for t in TEXTS]
    sinks = sink_pass(lm, dict(enumerate(inputs)), {0: [0], 1: [0, 3]}, epsilon=0.3)
    assert sinks.texts == 2
    for shares, uniform in zip(sinks.share.tolist(), sinks.uniform.tolist()):
        assert shares == pytest.approx(uniform, rel=1e-5)
    # The sink rate counts the (text, head) pairs above epsilon: here the texts whose uniform share exceeds 0.3.
    def uniform_share(n: int, sinks: list[int]) -> float:
        return sum(sum(s <= q for s in sinks) / (q + 1) for q in range(1, n)) / (n - 1)

    above = [uniform_share(inputs[0].shape[1], [0]) > 0.3, uniform_share(inputs[1].shape[1], [0, 3]) > 0.3]
    assert above == [False, True]
    assert sinks.rate.tolist() == pytest.approx([sum(above) / 2] * len(sinks.rate))
    assert model.config._attn_implementation == implementation  # eager only for that pass
