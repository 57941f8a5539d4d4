"""Every family, planted: the scan must name the planted block, dim, writer, neuron and weight on each adapter, and
say honestly what a norm between the MLP and the residual did (sandwich norms) or where it measured (post-LN)."""

import json

import pytest
import torch

import massact
from conftest import D_MODEL, FAMILIES, MOE_FAMILIES, TRIGGER, plant_mlp, run_massact, tiny_model
from massact.analysis.mechanism.norms import gain_and_bias
from massact.models.adapters import adapter_for
from massact.models.adapters.base import text_config
from massact.report.text import to_text

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
# Families whose MLP output is normed before it lands: sandwich norms (Gemma-2/3) and reordered norms (OLMo-2/3, EXAONE-4).
SANDWICH = {"gemma2", "gemma3", "gemma3mm", "olmo2", "olmo3", "exaone4", "lfm3"}
POST_LN = {"opt-postln", "bert", "roberta"}
NORM_GAIN = 1000.0  # the planted branch-norm gain on DIM


def _zero_gain(norm) -> float:
    """The norm's gain on a dim whose stored weight is 0: 1 where the gain is 1 + weight (Gemma), else 0 (OLMo)."""
    return float(gain_and_bias(norm, D_MODEL)[0][DIM])


def planted(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    # Post-LN blocks norm the residual every block: the planted value must stand out in one residual sum alone.
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=1000.0 if family in POST_LN else 100.0)
    if family in SANDWICH:  # the branch norm rescales the raw output to rms 1: only its gain can make it land massive
        adapter = adapter_for(model.config)
        here, block = adapter.at(text_config(model), LAYER), adapter.blocks(model)[LAYER]
        norm, down = block.get_submodule(here.branch_norms["mlp_out"]), block.get_submodule(here.mlp_down)
        with torch.no_grad():
            norm.weight[DIM] = 0.0
            norm.weight[DIM] = NORM_GAIN - _zero_gain(norm)
            # The gain would also blow up DIM's random share of every other token's MLP output: only the neuron writes it.
            down.weight[DIM, :NEURON] = 0.0
            down.weight[DIM, NEURON + 1 :] = 0.0
    return model


EXPERT = 2


def expert_rows(experts, expert: int, neuron: int, layout) -> tuple[torch.Tensor, int, int]:
    """Expert ``expert``'s fused gate-and-up weight as [2 d_mlp, d_model] (a view: writes reach the model) and the rows
    of ``neuron``'s gate and up, whatever the stored layout (transposed, interleaved)."""
    fused = experts.gate_up_proj[expert]
    fused = fused.T if layout.transposed else fused
    width = fused.shape[0] // 2
    return (fused, 2 * neuron, 2 * neuron + 1) if layout.interleaved else (fused, neuron, width + neuron)


@torch.no_grad()
def planted_moe(family, tokenizer):
    """Expert EXPERT's neuron NEURON of block LAYER fires on BOS only and writes 100 x its activation into DIM; the
    router sends BOS to that expert. Nothing else writes the trigger dim."""
    model = tiny_model(family, len(tokenizer))
    adapter, config = adapter_for(model.config), text_config(model)
    bos = tokenizer.bos_token_id
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight[:, TRIGGER] = 0.0
    model.get_input_embeddings().weight[bos, TRIGGER] = 10.0
    for layer in range(config.num_hidden_layers):  # nothing else writes the trigger dim
        here = adapter.at(config, layer)
        adapter.weight_out_in(adapter.module(model, layer, here.attn_proj))[TRIGGER] = 0.0
        if here.moe is None:
            adapter.weight_out_in(adapter.module(model, layer, here.mlp_down))[TRIGGER] = 0.0
            continue
        block = adapter.module(model, layer, here.moe.block)
        experts = block.get_submodule(here.moe.experts.path)
        (experts.down_proj[:, :, TRIGGER] if here.moe.experts.transposed else experts.down_proj[:, TRIGGER]).zero_()
        if here.moe.experts.biases:
            experts.down_proj_bias[:, TRIGGER] = 0.0
        if here.moe.shared:
            block.get_submodule(here.moe.shared.part(here.moe.shared.down)).weight[TRIGGER] = 0.0
    here = adapter.at(config, LAYER)
    block = adapter.module(model, LAYER, here.moe.block)
    block.get_submodule(here.moe.router.path).weight[EXPERT, TRIGGER] = 5.0  # BOS goes to the expert
    experts = block.get_submodule(here.moe.experts.path)
    fused, gate, up = expert_rows(experts, EXPERT, NEURON, here.moe.experts)
    for row in (gate, up):
        fused[row] = 0.0
        fused[row, TRIGGER] = 2.0
        if here.moe.experts.biases:
            experts.gate_up_proj_bias[EXPERT, row] = 0.0
    if here.moe.experts.transposed:
        experts.down_proj[EXPERT, NEURON, DIM] = 100.0
    else:
        experts.down_proj[EXPERT, DIM, NEURON] = 100.0
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_neuron_is_found_in_every_family(family, tokenizer):
    model = planted(family, tokenizer)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    assert [d.dim for d in report.findings.dims] == [DIM]
    dim = report.findings.dims[0]
    assert dim.born_at == LAYER
    if family in POST_LN:  # the next block's LayerNorm brings it back to the scale of the rest
        assert dim.persists == [LAYER] and report.model.stream == "resid_sum"
    else:
        assert dim.persists == list(range(LAYER, text_config(model).num_hidden_layers)) and report.model.stream == "resid_out"
    assert {(m.position, m.token) for m in report.findings.massive} == {(0, "<s>")}

    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert (birth.layer, birth.position, birth.writer) == (LAYER, 0, "mlp")
    attribution = report.mechanism.attribution[0]
    assert attribution.neurons[0].neuron == NEURON and attribution.neurons[0].share > 0.99
    assert attribution.error < 1e-4
    weight = attribution.super_weight
    assert model.get_parameter(weight.matrix)[weight.row, weight.col].item() == pytest.approx(weight.value)
    assert weight.rank == 1 and weight.value == pytest.approx(1000.0 if family in POST_LN else 100.0)
    assert report.mechanism.anatomy[0].checkpoints[-1].argmax == DIM
    assert not any("differ" in w or "miss" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_a_sandwich_norm_is_named_as_the_amplifier(family, tokenizer):
    """The neurons explain the raw MLP output; the post-feedforward norm's gain on DIM makes it land massive."""
    report = massact.scan(planted(family, tokenizer), TEXTS, tokenizer=tokenizer)
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    attribution = report.mechanism.attribution[0]
    norm = birth.norm
    layers = "model.language_model.layers" if family == "gemma3mm" else "model.layers"
    branch_norm = "post_ffn_norm" if family == "lfm3" else "post_feedforward_layernorm"
    assert norm.parameter == f"{layers}.{LAYER}.{branch_norm}.weight"
    assert norm.amplifier and norm.gain == pytest.approx(NORM_GAIN, rel=1e-4) and norm.typical_gain == pytest.approx(1.0)
    gemma = family.startswith("gemma")  # the stored entry: Gemma's gain is 1 + weight, OLMo's and EXAONE's the weight
    assert norm.weight == pytest.approx(NORM_GAIN - 1.0 if gemma else NORM_GAIN)
    assert norm.raw == pytest.approx(birth.mlp_raw) == pytest.approx(attribution.output)
    assert norm.landed == pytest.approx(birth.mlp) == pytest.approx(attribution.landed)
    # The raw output is one spike, so the RMS normalisation brings it to about sqrt(d_model); the gain does the rest.
    assert abs(norm.normalization * norm.raw) == pytest.approx(8.0, rel=0.05)
    assert norm.error < 1e-5
    assert abs(attribution.landed) == pytest.approx(8.0 * NORM_GAIN, rel=0.05)  # without the gain it would land at about 8
    assert any(f"{branch_norm}.weight" in line and "amplif" in line for line in report.conclusion)


@pytest.mark.parametrize("family", sorted(POST_LN))
def test_post_ln_models_are_measured_before_the_norm(family, tokenizer):
    """In a post-LN block the massive value lives in the residual sum; the block output after the LayerNorm is
    ordinary, which is why HF's hidden_states never show it."""
    model = planted(family, tokenizer)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert birth.resid_out == pytest.approx(birth.resid_mid + birth.mlp, rel=1e-5)
    assert abs(birth.resid_out) > 1000 and abs(birth.norm.landed) < 20
    ids = tokenizer(TEXTS[birth.text], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert birth.norm.landed == pytest.approx(hidden[LAYER + 1][0, 0, DIM].item(), rel=1e-4)
    assert hidden[LAYER + 1].abs().max() < 20  # nothing massive where HF looks
    assert any("before" in line and "LayerNorm" in line for line in report.conclusion)


@pytest.mark.parametrize("family", ["neox", "phi3", "gemma2", "bert"])
def test_cli_scans_every_kind_of_block(family, tokenizer, tmp_path):
    """Parallel, fused gate-up, sandwich-normed and post-LN encoder models through the command line, with the
    verification (skipped, with a warning, for this BERT: the shared tokenizer has no mask token; test_sinks.py
    verifies one that has)."""
    model = planted(family, tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    result = run_massact("scan", tmp_path / "model", "--text", TEXTS[0], "--text", TEXTS[1], "--out", tmp_path / "out",
                         "--format", "json,txt", "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert [d["dim"] for d in data["findings"]["dims"]] == [DIM] and data["mechanism"]["attribution"][0]["neurons"][0]["neuron"] == NEURON
    text = (tmp_path / "out" / "report.txt").read_text(encoding="utf-8")
    assert data["model"]["notes"] in " ".join(text.split())  # the text report wraps long lines
    if family == "bert":
        assert data["causal"]["verification"] is None
        assert any("verification skipped: the tokenizer has no mask token" in w for w in data["warnings"])
    else:
        zero = next(r for r in data["causal"]["verification"]["interventions"] if r["name"].startswith("zero super weight"))
        assert not zero["still_massive"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_planted_expert_neuron_is_found_through_the_router(family, tokenizer):
    """Expert 2's neuron fires on BOS only and the router sends BOS to expert 2: the scan names the expert, its router
    weight, the neuron and the super weight inside the fused expert weights."""
    expert = EXPERT
    model = planted_moe(family, tokenizer)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True)
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    split = report.mechanism.experts[0]
    assert (split.layer, split.position, split.dim) == (LAYER, 0, DIM)
    m = split.moe
    here = adapter_for(model.config).at(text_config(model), LAYER)
    assert m.error < 1e-4 and m.top_expert == expert and m.experts[0].expert == expert and m.experts[0].router_prob > 0.9
    assert m.neurons[0].neuron == NEURON and m.neurons[0].share > 0.9
    index = [expert, NEURON, DIM] if here.moe.experts.transposed else [expert, DIM, NEURON]
    assert (m.super_weight.index, m.super_weight.value, m.super_weight.rank) == (index, 100.0, 1)
    assert model.get_parameter(m.super_weight.matrix)[tuple(index)] == 100.0  # at its stored coordinates
    assert (here.moe.shared is not None) == (m.shared_expert is not None)
    # The expert's part plus the other sources sum to the block's MLP output.
    assert sum(e.contribution for e in m.experts) + (m.shared_expert.contribution if m.shared_expert else 0.0) == \
        pytest.approx(m.actual, rel=1e-4)
    assert f"expert {expert}" in report.conclusion[0] and f"neuron {NEURON}" in report.conclusion[0]
    assert "Expert and neuron attribution" in to_text(report)
    rows = {r.name.split(" [")[0].split(" (")[0]: r for r in report.causal.verification.interventions}
    zero = rows["zero expert super weight"]
    control = next(r for r in report.causal.verification.interventions if r.name.startswith("control"))
    assert zero.confirms and abs(zero.value_birth) < 1.0  # the planted neuron wrote it all
    ablated = rows[f"ablate neuron {NEURON} of expert {expert}"]
    assert ablated.confirms and abs(ablated.value_birth) < 1.0 and ablated.perplexity is not None
    assert control.still_massive and control.value_birth == pytest.approx(rows["none"].value_birth, rel=1e-3)
    rerouted = rows[f"re-route: prune expert {expert}"]  # the router picks among the others: none writes it
    assert rerouted.confirms and abs(rerouted.value_birth) < 1.0 and rerouted.perplexity is not None
