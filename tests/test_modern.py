"""The newer dense and hybrid families (OLMo-2 and -3, EXAONE-4, Cohere-2, Seed-OSS, Apertus, SmolLM3, LFM2,
Qwen3-Next, Qwen3.5, multimodal Gemma-3) and what their designs do, on planted tiny models of the real transformers
classes: hybrid mixers (LFM2's convolutions, Qwen3-Next's Gated DeltaNet) pass through every stage and
are left out of the sink metrics only; Qwen3-Next's output gates are read per head as the model computes them; NoPE
blocks are reported per block; a multimodal Gemma-3 gives the report of its language model alone.
(Every family's planted truth and block sums: test_families.py and test_adapters.py; the CLI chain: test_chain.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import massact
from conftest import MIXERS, MOE_FAMILIES
from massact.models.adapters import adapter_for
from test_families import DIM, LAYER, NEURON, TEXTS, planted

EVAL = " ".join(TEXTS * 6)


@pytest.fixture(scope="module")
def reports(tokenizer):
    """Each family's planted model, scanned with every stage (verification, sinks, quantization)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = planted(family, tokenizer)
            cache[family] = (model, massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True, quant=True, eval_text=EVAL))
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(set(MIXERS) - set(MOE_FAMILIES)))  # a planted dense neuron; experts: test_families.py
def test_a_hybrid_passes_every_stage_and_its_sinks_are_measured_on_softmax_blocks_only(family, reports):
    model, report = reports(family)
    mixers = MIXERS[family]
    softmax = [layer for layer, mixer in enumerate(mixers) if mixer == "attention"]
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    kinds = {"conv": "convolution", "linear": "linear attention", "ssm": "state-space scan", "attention": "attention",
             None: "MLP alone"}
    assert [block.split(" (")[0] for block in report.model.blocks] == [kinds[mixer] for mixer in mixers]
    # Origin, attribution and super weight at the planted block, whatever its mixer.
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert birth.writer == "mlp" and report.mechanism.attribution[0].neurons[0].neuron == NEURON
    # A block of one sublayer reports no other branch (None), and its output is its input plus that one.
    if mixers[LAYER] is None:
        assert birth.attn is None and birth.resid_out == pytest.approx(birth.resid_in + birth.mlp, rel=1e-5)
    # The trigger splits the writing neuron's gate over sources named by their mixers, and is patched.
    trigger = report.trigger[0]
    sources = {s.source for s in trigger.neurons[0].splits[0].sources}
    assert f"block 0 {kinds[mixers[0]]}" in sources and trigger.patching
    # Verification and perplexity.
    zero = next(r for r in report.causal.verification.interventions if r.name.startswith("zero super weight"))
    assert not zero.still_massive and zero.perplexity is not None
    # Sinks: on the softmax blocks only; the others have no rows, and the report says which blocks it measured.
    a = report.causal.attention
    assert a.softmax_layers == softmax and a.texts > 0
    for layer in range(len(mixers)):
        measured = not math.isnan(a.rate[layer])
        assert measured == (layer in softmax) and all(math.isnan(v) != measured for v in a.share[layer])
    assert f"measured on the softmax-attention block{'s' if len(softmax) > 1 else ''} {', '.join(map(str, softmax))}" in a.mixing
    alone = mixers.count(None)  # blocks that are an MLP alone are named apart from the other mixers (Nemotron-H: 2)
    assert (f"{alone} are MLPs alone, with no token mixer" in a.mixing) if alone else ("alone" not in a.mixing)
    # Quantization and headroom.
    assert report.deploy.quantization.rows and report.deploy.precision.headroom > 0


def test_qwen3_next_gates_equal_a_hand_computation_from_the_gate_projection(tokenizer, reports):
    """gate = sigmoid(q_proj(x)[per head: query | gate][gate]), averaged over head_dim: computed here from block 3's
    q_proj weight and its input (the normed stream), at the sink tokens and elsewhere, averaged over the texts."""
    model, report = reports("qwen3_next")
    layer, heads, head_dim = 3, model.config.num_attention_heads, model.config.head_dim
    attn = model.model.layers[layer].self_attn
    inputs = {}
    hook = attn.q_proj.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0][0].detach()))
    sink, other = [], []
    try:
        for token in sorted({(t.text, t.position) for t in report.causal.attention.tokens}):
            ids = tokenizer(TEXTS[token[0]], return_tensors="pt").input_ids
            with torch.no_grad():
                model(ids)
            q = inputs["x"].double() @ attn.q_proj.weight.detach().double().T  # [positions, heads x 2 x head_dim]
            gate = torch.sigmoid(q.view(len(q), heads, 2 * head_dim)[..., head_dim:]).mean(-1)  # [positions, heads]
            sink.append(gate[token[1]])
            other.append(torch.cat([gate[: token[1]], gate[token[1] + 1 :]]).mean(0))
    finally:
        hook.remove()
    a = report.causal.attention
    assert a.gate_sink[layer] == pytest.approx(torch.stack(sink).mean(0).tolist(), abs=1e-5)
    assert a.gate_other[layer] == pytest.approx(torch.stack(other).mean(0).tolist(), abs=1e-5)
    assert all(math.isnan(v) for v in a.gate_sink[0])  # a linear-attention block has no gate
    assert "gated attention (output x sigmoid(gate), per head): at the sink tokens the gate averages" in a.mixing


@pytest.mark.parametrize("family, nope", [("smollm3", [3]), ("exaone4", [3]), ("cohere2", [3])])
def test_blocks_without_positions_are_reported_per_block(family, nope, reports):
    """SmolLM3 leaves rotary positions out of every fourth block; EXAONE-4 and Cohere-2 out of their full-attention
    blocks (here the fourth)."""
    _, report = reports(family)
    a = report.causal.attention
    assert a.positions == [layer not in nope for layer in range(4)]
    assert report.model.blocks[3].endswith("no positions)") and "no positions" not in report.model.blocks[0]
    assert f"block {nope[0]} uses no positions (NoPE): sink rate" in a.mixing
    assert "the massive value is born in block 1, which uses positions" in a.mixing


def test_a_multimodal_gemma3_gives_the_report_of_its_language_model(tokenizer):
    """A tiny Gemma3ForConditionalGeneration against a Gemma3ForCausalLM holding the same language-model weights: the
    same dims, values, writer, neuron and super weight (under the multimodal model's own parameter name)."""
    multimodal = planted("gemma3mm", tokenizer)
    text = transformers.Gemma3ForCausalLM(multimodal.config.text_config).eval()
    prefix = "model.language_model."
    weights = {("model." + key[len(prefix):] if key.startswith(prefix) else key): value
               for key, value in multimodal.state_dict().items() if not key.startswith(("model.vision_tower", "model.multi_modal"))}
    text.load_state_dict(weights)
    assert type(multimodal).__name__ == "Gemma3ForConditionalGeneration"
    assert adapter_for(multimodal.config).layers == "language_model.layers"
    both = [massact.scan(model, TEXTS, tokenizer=tokenizer) for model in (multimodal, text)]
    (a, b) = both
    assert [d.dim for d in a.findings.dims] == [d.dim for d in b.findings.dims] == [DIM]
    assert [(m.layer, m.text, m.position, m.dim) for m in a.findings.massive] == \
        [(m.layer, m.text, m.position, m.dim) for m in b.findings.massive]
    assert [m.value for m in a.findings.massive] == pytest.approx([m.value for m in b.findings.massive], rel=1e-5)
    assert [s.median for s in a.findings.layers] == pytest.approx([s.median for s in b.findings.layers], rel=1e-5)
    wa, wb = a.mechanism.attribution[0].super_weight, b.mechanism.attribution[0].super_weight
    assert (wa.row, wa.col, wa.value, wa.rank) == (wb.row, wb.col, wb.value, wb.rank) == (DIM, NEURON, wb.value, 1)
    assert wa.matrix == f"model.language_model.layers.{LAYER}.mlp.down_proj.weight" and multimodal.get_parameter(wa.matrix) is not None
    assert "the vision tower is not run" in a.model.notes and "vision" not in b.model.notes


def test_falcon_h1_measures_sinks_on_every_block_and_splits_the_attentions_part_over_heads(reports, tokenizer):
    """Falcon-H1 runs a Mamba-2 scan beside the attention in every block: the planted neuron passes every stage, the
    sink metrics are measured on all four blocks (each has softmax attention: no list of them), and the heads split the attention's
    part of the summed branch alone (o_proj's output x attention_out_multiplier, read here by plain hooks), not the
    scan's."""
    from massact.analysis.mechanism.origin import head_split

    model, report = reports("falcon_h1")
    assert [d.dim for d in report.findings.dims] == [DIM] and report.findings.dims[0].born_at == LAYER
    birth = next(o for o in report.mechanism.origin if o.role == "birth")
    assert birth.writer == "mlp" and report.mechanism.attribution[0].neurons[0].neuron == NEURON
    a = report.causal.attention
    assert a.softmax_layers == [] and not any(math.isnan(rate) for rate in a.rate) and report.model.blocks == []
    assert report.deploy.quantization.rows and report.trigger[0].patching
    # The activation acts on the gate times mlp_multipliers[0], and the report says so.
    assert report.mechanism.anatomy[0].activation_impact.function == f"SiLUActivation({model.config.mlp_multipliers[0]:g} x)"

    block, seen = model.model.layers[2], {}
    hooks = [block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0][0, 3].detach())),
             block.self_attn.register_forward_hook(lambda m, args, output: seen.__setitem__("attn", output[0][0, 3].detach())),
             block.mamba.register_forward_hook(lambda m, args, output: seen.__setitem__("mamba", output[0, 3].detach()))]
    try:
        with torch.no_grad():
            model(tokenizer(TEXTS[0], return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    config, lm = model.config, massact.wrap(model, tokenizer)
    for dim in range(4):
        heads = head_split(lm, 2, seen["z"], dim)
        attention = config.attention_out_multiplier * float(seen["attn"][dim])
        assert sum(h.contribution for h in heads) == pytest.approx(attention, rel=1e-4, abs=1e-6)
        assert sum(h.share for h in heads) == pytest.approx(1.0)
        assert abs(config.ssm_out_multiplier * float(seen["mamba"][dim])) > 1e-3  # the scan's part, which no head holds
