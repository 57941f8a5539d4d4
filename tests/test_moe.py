"""MoE attribution against the real transformers MoE blocks: the float64 recomputation from the fused expert weights
must sum to the block's hooked output, follow the router's own top-k rule, and name a planted expert and neuron."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from massact.analysis.mechanism.expert_attribution import attribute_moe as attribute
from massact.capture.routing import MoeBlock
from massact.models.adapters import adapter_for
from massact.models.loading import LoadedModel

D_MODEL, D_MLP, EXPERTS, TOP_K, LAYER, POSITION = 64, 128, 4, 2, 1, 3


def tiny_moe(family: str, norm_topk_prob: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=400,
        hidden_size=D_MODEL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=64,
    )
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=D_MLP, num_local_experts=EXPERTS, **common))
    else:
        config = Qwen2MoeConfig(
            intermediate_size=D_MLP,
            moe_intermediate_size=D_MLP,
            shared_expert_intermediate_size=96,
            num_experts=EXPERTS,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=norm_topk_prob,
            **common,
        )
        model = Qwen2MoeForCausalLM(config)
    return model.eval()


def moe_block(model: torch.nn.Module, layer: int = LAYER) -> MoeBlock | None:
    """Block ``layer``'s mixture of experts as massact maps it (None for a dense block)."""
    return MoeBlock.at(LoadedModel(model, None, adapter_for(model.config), "tiny"), layer)


def attribute_moe(block: MoeBlock, x: torch.Tensor, dim: int, top: int = 10):
    return attribute(block, "tiny", x, dim, top)


def capture(model: torch.nn.Module, layer: int = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block's input and output [seq, d_model] during a real forward, taken by a hook on the block."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach()[0].clone()
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach()[0].clone()

    handle = model.model.layers[layer].mlp.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(10, 18).unsqueeze(0))
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def largest_dim(out: torch.Tensor) -> int:
    return int(out[POSITION].abs().argmax())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_contributions_sum_to_hooked_block_output(family):
    model = tiny_moe(family)
    block = moe_block(model)
    assert block is not None
    x, out = capture(model)
    dim = largest_dim(out)
    hooked = out[POSITION, dim].item()
    result = attribute_moe(block, x[POSITION], dim, top=5)

    parts = [e.contribution for e in result.experts] + ([result.shared_expert.contribution] if result.shared_expert else [])
    assert len(result.experts) == TOP_K
    assert sum(parts) == pytest.approx(result.output, rel=1e-12)
    assert result.output == pytest.approx(hooked, rel=1e-5)
    assert result.actual == pytest.approx(hooked, rel=1e-5)
    assert result.error < 1e-5
    assert sum(e.share for e in result.experts) + (result.shared_expert.share if result.shared_expert else 0) == pytest.approx(1.0)
    for entry in result.experts:
        assert entry.contribution == pytest.approx(entry.router_weight * entry.output, rel=1e-12)
    # a different dim gives a different sum, and it too matches the hook
    other = (dim + 1) % D_MODEL
    assert attribute_moe(block, x[POSITION], other).output == pytest.approx(out[POSITION, other].item(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_neurons_sum_to_expert_contribution(family):
    model = tiny_moe(family)
    block = moe_block(model)
    x, out = capture(model)
    dim = largest_dim(out)
    result = attribute_moe(block, x[POSITION], dim, top=D_MLP)
    entries = result.experts + ([result.shared_expert] if result.shared_expert else [])
    for entry in entries:
        assert entry.neuron_error < 1e-10
        total = sum(n.contribution for n in entry.neurons)  # top=D_MLP keeps every routed-expert neuron
        if entry.expert is not None:
            assert len(entry.neurons) == D_MLP
            assert total == pytest.approx(entry.contribution, rel=1e-9, abs=1e-15)
        magnitudes = [abs(n.contribution) for n in entry.neurons]
        assert magnitudes == sorted(magnitudes, reverse=True)
        first = entry.neurons[0]
        assert first.contribution == pytest.approx(entry.router_weight * first.activation * first.weight, rel=1e-12)
        assert first.share == pytest.approx(first.contribution / result.output, rel=1e-12)
    top = max(entries, key=lambda e: abs(e.contribution))
    assert result.top_expert == top.expert and result.neurons == top.neurons


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True)])
def test_selected_experts_are_router_top_k(family, norm):
    model = tiny_moe(family, norm_topk_prob=norm)
    block = moe_block(model)
    x, out = capture(model)
    router = block.router.weight.detach().double()
    for position in range(x.shape[0]):
        logits = router @ x[position].double()
        expected = logits.topk(TOP_K).indices.tolist()
        result = attribute_moe(block, x[position], largest_dim(out))
        assert [e.expert for e in result.experts] == expected
        probs = torch.softmax(logits, dim=-1)[expected]
        weights = probs / probs.sum() if norm else probs
        assert [e.router_prob for e in result.experts] == pytest.approx(probs.tolist(), rel=1e-12)
        assert [e.router_weight for e in result.experts] == pytest.approx(weights.tolist(), rel=1e-12)
        assert [e.router_logit for e in result.experts] == pytest.approx(logits[expected].tolist(), rel=1e-12)
    total = sum(e.router_weight for e in result.experts)
    assert total == pytest.approx(1.0) if norm else total < 1.0


def plant_routed(moe: MoeBlock, x: torch.Tensor, expert: int, neuron: int, dim: int) -> int:
    """Expert ``expert``'s neuron reads x's largest input dim K (gate and up) and writes 500 x into ``dim``; the
    router's row for ``expert`` reads K strongly, so the token goes to it. Returns K."""
    trigger = int(x.abs().argmax())
    sign = float(x[trigger].sign())
    block = moe.block
    with torch.no_grad():
        block.gate.weight[expert] = 0.0
        block.gate.weight[expert, trigger] = 10.0 * sign
        block.experts.gate_up_proj[expert, neuron] = 0.0
        block.experts.gate_up_proj[expert, neuron, trigger] = 4.0 * sign
        block.experts.gate_up_proj[expert, D_MLP + neuron] = 0.0
        block.experts.gate_up_proj[expert, D_MLP + neuron, trigger] = 4.0 * sign
        block.experts.down_proj[expert, dim, neuron] = 500.0
    return trigger


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_planted_expert_neuron_and_super_weight(family):
    expert, neuron, dim = 2, 77, 20
    model = tiny_moe(family, norm_topk_prob=True)
    block = moe_block(model)
    x, _ = capture(model)
    plant_routed(block, x[POSITION], expert, neuron, dim)
    x_after, out = capture(model)
    assert torch.equal(x, x_after)  # the plant is in this block: its input is unchanged
    assert abs(out[POSITION, dim].item()) > 1000  # the planted neuron really writes a massive value

    result = attribute_moe(block, x[POSITION], dim)
    assert result.output == pytest.approx(out[POSITION, dim].item(), rel=1e-5)
    assert result.experts[0].expert == expert and result.experts[0].router_weight > 0.99
    assert result.top_expert == expert
    assert result.neurons[0].neuron == neuron
    assert result.neurons[0].weight == 500.0
    assert result.neurons[0].share > 0.99
    weight = result.super_weight
    assert (weight.matrix, weight.index, weight.expert, weight.neuron) == (f"model.layers.{LAYER}.mlp.experts.down_proj",
                                                                           [expert, dim, neuron], expert, neuron)
    assert model.get_parameter(weight.matrix)[tuple(weight.index)].item() == weight.value == 500.0
    assert weight.rank == 1 and weight.entries == EXPERTS * D_MODEL * D_MLP
    # every token: the recomputation matches the hook, and wherever the output is massive the plant wrote it
    for position in range(x.shape[0]):
        each = attribute_moe(block, x[position], dim)
        assert each.output == pytest.approx(out[position, dim].item(), rel=1e-5, abs=1e-6)
        if abs(each.output) > 1000:
            assert (each.top_expert, each.neurons[0].neuron) == (expert, neuron)


def test_qwen2_moe_shared_expert_is_included():
    model = tiny_moe("qwen2_moe")
    block = moe_block(model)
    x, out = capture(model)
    dim = largest_dim(out)
    result = attribute_moe(block, x[POSITION], dim)
    shared = result.shared_expert
    assert shared is not None and shared.expert is None
    xs = x[POSITION].double()
    gate = torch.sigmoid(block.shared_gate.weight.double().reshape(-1) @ xs).item()
    with torch.no_grad():
        raw = block.shared(x[POSITION].unsqueeze(0))[0, dim].item()
    assert shared.router_weight == pytest.approx(gate, rel=1e-12)
    assert shared.output == pytest.approx(raw, rel=1e-5)
    assert shared.contribution == pytest.approx(gate * raw, rel=1e-5)
    routed = sum(e.contribution for e in result.experts)
    assert abs(shared.contribution) > 1e-3 * abs(routed)  # it matters: leaving it out would miss the hook
    assert routed + shared.contribution == pytest.approx(out[POSITION, dim].item(), rel=1e-5)
    assert routed != pytest.approx(out[POSITION, dim].item(), rel=1e-5)
    assert attribute_moe(moe_block(tiny_moe("mixtral")), x[POSITION], dim).shared_expert is None


def test_planted_shared_expert_neuron_is_the_super_weight():
    neuron, dim = 11, 30
    model = tiny_moe("qwen2_moe")
    block = moe_block(model)
    x, _ = capture(model)
    xs = x[POSITION]
    trigger = int(xs.abs().argmax())
    sign = float(xs[trigger].sign())
    with torch.no_grad():
        shared = block.shared
        shared.gate_proj.weight[neuron] = 0.0
        shared.gate_proj.weight[neuron, trigger] = 4.0 * sign
        shared.up_proj.weight[neuron] = 0.0
        shared.up_proj.weight[neuron, trigger] = 4.0 * sign
        shared.down_proj.weight[dim, neuron] = -300.0
    _, out = capture(model)
    result = attribute_moe(block, xs, dim)
    assert out[POSITION, dim].item() < -100
    assert result.output == pytest.approx(out[POSITION, dim].item(), rel=1e-5)
    assert result.top_expert is None and result.neurons[0].neuron == neuron
    weight = result.super_weight
    assert (weight.matrix, weight.index, weight.value) == (f"model.layers.{LAYER}.mlp.shared_expert.down_proj.weight",
                                                           [dim, neuron], -300.0)
    assert model.get_parameter(weight.matrix)[tuple(weight.index)].item() == -300.0


def test_a_dense_block_has_no_experts_and_one_token_is_asked():
    """Qwen2-MoE with block 0 dense (mlp_only_layers): massact maps no experts there; attribution takes one token."""
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=400, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=D_MLP, moe_intermediate_size=D_MLP,
                                               shared_expert_intermediate_size=96, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                               mlp_only_layers=[0]))
    assert moe_block(model, 0) is None and moe_block(model, 1) is not None
    with pytest.raises(ValueError, match="one token"):
        attribute_moe(moe_block(model, 1), torch.zeros(2, D_MODEL), 0)


# The hybrids' expert blocks: Jamba's (softmax, top-k, not renormalised), Kimi-Linear's and Nemotron-H's (sigmoid with a
# correction bias, groups, renormalised and scaled), Nemotron-H's latent experts with biases (mlp_bias) beside them.
HYBRID_EXPERTS = ["jamba_moe", "kimi_linear_moe", "nemotron_h_moe", "nemotron_h_latent"]


@pytest.mark.parametrize("family", HYBRID_EXPERTS)
def test_a_hybrids_expert_blocks_add_up_at_every_dim_on_a_padded_batch(family, tokenizer):
    """A random model (its biases random where it has them) on a padded batch: at every expert block and real token,
    the experts, the shared expert and the latent out-projection's bias sum, dim by dim, to the block's output in the
    model's own forward; the experts are the router's own choice."""
    from conftest import tiny_model
    from massact.capture.batches import pad_batch
    from massact.capture.routing import model_routing, route

    model = tiny_model(family, len(tokenizer), seed=2)
    lm = LoadedModel(model, tokenizer, adapter_for(model.config), "tiny")
    blocks = {layer: MoeBlock.at(lm, layer) for layer in range(model.config.num_hidden_layers)}
    blocks = {layer: moe for layer, moe in blocks.items() if moe is not None}
    seen = {}
    hooks = [moe.block.register_forward_hook(lambda m, args, out, layer=layer: seen.__setitem__(layer, (args[0].detach(), out.detach())))
             for layer, moe in blocks.items()]
    ids, mask = pad_batch([tokenizer(text, return_tensors="pt").input_ids for text in ["Summer is warm. Winter is cold.", "A map."]])
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert blocks and set(seen) == set(blocks)
    for layer, moe in blocks.items():
        x, out = seen[layer]
        real = mask.bool()
        x, out = x[real], out[real]
        indices, _ = model_routing(moe, x)
        for token in (0, 3, len(x) - 1):  # the first text's first and fourth, the second's last (beside its padding)
            split = [attribute_moe(moe, x[token], dim) for dim in range(D_MODEL)]
            recomputed = torch.tensor([s.output for s in split], dtype=torch.float64)
            torch.testing.assert_close(recomputed, out[token].double(), rtol=1e-4, atol=1e-6)
            recomputed_choice = sorted(route(moe, x[token:token + 1]).indices[0].tolist())
            assert sorted(e.expert for e in split[0].experts) == sorted(indices[token].tolist()) == recomputed_choice
            if moe.latent_out is not None:  # the bias the weighted sum passes through once is part of the sum
                assert [s.bias for s in split] == moe.latent_out.bias.double().tolist() != [0.0] * D_MODEL
