"""Mixtures of experts: every router recomputed equals the model's own, each expert's recorded maximum equals a hand
computation, and super experts are found and verified by pruning against a random control on planted models of
three router kinds (softmax, top-k then softmax with a bias, sigmoid with groups). Every family's planted expert
neuron: test_families.py; the CLI chain: test_chain.py."""

from __future__ import annotations

import pytest
import torch

import massact
from conftest import D_MODEL, MOE_FAMILIES, N_HEADS, TRIGGER, tiny_model
from massact.analysis.detect.scan import scan_layers
from massact.capture.batches import pad_batch
from massact.capture.routing import MoeBlock, model_routing, route
from massact.models.adapters import adapter_for
from massact.models.adapters.base import text_config
from test_families import DIM, EXPERT, LAYER, NEURON, TEXTS, planted_moe

EVAL = " ".join(TEXTS * 6)
SINK_LAYER = 2


def router_inputs(lm, tokenizer) -> dict[int, tuple[MoeBlock, torch.Tensor]]:
    """Every mixture-of-experts block of ``lm`` and what its router was given [tokens, d_model] in one padded batch of
    the planted texts."""
    blocks = {layer: MoeBlock.at(lm, layer) for layer in range(text_config(lm.model).num_hidden_layers)}
    blocks = {layer: moe for layer, moe in blocks.items() if moe is not None}
    inputs = {}
    hooks = [moe.router.register_forward_pre_hook(lambda m, args, layer=layer: inputs.__setitem__(layer, args[0].detach()))
             for layer, moe in blocks.items()]
    ids, mask = pad_batch([tokenizer(text, return_tensors="pt").input_ids for text in TEXTS])
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert blocks
    return {layer: (moe, inputs[layer].reshape(-1, inputs[layer].shape[-1])) for layer, moe in blocks.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_recomputed_routing_is_the_models_own(family, tokenizer):
    """On a padded batch of a random model, at every mixture-of-experts block: the same experts and weights."""
    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=2), tokenizer)
    for layer, (moe, x) in router_inputs(lm, tokenizer).items():
        indices, weights = model_routing(moe, x)
        mine = route(moe, x)
        order = mine.indices.argsort(dim=-1)
        assert torch.equal(mine.indices.gather(1, order).cpu(), indices), (family, layer)
        assert torch.allclose(mine.weights.gather(1, order).float().cpu(), weights, rtol=1e-4, atol=1e-6), (family, layer)


# Routers with a correction bias (on the router, nested in it, or on the block), softcapped logits, or a scale the block
# applies after the router.
CORRECTED = ["minimax_m2", "ernie4_5_moe", "exaone_moe", "cohere2_moe", "afmoe", "mimo_v2_flash", "laguna", "nemotron_h_moe",
             "nemotron_h_latent", "kimi_linear_moe"]


@torch.no_grad()
@pytest.mark.parametrize("family", CORRECTED)
def test_a_random_correction_bias_and_softcap_are_recomputed_as_the_router_applies_them(family, tokenizer):
    """The correction biases set at random (they start at 0) and Laguna's softcap at 0.5 (the logits saturate): the
    recomputed routing is still the router's own, the biases move the choice, and a router routing through massact
    (``pruned_experts``, nothing pruned) gives the block's own output (the block's after-router scale applied once)."""
    from massact.capture.routing import block_output, pruned_experts

    torch.manual_seed(1)
    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=2), tokenizer)
    moved = 0
    for layer, (moe, x) in router_inputs(lm, tokenizer).items():
        if moe.correction is not None:
            moe.correction.copy_(torch.randn_like(moe.correction) * 0.3)
        if moe.spec.router.softcap:
            setattr(moe.router, moe.spec.router.softcap, 0.5)
        indices, weights = model_routing(moe, x)
        mine = route(moe, x)
        order = mine.indices.argsort(dim=-1)
        assert torch.equal(mine.indices.gather(1, order).cpu(), indices), (family, layer)
        assert torch.allclose(mine.weights.gather(1, order).float().cpu(), weights, rtol=1e-4, atol=1e-6), (family, layer)
        plain = mine.scores.topk(moe.top_k, dim=-1).indices.sort(dim=-1).values.cpu()
        moved += int((plain != indices).any(-1).sum())
        before = [block_output(moe, row) for row in x[:6]]
        with pruned_experts(lm, {layer: []}):
            after = [block_output(moe, row) for row in x[:6]]
        for one, other in zip(before, after):
            torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-6)
    has_bias = any(moe.correction is not None for moe, _ in router_inputs(lm, tokenizer).values())
    assert moved > 0 if has_bias else moved == 0  # Cohere-2-MoE has no bias: its choice is the plain top-k


@torch.no_grad()
def test_a_router_that_norms_its_input_and_scales_each_chosen_expert_is_recomputed_as_it_routes(tokenizer):
    """Gemma-4's router reads the unnormed stream and norms it itself: x / rms(x) x scale x d^-0.5, a softmax over
    the experts, the top 2 renormalised, each times per_expert_scale[expert]. With both scales random (they start
    at 1): the recomputed routing is the router's own and this formula's, and the per-dim scale moves the choice."""
    from massact.capture.routing import block_output, pruned_experts

    torch.manual_seed(1)
    lm = massact.wrap(tiny_model("gemma4_moe", len(tokenizer), seed=2), tokenizer)
    for layer in range(text_config(lm.model).num_hidden_layers):
        router = MoeBlock.at(lm, layer).router
        router.scale.copy_(torch.rand_like(router.scale) * 2 + 0.1)
        router.per_expert_scale.copy_(torch.rand_like(router.per_expert_scale) + 0.5)
    moved = 0
    for layer, (moe, x) in router_inputs(lm, tokenizer).items():
        indices, weights = model_routing(moe, x)
        mine = route(moe, x)
        order = mine.indices.argsort(dim=-1)
        assert torch.equal(mine.indices.gather(1, order).cpu(), indices), layer
        assert torch.allclose(mine.weights.gather(1, order).float().cpu(), weights, rtol=1e-5, atol=1e-6), layer
        router, h = moe.router, x.double()
        unscaled = h * (h.pow(2).mean(-1, keepdim=True) + router.eps).rsqrt() * D_MODEL**-0.5
        probabilities = torch.softmax((unscaled * router.scale.double()) @ router.proj.weight.double().T, dim=-1)
        top = probabilities.topk(2, dim=-1)
        expected = top.values / top.values.sum(-1, keepdim=True) * router.per_expert_scale.double()[top.indices]
        assert torch.equal(top.indices.sort(-1).values, indices), layer
        torch.testing.assert_close(mine.weights, expected, rtol=1e-9, atol=1e-12)
        plain = torch.softmax(unscaled @ router.proj.weight.double().T, dim=-1).topk(2, dim=-1).indices.sort(-1).values
        moved += int((plain != indices).any(-1).sum())
        before = [block_output(moe, row) for row in x[:6]]  # routing through massact, nothing pruned: the same experts' sum
        with pruned_experts(lm, {layer: []}):
            after = [block_output(moe, row) for row in x[:6]]
        for one, other in zip(before, after):
            torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-6)
    assert moved > 0


@torch.no_grad()
@pytest.mark.parametrize("family", ["mixtral", "nemotron_h_moe", "nemotron_h_latent"])
def test_each_experts_recorded_maximum_is_a_hand_computation(family, tokenizer):
    """Planted: per (block, expert), the largest |output| over the real tokens routed to it, computed here from the
    block's input, the router and each expert's weights (Mixtral: x -> down(silu(gate x) x up x); Nemotron-H's ungated
    experts: x -> down(relu(up x)^2); its latent experts: x -> W_fc2 down(relu(up fc1(x))^2), as the output reaches the
    stream, without fc2's bias, which is no expert's)."""
    model = planted_moe(family, tokenizer)
    lm = massact.wrap(model, tokenizer)
    windows = [tokenizer(text, return_tensors="pt").input_ids for text in TEXTS]
    routed, _ = scan_layers(lm, iter(windows), 512, batch_size=2).experts
    for layer in range(model.config.num_hidden_layers):
        moe = MoeBlock.at(lm, layer)
        if moe is None:  # a block without experts records none
            assert routed[layer].tolist() == [float("-inf")] * 4
            continue
        seen = {}
        hook = moe.block.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("x", args[0].detach()))
        try:
            expected = torch.full((4,), float("-inf"))
            for ids in windows:
                model(ids)
                x = seen["x"].reshape(-1, D_MODEL).double()
                chosen = route(moe, x).indices
                into, out_of = (moe.block.get_submodule(path) for path in moe.spec.latent) if moe.spec.latent else (None, None)
                z = x @ into.weight.double().T + into.bias.double() if into is not None else x
                for expert in range(4):
                    tokens = (chosen == expert).any(-1)
                    if tokens.any():
                        if moe.spec.experts.gated:
                            gate, up = (moe.experts.gate_up_proj[expert].double() @ z[tokens].T).chunk(2, dim=0)
                            hidden = torch.nn.functional.silu(gate) * up
                        else:
                            hidden = torch.relu(moe.experts.up_proj[expert].double() @ z[tokens].T) ** 2
                        out = moe.experts.down_proj[expert].double() @ hidden
                        out = out_of.weight.double() @ out if out_of is not None else out
                        expected[expert] = max(expected[expert], float(out.abs().max()))
        finally:
            hook.remove()
        assert routed[layer].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert int(routed[LAYER].argmax()) == EXPERT and float(routed[LAYER, EXPERT]) > 1000


@torch.no_grad()
def plant_sink_heads(model, layer: int) -> None:
    """Every head of block ``layer`` attends to the first token when dim DIM is massive there: a constant query (the
    q bias) and a key that reads DIM, both in each head's last dim (where rotary positions turn slowest, or not at all)."""
    attention = adapter_for(model.config).blocks(model)[layer].self_attn
    head_dim = D_MODEL // N_HEADS
    groups = N_HEADS // model.config.num_key_value_heads
    for head in range(N_HEADS):
        q = head * head_dim + head_dim - 1
        attention.q_proj.weight[q] = 0.0
        attention.q_proj.bias[q] = 10.0
        k = (head // groups) * head_dim + head_dim - 1
        attention.k_proj.weight[k] = 0.0
        attention.k_proj.bias[k] = 0.0
        attention.k_proj.weight[k, DIM] = 5.0


# Three router kinds with attention biases (for the planted sink heads): softmax then top-k (Qwen2-MoE), top-k of
# biased logits then softmax (gpt-oss), sigmoid with a correction bias and groups (GLM-4.5).
ROUTERS = ["qwen2_moe", "gpt_oss", "glm4_moe"]


@pytest.fixture(scope="module")
def pruned(tokenizer):
    found = {}
    for family in ROUTERS:
        model = planted_moe(family, tokenizer)
        plant_sink_heads(model, SINK_LAYER)
        if family == "glm4_moe":  # the planted expert's group must win its two-best sum even with its partner pruned
            router = MoeBlock.at(massact.wrap(model, tokenizer), LAYER).router
            with torch.no_grad():
                router.weight[[0, 1], TRIGGER] = -5.0  # the other group's experts score ~0 on the first token
        found[family] = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True, eval_text=EVAL)
    return found


@pytest.mark.parametrize("family", ROUTERS)
def test_the_planted_super_expert_is_found_and_pruning_it_removes_the_value_and_the_sink(family, pruned):
    report = pruned[family]
    s = report.mechanism.super_experts
    assert [(x.layer, x.expert) for x in s.found] == [(LAYER, EXPERT)]
    assert s.found[0].max_output == pytest.approx(s.profile[LAYER][EXPERT]) and s.found[0].max_output > 1000
    assert (s.rule.quantile, s.rule.fraction, s.rule.depth) == (0.995, 0.1, 0.75)
    others = [v for layer, row in enumerate(s.profile) for e, v in enumerate(row) if v == v and (layer, e) != (LAYER, EXPERT)]
    assert max(others) < s.rule.threshold
    assert report.causal.attention.sink_layers and SINK_LAYER in report.causal.attention.sink_layers  # the planted heads make a sink
    super_, control = report.causal.expert_pruning
    assert (super_.kind, super_.pruned) == ("super", [[LAYER, EXPERT]])
    assert control.kind == "random" and len(control.pruned) == 1 and control.pruned[0][0] == LAYER and control.pruned[0][1] != EXPERT
    assert super_.massive_dims == [] and control.massive_dims == [DIM]
    assert super_.sink_decay > 0.5 and abs(control.sink_decay) < 0.05  # the sink goes with the super expert only
    assert super_.sink_before[SINK_LAYER] > 0.9 and super_.sink_after[SINK_LAYER] < 0.5
    assert super_.perplexity is not None and control.perplexity is not None
    words = " ".join(report.conclusion)
    assert f"Super expert: expert {EXPERT} of block {LAYER}" in words and "Pruning them" in words
    from massact.report.plots import figures
    from test_visual import assert_png
    assert_png(figures(report)["super_experts.png"])


def test_the_control_is_seeded_and_keeps_the_blocks_and_counts():
    from massact.analysis.mechanism.results import SuperExpert
    from massact.analysis.mechanism.super_experts import control

    found = [SuperExpert(layer=1, expert=2, max_output=9.0), SuperExpert(layer=1, expert=5, max_output=8.0),
             SuperExpert(layer=3, expert=0, max_output=7.0)]
    first, again = control(found, 8), control(found, 8)
    assert first == again  # seeded
    assert [layer for layer, _ in first] == [1, 1, 3]
    assert not {(layer, e) for layer, e in first} & {(1, 2), (1, 5), (3, 0)}
    assert control(found, 8, seed=1) != first


def test_learned_sinks_are_measured_per_head_beside_the_first_token(tokenizer):
    """gpt-oss: each head's learned sink logit joins the softmax. Set to +20 on head 0 of every block it takes nearly
    all the attention; at -30 on head 1, none; the first token's share is what the probabilities leave on it."""
    model = tiny_model("gpt_oss", len(tokenizer))
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.sinks[0] = 20.0
            block.self_attn.sinks[1] = -30.0
    report = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True, eval_text=EVAL)
    a = report.causal.attention
    assert not report.findings.dims and a.tokens and all(t.position == 0 for t in a.tokens)  # nothing massive: the first tokens
    assert all(row[0] > 0.99 and row[1] < 1e-6 for row in a.learned_sink)
    assert all(row[0] < 0.01 for row in a.first_token) and all(0 < row[1] <= 1 for row in a.first_token)
    assert "learned sinks (a logit per head that joins the softmax): they take" in a.mixing
    assert "the model does not grow a massive activation" in a.mixing


def test_track_follows_the_super_experts_across_checkpoints(tokenizer, tmp_path):
    """A Trainer folder of a planted Qwen3-MoE: at step 100 expert 2 of block 1 writes the massive value; at step 200
    expert 3 does instead (the router prefers it on the first token, and expert 2's neuron no longer writes)."""
    import json

    from massact.cli import main
    from test_families import expert_rows

    for step in (100, 200):
        model = planted_moe("qwen3_moe", tokenizer)
        if step == 200:
            moe = model.model.layers[LAYER].mlp
            with torch.no_grad():
                moe.experts.down_proj[EXPERT, DIM, NEURON] = 0.0
                moe.gate.weight[3, TRIGGER] = 6.0
                fused, gate, up = expert_rows(moe.experts, 3, NEURON, MoeBlock.at(massact.wrap(model, tokenizer), LAYER).spec.experts)
                fused[[gate, up]] = 0.0
                fused[[gate, up], TRIGGER] = 2.0
                moe.experts.down_proj[3, DIM, NEURON] = 100.0
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
        tokenizer.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    assert main(["track", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--format", "json", "--quiet"]) == 0
    data = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))
    assert [c["super_experts"] for c in data["checkpoints"]] == [[[LAYER, EXPERT]], [[LAYER, 3]]]
    assert f"expert {EXPERT} of block {LAYER} is a super expert from step 100" in data["events"]
    assert f"expert 3 of block {LAYER} is a super expert from step 200" in data["events"]
    assert f"expert {EXPERT} of block {LAYER} is no longer a super expert at step 200" in data["events"]


@torch.no_grad()
def test_activation_quantization_reaches_the_experts_inputs_and_activations(tokenizer):
    """int8 activations in a mixture of experts: besides every linear projection's input, each expert's input rows
    (its routed tokens, d_model wide) and its neurons' activations (d_mlp wide) are quantized."""
    from conftest import D_MLP
    from massact.analysis.deploy.quant import ActivationQuant

    lm = massact.wrap(planted_moe("mixtral", tokenizer), tokenizer)
    quant = ActivationQuant(lm, per_token=True, keep_massive=False)
    widths = []
    original = quant._quantize
    quant._quantize = lambda x, positions=None: widths.append((x.shape[-1], positions is not None)) or original(x, positions)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with quant.active():
        lm.model(ids)
    assert (D_MLP, True) in widths and (D_MODEL, True) in widths  # an expert's activations and its input rows
    assert quant.error_total > 0


def test_a_shared_expert_beside_the_mixture_adds_up_to_the_summed_mlp_output(tokenizer):
    """Granite-4.0-H with experts adds its shared MLP (a sibling of ``block_sparse_moe`` in the decoder layer) to the
    routed experts' output: at every dim of a token, the routed experts' and the shared expert's contributions sum to
    mlp_raw, read by plain hooks on the two modules (experts' output + shared_mlp's), and the shared part counts."""
    from massact.analysis.mechanism.expert_attribution import attribute_moe

    lm = massact.wrap(tiny_model("granitemoehybrid_moe", len(tokenizer), seed=2), tokenizer)
    layer, position = 1, 3
    block, seen = lm.model.model.layers[layer], {}
    hooks = [block.post_attention_layernorm.register_forward_hook(lambda m, args, output: seen.__setitem__("x", output[0, position])),
             block.block_sparse_moe.register_forward_hook(lambda m, args, output: seen.__setitem__("moe", output[0, position])),
             block.shared_mlp.register_forward_hook(lambda m, args, output: seen.__setitem__("shared", output[0, position]))]
    try:
        with torch.no_grad():
            lm.model(tokenizer(TEXTS[0], return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    moe = MoeBlock.at(lm, layer)
    for dim in range(0, D_MODEL, 8):
        result = attribute_moe(moe, lm.adapter.family, seen["x"], dim)
        expected = float(seen["moe"][dim] + seen["shared"][dim])
        assert result.shared_expert is not None and result.shared_expert.expert is None
        assert result.output == pytest.approx(expected, rel=1e-4, abs=1e-6) and result.error < 1e-4
        assert result.shared_expert.contribution == pytest.approx(float(seen["shared"][dim]), rel=1e-4, abs=1e-6)
    assert seen["shared"].abs().max() > 0.1 * seen["moe"].abs().max()
