"""Planted ground truth: the scan must name exactly the planted block, dim, position, writer, neuron and weight."""

import pytest
import torch

import massact
from conftest import plant_attention, plant_mlp, tiny_model
from massact.report.schema import write_report

LAYER, NEURON, DIM, HEAD = 1, 37, 20, 2
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_planted_mlp_neuron_is_found(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)

    assert [d.dim for d in report.findings.dims] == [DIM]
    dim = report.findings.dims[0]
    assert dim.born_at == LAYER
    assert dim.persists == list(range(LAYER, model.config.num_hidden_layers))
    assert dim.removed_at == []
    assert {(m.position, m.token) for m in report.findings.massive} == {(0, "<s>")}

    birth = report.mechanism.origin[0]
    assert (birth.role, birth.layer, birth.position, birth.writer) == ("birth", LAYER, 0, "mlp")

    attribution = report.mechanism.attribution[0]
    assert attribution.neurons[0].neuron == NEURON
    assert attribution.neurons[0].share > 0.99
    assert attribution.neurons_for_90pct == 1
    assert attribution.error < 1e-3
    weight = attribution.super_weight
    stored = model.get_parameter(weight.matrix)
    assert stored[weight.row, weight.col].item() == pytest.approx(weight.value)
    # GPT-2's Conv1D stores the down projection as [d_mlp, d_model]; Linear as [d_model, d_mlp].
    assert (weight.row, weight.col) == ((NEURON, DIM) if family == "gpt2" else (DIM, NEURON))
    assert weight.rank == 1

    anatomy = report.mechanism.anatomy[0]
    names = [c.name for c in anatomy.checkpoints]
    assert names == (["mlp_in", "mlp_up", "mlp_act", "mlp_out"] if family == "gpt2"
                     else ["mlp_in", "mlp_gate", "mlp_up", "mlp_act", "mlp_out"])
    assert anatomy.checkpoints[-1].argmax == DIM
    assert any(c.argmax == NEURON for c in anatomy.checkpoints if c.name == "mlp_act")
    assert anatomy.activation_impact.top[0].neuron == NEURON
    assert f"Dim {DIM} is born in block {LAYER}" in report.conclusion[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_planted_values_match_hf_hidden_states(family, tokenizer):
    """The residual numbers in the origin table equal transformers' own hidden_states (a second computation)."""
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    birth = report.mechanism.origin[0]
    ids = tokenizer(TEXTS[birth.text], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert birth.resid_in == pytest.approx(hidden[LAYER][0, 0, DIM].item(), rel=1e-5)
    assert birth.resid_out == pytest.approx(hidden[LAYER + 1][0, 0, DIM].item(), rel=1e-5)
    assert birth.resid_in + birth.attn + birth.mlp == pytest.approx(birth.resid_out, rel=1e-5)
    # The token view's numbers are the same hidden states, at every block and token (3 significant digits).
    view = report.mechanism.token_values
    assert view.dims == [DIM] and birth.text in view.texts
    values = view.values[view.texts.index(birth.text)][0]
    assert len(values[0]) == ids.shape[1]
    for layer in range(len(hidden) - 2):  # HF applies the final norm to the last hidden state
        for position in range(ids.shape[1]):
            assert values[layer][position] == pytest.approx(hidden[layer + 1][0, position, DIM].item(), rel=5e-3, abs=1e-6)
    top = report.findings.layers[LAYER].top[0]
    assert (top.dim, top.position) == (DIM, 0)
    largest = 0.0
    for text in TEXTS:
        with torch.no_grad():
            states = model(tokenizer(text, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states
        largest = max(largest, states[LAYER + 1].abs().max().item())
    assert abs(top.value) == pytest.approx(largest, rel=1e-5)  # the batched scan against one text at a time: the sums' order


def test_unplanted_neuron_model_has_no_massive_activation(tokenizer):
    report = massact.scan(tiny_model("llama", len(tokenizer)), TEXTS, tokenizer=tokenizer)
    assert report.findings.massive == [] and report.findings.dims == [] and report.mechanism.origin == []
    assert report.conclusion[0].startswith("No massive activations")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_planted_attention_head_is_named_writer(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    plant_attention(model, tokenizer.bos_token_id, LAYER, HEAD, DIM)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    birth = next(o for o in report.mechanism.origin if o.dim == DIM and o.role == "birth")
    assert (birth.layer, birth.position, birth.writer) == (LAYER, 0, "attn")
    assert birth.heads[0].head == HEAD
    assert birth.heads[0].share > 0.99
    assert not any(a.dim == DIM and a.role == "birth" for a in report.mechanism.attribution)
    assert sum(h.contribution for h in birth.heads) == pytest.approx(birth.attn, rel=1e-4)


def test_thresholds_are_options(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    value = massact.scan(model, TEXTS, tokenizer=tokenizer).findings.dims[0].max_value
    stricter = massact.scan(model, TEXTS, tokenizer=tokenizer, min_abs=abs(value) * 2)
    assert stricter.findings.massive == []


def test_report_json_has_the_documented_keys(tokenizer):
    import json

    model = tiny_model("gpt2", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    data = json.loads(write_report(massact.scan(model, TEXTS, tokenizer=tokenizer)))
    assert {"model", "corpus", "settings", "findings", "mechanism", "trigger", "causal", "deploy", "conclusion"} <= set(data)
    assert {"texts", "tokens", "criterion", "layers", "massive", "dims"} == set(data["findings"])
    assert {"lifelines", "origin", "anatomy", "attribution", "experts", "super_experts"} <= set(data["mechanism"])
    assert {"name", "architecture", "n_layers", "d_model", "d_mlp", "dtype"} <= set(data["model"])
    assert {"layer", "median", "top"} <= set(data["findings"]["layers"][0])
    assert {"value", "position", "token", "dim"} <= set(data["findings"]["layers"][0]["top"][0])
    assert {"layer", "position", "token", "dim", "value", "ratio"} <= set(data["findings"]["massive"][0])
    assert {"dim", "born_at", "persists", "removed_at"} <= set(data["findings"]["dims"][0])
    assert {"dim", "position", "layer", "role", "writer", "resid_in", "attn", "mlp", "resid_out"} <= set(data["mechanism"]["origin"][0])
    anatomy = data["mechanism"]["anatomy"][0]
    assert {"layer", "position", "dim", "checkpoints", "explosion_point", "activation_impact"} <= set(anatomy)
    assert {"name", "size", "max", "argmax", "median", "ratio", "change"} <= set(anatomy["checkpoints"][0])
    attribution = data["mechanism"]["attribution"][0]
    assert {"layer", "position", "dim", "output", "bias", "neurons", "super_weight"} <= set(attribution)
    assert {"neuron", "activation", "weight", "contribution", "share"} <= set(attribution["neurons"][0])
    assert {"matrix", "row", "col", "value", "rank"} <= set(attribution["super_weight"])
    assert data["model"]["n_layers"] == 4 and data["model"]["d_mlp"] == 256
