"""Every family, planted: the scan must name the planted block, dim, writer, neuron and weight on each adapter, and
say honestly what a norm between the MLP and the residual did (sandwich norms) or where it measured (post-LN)."""

import json

import pytest
import torch

import massact
from conftest import (
    BESIDE_FAMILIES,
    D_MODEL,
    FAMILIES,
    MOE_FAMILIES,
    TRIGGER,
    _isolate_experts,
    _isolate_trigger,
    plant_mlp,
    run_massact,
    tiny_model,
)
from massact.analysis.mechanism.norms import gain_and_bias
from massact.models.adapters import adapter_for
from massact.models.adapters.base import text_config
from massact.numbers import short
from massact.report.text import to_text

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
# Families whose MLP output is normed before it lands: sandwich norms (Gemma-2/3/4, GLM-4) and reordered norms (OLMo-2/3,
# EXAONE-4), and LFM3's where its config asks.
SANDWICH = {"gemma2", "gemma3", "gemma3mm", "gemma4", "olmo2", "olmo3", "exaone4", "glm4", "lfm3"}
POST_LN = {"opt-postln", "bert", "roberta"}
# Experts beside the dense MLP, summed before the branch norm (Gemma-4's MoE block): planted as the sandwich families.
BESIDE = set(BESIDE_FAMILIES)
NORM_GAIN = 1000.0  # the planted branch-norm gain on DIM


def _zero_gain(norm) -> float:
    """The norm's gain on a dim whose stored weight is 0: 1 where the gain is 1 + weight (Gemma), else 0 (OLMo)."""
    return float(gain_and_bias(norm, D_MODEL)[0][DIM])


def planted(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    # Post-LN blocks norm the residual every block: the planted value must stand out in one residual sum alone.
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=1000.0 if family in POST_LN else 100.0)
    if family in SANDWICH | BESIDE:  # the branch norm rescales the raw output to rms 1: only its gain can make it land massive
        adapter = adapter_for(model.config)
        here, block = adapter.at(text_config(model), LAYER), adapter.blocks(model)[LAYER]
        norm, down = block.get_submodule(here.branch_norms["mlp_out"]), block.get_submodule(here.mlp_down)
        with torch.no_grad():
            norm.weight[DIM] = 0.0
            norm.weight[DIM] = NORM_GAIN - _zero_gain(norm)
            # The gain would also blow up DIM's random share of every other token's MLP output: only the neuron writes it.
            down.weight[DIM, :NEURON] = 0.0
            down.weight[DIM, NEURON + 1 :] = 0.0
            if here.moe is not None:  # nor do the experts beside it
                block.get_submodule(here.moe.part(here.moe.experts.path)).down_proj[:, DIM] = 0.0
    return model


EXPERT = 2
# Latent experts: the planted neuron reads TRIGGER through latent unit LATENT_IN and writes DIM through LATENT_OUT alone.
LATENT_IN, LATENT_OUT = 3, 11


def expert_rows(experts, expert: int, neuron: int, layout) -> tuple[torch.Tensor, int, int]:
    """Expert ``expert``'s fused gate-and-up weight as [2 d_mlp, d_model] (a view: writes reach the model) and the rows
    of ``neuron``'s gate and up, whatever the stored layout (transposed, interleaved); ungated experts: the up weight
    [d_mlp, d_model], whose one row stands for both."""
    fused = experts.gate_up_proj[expert] if layout.gated else experts.up_proj[expert]
    fused = fused.T if layout.transposed else fused
    if not layout.gated:
        return fused, neuron, neuron
    width = fused.shape[0] // 2
    return (fused, 2 * neuron, 2 * neuron + 1) if layout.interleaved else (fused, neuron, width + neuron)


@torch.no_grad()
def planted_moe(family, tokenizer):
    """Expert EXPERT's neuron NEURON of block LAYER fires on BOS only and writes 100 x its activation into DIM; the
    router sends BOS to that expert. Nothing else writes the trigger dim. Latent experts: the neuron reads TRIGGER through
    latent unit LATENT_IN and writes latent unit LATENT_OUT, which the out-projection carries into DIM alone."""
    model = tiny_model(family, len(tokenizer))
    adapter, config = adapter_for(model.config), text_config(model)
    bos = tokenizer.bos_token_id
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight[:, TRIGGER] = 0.0
    model.get_input_embeddings().weight[bos, TRIGGER] = 10.0
    for layer in range(config.num_hidden_layers):  # nothing else writes the trigger dim
        here = adapter.at(config, layer)
        for path in here.mixer_projections:  # a block of one sublayer has a token mixer or an MLP (Nemotron-H)
            adapter.weight_out_in(adapter.module(model, layer, path))[TRIGGER] = 0.0
        if here.per_layer_input is not None:  # a third writer after the MLP (Gemma-4's per-layer input)
            adapter.module(model, layer, here.per_layer_input.projection).weight[TRIGGER] = 0.0
        if here.mlp_down is not None:  # a dense block's MLP, or the dense MLP beside the experts
            down = adapter.module(model, layer, here.mlp_down)
            adapter.weight_out_in(down)[TRIGGER] = 0.0
            if down.bias is not None:
                down.bias[TRIGGER] = 0.0
        if here.moe is None:
            continue
        _isolate_experts(adapter, model, layer, here.moe)
    here = adapter.at(config, LAYER)
    block = adapter.module(model, LAYER, here.moe.block)
    here.moe.router.linear(block.get_submodule(here.moe.router.path)).weight[EXPERT, TRIGGER] = 5.0  # BOS goes to the expert
    experts = block.get_submodule(here.moe.experts.path)
    fused, gate, up = expert_rows(experts, EXPERT, NEURON, here.moe.experts)
    reads, writes = TRIGGER, DIM  # what the expert reads and writes: the stream's dims, or the latent's units
    if here.moe.latent is not None:
        into, out = (block.get_submodule(path) for path in here.moe.latent)
        into.weight[LATENT_IN] = 0.0
        into.weight[LATENT_IN, TRIGGER] = 1.0
        if into.bias is not None:
            into.bias[LATENT_IN] = 0.0
        out.weight[:, LATENT_OUT] = 0.0
        out.weight[DIM, LATENT_OUT] = 1.0
        reads, writes = LATENT_IN, LATENT_OUT
    for row in (gate, up):
        fused[row] = 0.0
        fused[row, reads] = 2.0
        if here.moe.experts.biases:
            experts.gate_up_proj_bias[EXPERT, row] = 0.0
    if "mlp_out" in here.branch_norms:  # a sandwich norm: its gain makes the one writer of DIM land massive (as in planted)
        for layer in range(config.num_hidden_layers):  # every other branch norm lands nothing in DIM (a normed branch is O(1))
            for site, path in adapter.at(config, layer).branch_norms.items():
                norm = adapter.module(model, layer, path)
                norm.weight[DIM] = 0.0
                norm.weight[DIM] = (NORM_GAIN if (layer, site) == (LAYER, "mlp_out") else 0.0) - _zero_gain(norm)
        (experts.down_proj[:, :, DIM] if here.moe.experts.transposed else experts.down_proj[:, DIM]).zero_()
        if here.moe.shared:
            adapter.module(model, LAYER, here.moe.shared_part(here.moe.shared.down)).weight[DIM] = 0.0
        if here.mlp_down is not None:  # the dense MLP beside the experts
            adapter.weight_out_in(adapter.module(model, LAYER, here.mlp_down))[DIM] = 0.0
    if here.moe.experts.transposed:
        experts.down_proj[EXPERT, NEURON, writes] = 100.0
    else:
        experts.down_proj[EXPERT, writes, NEURON] = 100.0
    return model


@pytest.mark.parametrize("family", FAMILIES + BESIDE_FAMILIES)
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
    here = adapter_for(model.config).at(text_config(model), LAYER)
    if here.reshapes("mlp_out") and "mlp_out" not in here.branch_norms:
        # The neurons explain the raw output; what lands is it times the scales (Granite's 0.22, Falcon-H1's
        # down_multiplier), read here from the config.
        scale = getattr(model.config, here.branch_scale) if here.branch_scale else model.config.mlp_multipliers[1]
        assert attribution.landed == pytest.approx(scale * attribution.output, rel=1e-5)
        assert birth.mlp == pytest.approx(attribution.landed) and birth.mlp_raw == pytest.approx(attribution.output)
    assert report.mechanism.anatomy[0].checkpoints[-1].argmax == DIM
    assert not any("differ" in w or "miss" in w for w in report.warnings), report.warnings
    if family in BESIDE:  # the branch norm's input is the dense MLP's part alone (the experts write nothing to DIM)
        here = adapter_for(model.config).at(text_config(model), LAYER)
        assert birth.mlp_routed == 0.0 and birth.mlp_dense == pytest.approx(birth.mlp_raw, rel=1e-6)
        own = attribution.norm  # the dense MLP's own norm, from the neurons' sum to its part
        assert own.parameter == f"model.layers.{LAYER}.{here.beside.dense_norm}.weight"
        assert own.raw == pytest.approx(attribution.output, rel=1e-6) and own.landed == pytest.approx(birth.mlp_dense, rel=1e-5)
        assert own.normalization * own.raw * own.gain == pytest.approx(own.landed, rel=1e-5)
        assert f"dense MLP's part {short(birth.mlp_dense, True)}" in report.conclusion[0]
    # The trigger's sources, carried back through every norm on the way (each with its eps), sum to the neuron's
    # pre-activations.
    splits = [split for neuron in report.trigger[0].neurons for split in neuron.splits]
    assert splits and max(split.error for split in splits) < 1e-5


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_a_sandwich_norm_is_named_as_the_amplifier(family, tokenizer):
    """The neurons explain the raw MLP output; the post-feedforward norm's gain on DIM makes it land massive."""
    report = massact.scan(planted(family, tokenizer), TEXTS, tokenizer=tokenizer)
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    attribution = report.mechanism.attribution[0]
    norm = birth.norm
    layers = "model.language_model.layers" if family == "gemma3mm" else "model.layers"
    path = {"glm4": "post_mlp_layernorm", "lfm3": "post_ffn_norm"}.get(family, "post_feedforward_layernorm")
    assert norm.parameter == f"{layers}.{LAYER}.{path}.weight"
    assert norm.amplifier and norm.gain == pytest.approx(NORM_GAIN, rel=1e-4) and norm.typical_gain == pytest.approx(1.0)
    # The stored entry: Gemma-2/3's gain is 1 + weight; Gemma-4's, OLMo's, EXAONE's and GLM-4's the weight.
    gemma = family.startswith("gemma") and family != "gemma4"
    assert norm.weight == pytest.approx(NORM_GAIN - 1.0 if gemma else NORM_GAIN)
    assert norm.raw == pytest.approx(birth.mlp_raw) == pytest.approx(attribution.output)
    assert norm.landed == pytest.approx(birth.mlp) == pytest.approx(attribution.landed)
    # The raw output is one spike, so the RMS normalisation brings it to about sqrt(d_model); the gain does the rest.
    assert abs(norm.normalization * norm.raw) == pytest.approx(8.0, rel=0.05)
    assert norm.error < 1e-5
    assert abs(attribution.landed) == pytest.approx(8.0 * NORM_GAIN, rel=0.05)  # without the gain it would land at about 8
    assert any(f"{path}.weight" in line and "amplif" in line for line in report.conclusion)


PLE_UNIT = 3  # the per-layer input unit the plant opens


@torch.no_grad()
def planted_per_layer_input(tokenizer):
    """Gemma-4: per-layer input unit PLE_UNIT of block LAYER opens on BOS only (its gate reads the trigger dim) and
    writes DIM alone; its norm's gain on DIM makes it land massive."""
    model = tiny_model("gemma4", len(tokenizer))
    block = adapter_for(model.config).blocks(model)[LAYER]
    _isolate_trigger(model, tokenizer.bos_token_id)
    block.per_layer_input_gate.weight[PLE_UNIT] = 0.0
    block.per_layer_input_gate.weight[PLE_UNIT, TRIGGER] = 1.0
    block.per_layer_projection.weight[DIM] = 0.0
    block.per_layer_projection.weight[DIM, PLE_UNIT] = 1.0
    block.post_per_layer_input_norm.weight[DIM] = NORM_GAIN
    return model


def test_a_value_planted_through_the_per_layer_input_is_attributed_to_it(tokenizer):
    """The origin names the planted per-layer input as the writer, with its norm as the amplifier, and the lifeline's
    birth phase does too."""
    model = planted_per_layer_input(tokenizer)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert (birth.layer, birth.position, birth.writer) == (LAYER, 0, "ple")
    # What lands is the norm of one spike: about sqrt(d_model) x the gain; attention and the MLP write nothing there.
    assert abs(birth.ple) == pytest.approx(8.0 * NORM_GAIN, rel=0.05) and abs(birth.attn) + abs(birth.mlp) < 1e-3 * abs(birth.ple)
    assert birth.resid_out == pytest.approx(birth.scale * (birth.resid_in + birth.attn + birth.mlp + birth.ple), rel=1e-5)
    assert birth.norm.parameter == f"model.layers.{LAYER}.post_per_layer_input_norm.weight" and birth.norm.amplifier
    assert birth.norm.raw == pytest.approx(birth.ple_raw)
    line = report.mechanism.lifelines[0]
    assert next(p for p in line.phases if p.name == "birth").writer == "ple"
    assert not report.mechanism.attribution  # no MLP neuron to attribute
    assert any("per-layer input" in sentence for sentence in report.conclusion)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in to_text(report).splitlines() if line.startswith("|")]
    header = next(row for row in rows if row[:2] == ["dim", "block"] and "ple" in row)  # the origin table, with the ple column
    row = dict(zip(header, next(row for row in rows if row[:3] == [str(DIM), str(LAYER), "birth"] and len(row) == len(header))))
    assert row["writer"] == "per-layer input" and row["scale"] == "1" and row["ple"].startswith(("+7,9", "-7,9"))
    assert not any("differ" in w or "miss" in w for w in report.warnings), report.warnings


def test_the_trigger_split_counts_the_per_layer_input_and_the_layer_scalars(tokenizer):
    """A neuron of block LAYER + 1 that reads DIM: its pre-activation splits into the embedding and every earlier
    branch, block LAYER's per-layer input the largest at BOS; with layer scalars other than 1 (each multiplies every
    source that crossed its block's output) the parts still add up to the model's value."""
    from massact.analysis.trigger.decompose import Target, split

    model = planted_per_layer_input(tokenizer)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer, scale in enumerate((0.5, 2.0, 1.5, 1.0)):
            adapter.blocks(model)[layer].layer_scalar.fill_(scale)
        adapter.blocks(model)[LAYER + 1].mlp.gate_proj.weight[NEURON, DIM] = 1.0
    lm = massact.wrap(model, tokenizer)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    (piece,), _ = split(lm, ids, [Target(layer=LAYER + 1, neuron=NEURON, site="mlp_gate")], position=0)
    assert piece.error < 1e-5
    sources = {f"block {b} {w}" for b in range(LAYER + 1) for w in ("attention", "MLP", "per-layer input")}
    assert sources | {f"block {LAYER + 1} attention", "token embedding"} <= set(piece.parts)
    at_bos = {label: float(part[0]) for label, part in piece.parts.items()}
    assert max(at_bos, key=lambda label: abs(at_bos[label])) == f"block {LAYER} per-layer input"
    # The per-layer input lands about 8 x NORM_GAIN on DIM; block LAYER's scalar (2.0) doubles it, then block 2's
    # input norm (RMS over a vector dominated by that spike) brings it to about sqrt(d_model) x its gain on DIM.
    assert abs(at_bos[f"block {LAYER} per-layer input"]) > 0.9 * abs(float(piece.value[0]))


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
    row = LATENT_OUT if here.moe.latent is not None else DIM  # latent experts' down projection writes the latent unit
    index = [expert, NEURON, row] if here.moe.experts.transposed else [expert, row, NEURON]
    assert (m.super_weight.index, m.super_weight.value, m.super_weight.rank) == (index, 100.0, 1)
    assert model.get_parameter(m.super_weight.matrix)[tuple(index)] == 100.0  # at its stored coordinates
    assert (here.moe.shared is not None) == (m.shared_expert is not None)
    # The expert's part plus the other sources sum to the block's MLP output.
    assert sum(e.contribution for e in m.experts) + (m.shared_expert.contribution if m.shared_expert else 0.0) + m.bias == \
        pytest.approx(m.actual, rel=1e-4)
    assert f"expert {expert}" in report.conclusion[0] and f"neuron {NEURON}" in report.conclusion[0]
    if family in BESIDE:  # the experts' weighted sum, through their own norm, is the branch norm's input alone
        birth = next(o for o in report.mechanism.origin if o.role == "birth")
        assert birth.mlp_dense == 0.0 and birth.mlp_routed == pytest.approx(birth.mlp_raw, rel=1e-6)
        own = split.norm
        assert own.parameter == f"model.layers.{LAYER}.{here.beside.routed_norm}.weight"
        assert own.raw == pytest.approx(m.actual, rel=1e-6) and own.landed == pytest.approx(birth.mlp_routed, rel=1e-5)
        assert own.normalization * own.raw * own.gain == pytest.approx(own.landed, rel=1e-5)
    text = to_text(report)
    assert "Expert and neuron attribution" in text
    # Ungated experts (Nemotron-H's) have one pre-activation: the neuron table shows up and act(up), no gate.
    assert m.gated == here.moe.experts.gated and report.model.gated == here.moe.experts.gated
    assert ("x act(gate) x up x W_down" if m.gated else "x act(up) x W_down") in text
    rows = {r.name.split(" [")[0].split(" (")[0]: r for r in report.causal.verification.interventions}
    zero = rows["zero expert super weight"]
    control = next(r for r in report.causal.verification.interventions if r.name.startswith("control"))
    assert zero.confirms and abs(zero.value_birth) < 1.0  # the planted neuron wrote it all
    ablated = rows[f"ablate neuron {NEURON} of expert {expert}"]
    assert ablated.confirms and abs(ablated.value_birth) < 1.0 and ablated.perplexity is not None
    assert control.still_massive and control.value_birth == pytest.approx(rows["none"].value_birth, rel=1e-3)
    rerouted = rows[f"re-route: prune expert {expert}"]  # the router picks among the others: none writes it
    assert rerouted.confirms and abs(rerouted.value_birth) < 1.0 and rerouted.perplexity is not None
