"""Adapters inferred from a model's own modules and checked on a probe batch: on every hand-written family the
inferred tree must give the hand-written sites and layout, a block whose pieces do not add up must be refused with the
equation that failed, and a model type no adapter is written for must load by inference and have its planted neuron
found."""

import json
import re

import pytest
import torch

import massact
from conftest import D_MODEL, FAMILIES, MOE_FAMILIES, TRIGGER, plant_mlp, tiny_model
from massact.errors import UsageError
from massact.models import wrap
from massact.models.adapters import claimed
from massact.models.inference import check, infer_and_check, probe_inputs
from massact.report.schema import read_report, write_report
from massact.report.text import to_text

# What inference refuses among the hand-written families, and why (the refusal's end).
MAPS = "inference cannot map its blocks: "
REFUSED = {
    # Post-LN: the residual sum is normed at the end of the block, so the stream the MLP's output lands in is no sum.
    "opt-postln": "its inferred adapter does not hold: resid_out = resid_mid + mlp_out at block 0",
    # The MLP's projections sit in two modules (intermediate, output), the second of which also adds and norms.
    **{family: MAPS + "block 0 has a token mixer but no MLP" for family in ("bert", "roberta")},
    # Hybrids: convolutions or linear attention beside softmax attention.
    **{family: MAPS + "2 of its 4 blocks return attention probabilities (a hybrid, whose blocks differ)"
       for family in ("lfm2", "granitemoehybrid", "jamba_moe", "kimi_linear_moe")},
    **{family: MAPS + "1 of its 4 blocks return attention probabilities (a hybrid, whose blocks differ)"
       for family in ("qwen3_next", "qwen3_5", "qwen3_next_moe", "bamba", "olmo_hybrid", "lfm3")},
    # Falcon-H1: a Mamba-2 scan and an attention side by side, their outputs summed into one branch.
    "falcon_h1": MAPS + "block 0 has 2 token mixer(s) and 1 position-wise MLP module(s) among its children (one of each expected)",
    # Nemotron-H: a block is one sublayer, its mixer alone or its MLP alone.
    **{family: MAPS + "block 0 has a token mixer but no MLP" for family in ("nemotron_h", "nemotron_h_moe", "nemotron_h_latent")},
    # Mixtures of experts: routed experts in 3-D weights, or dense blocks first and experts after.
    **{family: MAPS + "its blocks hold 3-D expert weights" for family in ("mixtral", "qwen2_moe", "olmoe", "gpt_oss", "qwen3_5_moe",
                                                                           "minimax_m2", "jamba", "kimi_linear",
                                                                           "granitemoehybrid_moe", "gemma4_moe")},
    **{family: MAPS + "a later block differs from block 0" for family in ("qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "llama4",
                                                                           "deepseek_v32", "glm_moe_dsa", "ernie4_5_moe", "exaone_moe",
                                                                           "cohere2_moe", "afmoe", "mimo_v2_flash", "laguna")},
    # Granite scales each branch before it lands (residual_multiplier): the sum of the raw branches does not hold.
    "granite": "its inferred adapter does not hold: resid_mid = resid_in + attn_out at block 0",
    # Gemma-4's per-layer input writes the stream beside attention and the MLP: a branch no inferred piece holds.
    "gemma4": "its inferred adapter does not hold: resid_out = resid_mid + mlp_out at block 0",
}
# Sites the inferred adapter reads elsewhere than the hand-written one, both right: Falcon adds the attention output
# into the MLP's output tensor in place after the MLP returns, so the MLP module's output (read at once) is mlp_out, as
# the down projection's output is.
ELSEWHERE = {"falcon": {"mlp_out": ("mlp", "out")}, "falcon-seq": {"mlp_out": ("mlp", "out")}}
LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_the_inferred_adapter_is_the_hand_written_one(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    hand = wrap(model, tokenizer).adapter
    if family in REFUSED:
        with pytest.raises(UsageError, match="is not supported: no adapter is written for it, and " + re.escape(REFUSED[family])):
            infer_and_check(model)
        return
    inferred = infer_and_check(model)
    adapter = inferred.adapter
    assert adapter.sites == hand.sites | ELSEWHERE.get(family, {})
    assert adapter.blocks(model) is hand.blocks(model)
    flags = lambda a: (a.parallel, a.gated, a.in_out, a.flat_rows, a.branch_norms, a.mixer)
    assert flags(adapter) == flags(hand)
    parts = lambda a: (a.attn_proj, a.mlp_up, a.mlp_gate, a.mlp_down)
    assert parts(adapter) == parts(hand)
    norm, expected = adapter.mlp_norm_module(model, 0), hand.mlp_norm_module(model, 0)
    assert (norm[0] if norm else None) == (expected[0] if expected else None)
    # Every equation was checked: the residual sums (one for a parallel block, two for a sequential one), the MLP's
    # norm, its projections and activation, and each block's input against transformers' hidden states.
    equations = [check.split(" (relative error")[0] for check in inferred.checks]
    sums = ["resid_out = resid_in + attn_out + mlp_out"] if hand.parallel else ["resid_mid = resid_in + attn_out",
                                                                                "resid_out = resid_mid + mlp_out"]
    assert equations[:len(sums) + 1] == ["resid_in = hidden state", *sums]
    assert len(equations) == 1 + len(sums) + len(hand.branch_norms) + 1 + (2 if hand.gated else 1) + 2
    assert all(float(check.split("relative error ")[1].rstrip(")")) <= 1e-5 for check in inferred.checks)


def _llama_with_a_hidden_term(tokenizer):
    """A Llama whose block 2 adds 0.5 x its input's first dim to every dim of its output: no sublayer writes it."""
    model = tiny_model("llama", len(tokenizer))
    block = model.model.layers[2]
    forward = block.forward

    def hidden_term(hidden_states, *args, **kwargs):
        return forward(hidden_states, *args, **kwargs) + 0.5 * hidden_states[..., :1]

    block.forward = hidden_term
    model.config.model_type = "llama_hidden_term"  # a type no adapter claims: loading infers its adapter
    return model


@pytest.mark.parametrize("family, scale", [("granite", "residual_multiplier"), ("falcon_h1", None)])
def test_the_equations_hold_on_a_hand_written_adapter_with_scales(family, scale, tokenizer):
    """The checks inference runs hold on the hand-written adapters whose branches land scaled (Granite's
    residual_multiplier; Falcon-H1's summed attention branch and its MLP's muP multipliers, gate x mlp_multipliers[0]
    before the activation, the down projection's output x mlp_multipliers[1]): mlp_out = down(mlp_act) x the scale."""
    model = tiny_model(family, len(tokenizer))
    config = model.config
    landing = getattr(config, scale) if scale else config.mlp_multipliers[1]
    assert landing != 1.0 and (scale or config.mlp_multipliers[0] != 1.0)
    equations = [line.split(" (relative error")[0] for line in check(model, wrap(model, tokenizer).adapter)]
    assert equations[:3] == ["resid_in = hidden state", "resid_mid = resid_in + attn_out", "resid_out = resid_mid + mlp_out"]
    assert equations[-2:] == ["mlp_act = act(mlp_gate) x mlp_up", f"mlp_out = down(mlp_act) x {landing:g}"]


def test_a_block_whose_pieces_do_not_add_up_is_refused_with_the_equation(tokenizer):
    model = _llama_with_a_hidden_term(tokenizer)
    with pytest.raises(UsageError) as refused:
        wrap(model, tokenizer)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("architecture 'llama_hidden_term' is not supported: no adapter is written for it, and its inferred adapter "
                              "does not hold: resid_out = resid_mid + mlp_out at block 2: max abs error ")
    # What the block adds beyond its sublayers: 0.5 x its input's first dim, at most that on the probe batch.
    with torch.no_grad():
        hidden = model(**probe_inputs(model), use_cache=False, output_hidden_states=True).hidden_states[2]
    error = float(message.split("max abs error ")[1].split(",")[0])
    assert error == pytest.approx(0.5 * hidden[..., 0].abs().max().item(), rel=5e-3)
    assert message.endswith("(tolerance 1e-05)")


def _tiny_unwritten(model_type: str, vocab_size: int):
    import transformers as t

    torch.manual_seed(0)
    config = {"stablelm": t.StableLmConfig, "helium": t.HeliumConfig}[model_type](
        vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return t.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", ["stablelm", "helium"])
def test_a_type_without_an_adapter_loads_by_inference_and_its_planted_neuron_is_found(model_type, tokenizer):
    """StableLM (LayerNorm blocks, partial rotary positions) and Helium (RMSNorm, gated MLP) have no hand-written
    adapter: their blocks are inferred and checked at load, and the scan names the planted neuron and weight."""
    model = _tiny_unwritten(model_type, len(tokenizer))
    assert not claimed(model.config)
    lm = wrap(model, tokenizer)
    assert lm.adapter.family == f"{model_type} (inferred)" and lm.adapter.sites["mlp_act"] == ("mlp.down_proj", "in")
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM, adapter=lm.adapter)
    report = massact.scan(lm, TEXTS)
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert (birth.layer, birth.position, birth.writer) == (LAYER, 0, "mlp")
    attribution = report.mechanism.attribution[0]
    assert attribution.neurons[0].neuron == NEURON and attribution.neurons[0].share > 0.99
    weight = attribution.super_weight
    assert weight.matrix == f"model.layers.{LAYER}.mlp.down_proj.weight" and (weight.row, weight.col) == (DIM, NEURON)
    assert weight.value == pytest.approx(100.0)
    assert report.model.inferred == list(lm.inferred) and len(lm.inferred) == 8
    text = " ".join(to_text(report).split())
    assert "Adapter inferred from the model's modules; checks passed on a padded probe batch: resid_in = hidden state" in text
    assert report.model.family == f"{model_type} (inferred)" and TRIGGER != DIM
    data = json.loads(write_report(report))
    assert data["model"]["inferred"] == list(lm.inferred)
    del data["model"]["inferred"]  # a version 2 report.json written before the field existed
    assert read_report(data).model.inferred == []


def test_the_inferred_llama_gives_the_hand_written_report(tokenizer):
    """One planted Llama scanned twice, through its hand-written adapter and through the inferred one: the same
    findings, origin and attribution."""
    from massact.models.loading import LoadedModel

    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    inferred = infer_and_check(model)
    by_hand = massact.scan(wrap(model, tokenizer), TEXTS)
    by_inference = massact.scan(LoadedModel(model, tokenizer, inferred.adapter, by_hand.model.name, inferred=inferred.checks), TEXTS)
    assert by_inference.findings == by_hand.findings
    assert by_inference.mechanism.attribution == by_hand.mechanism.attribution
    assert by_inference.mechanism.origin == by_hand.mechanism.origin


def test_a_saved_model_without_an_adapter_loads_by_inference(tokenizer, tmp_path):
    """From a model directory, as the command line loads it: the type is inferred once the weights are read."""
    from massact.models import load

    _tiny_unwritten("helium", len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load(str(tmp_path), device="cpu", log=lambda message: None)
    assert lm.adapter.family == "helium (inferred)" and lm.adapter.layers_path(lm.model) == "model.layers"
    assert [check.split(" (")[0] for check in lm.inferred] == [
        "resid_in = hidden state", "resid_mid = resid_in + attn_out", "resid_out = resid_mid + mlp_out",
        "mlp_in = post_attention_layernorm(resid_mid)", "mlp_up = mlp_in @ W^T + b", "mlp_gate = mlp_in @ W^T + b",
        "mlp_act = act(mlp_gate) x mlp_up", "mlp_out = down(mlp_act)"]


def test_the_type_count_classifies_a_handful_of_types():
    """benchmarks/count_types.py on three types: one mapped by hand, one inferred, one refused with its reason."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "count_types.py"
    spec = importlib.util.spec_from_file_location("count_types", path)
    count = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count)
    assert count.classify("gpt2") == ("by hand", "GPT-2")
    assert count.classify("persimmon") == ("inferred", "7 checks; sequential, a norm in front of each branch")
    how, why = count.classify("bloom")  # BLOOM's attention adds the residual inside its own module
    assert how == "refused" and why.startswith("resid_mid = resid_in + attn_out at block 0: max abs error ")
