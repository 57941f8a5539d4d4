"""The mechanism on planted chains whose every link is known by construction: lifeline phases, the trigger's sources
and chain, patching, the iterative super weights; and the decomposition sums on every kind of block."""

import pytest
import torch
import transformers

import massact
from conftest import TRIGGER, plant_mlp, tiny_config, tiny_model, weights_hash
from massact.analysis.trigger.decompose import Target, split
from massact.models.adapters import adapter_for

MARK, DIM = 30, 20  # the dim block 0 marks the first token in, and the dim that becomes massive
M, P, B, C, E = 11, 12, 37, 38, 50  # neurons: the marker (block 0), precursor (1), two writers (2), the eraser (4)
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold.", "A good map shows you where you are."]


def _rows(model, layer: int, neuron: int, reads: int, weight: float) -> None:
    """The neuron's gate and up read only the residual dim ``reads``."""
    adapter = adapter_for(model.config)
    for site in ("mlp_gate", "mlp_up"):
        rows, _ = adapter.input_rows(model, layer, site)
        rows[neuron] = 0.0
        rows[neuron, reads] = weight


def _writes(model, layer: int, neuron: int, dim: int, weight: float) -> None:
    """The neuron writes ``weight`` x its activation into ``dim`` and nothing anywhere else."""
    adapter = adapter_for(model.config)
    down = adapter.weight_out_in(adapter.module(model, layer, adapter.mlp_down))
    down[:, neuron] = 0.0
    down[dim, neuron] = weight


@torch.no_grad()
def planted_chain(tokenizer, erase: float = 0.999):
    """A 6-block Llama: BOS carries TRIGGER in its embedding; block 0's neuron M reads it and marks BOS in MARK; block 1's
    neuron P writes a small precursor into DIM; block 2's neurons B and C read MARK and write DIM (B x 100, C x 60: the
    birth); block 4's neuron E reads DIM and takes ``erase`` of it off (the erasure: 99.9%). Nothing else writes TRIGGER, MARK or
    DIM."""
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = adapter_for(model.config)
    embedding = model.get_input_embeddings().weight
    embedding[:, [TRIGGER, MARK, DIM]] = 0.0
    embedding[tokenizer.bos_token_id, TRIGGER] = 10.0
    for layer in range(config.num_hidden_layers):
        for path in (adapter.attn_proj, adapter.mlp_down):
            adapter.weight_out_in(adapter.module(model, layer, path))[[TRIGGER, MARK, DIM]] = 0.0
    _rows(model, 0, M, TRIGGER, 2.0)
    _writes(model, 0, M, MARK, 0.02)
    _rows(model, 1, P, TRIGGER, 2.0)
    _writes(model, 1, P, DIM, 0.03)
    _rows(model, 2, B, MARK, 3.0)
    _writes(model, 2, B, DIM, 100.0)
    _rows(model, 2, C, MARK, 2.0)
    _writes(model, 2, C, DIM, 60.0)
    _rows(model, 4, E, DIM, 2.0)
    _writes(model, 4, E, DIM, 0.0)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with massact.Trace(model, adapter, [(4, "resid_in"), (4, "mlp_act")]) as trace:
        model(ids)
    value, act = float(trace[4, "resid_in"][0, 0, DIM]), float(trace[4, "mlp_act"][0, 0, E])
    _writes(model, 4, E, DIM, -erase * value / act)
    return model


@pytest.fixture(scope="module")
def chain_report(tokenizer):
    model = planted_chain(tokenizer)
    before = weights_hash(model)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer, min_abs=1.0, verify=True, eval_text=" ".join(TEXTS * 4))
    assert weights_hash(model) == before  # every patch and every zeroed super weight was written back
    return report


def test_lifeline_names_each_planted_phase(chain_report):
    assert [d.dim for d in chain_report.findings.dims] == [DIM]
    line = chain_report.mechanism.lifelines[0]
    assert (line.dim, line.position, line.token) == (DIM, 0, "<s>")
    assert [s.phase for s in line.steps] == ["", "precursor", "birth", "hold", "erasure", "after"]
    assert [(p.name, p.first, p.last, p.writer) for p in line.phases] == [
        ("precursor", 1, 1, "mlp"), ("birth", 2, 2, "mlp"), ("hold", 3, 3, ""), ("erasure", 4, 4, "mlp"), ("after", 5, 5, "")]
    assert line.erased_at == [4] and line.removed_at == [4] and line.removal_causes == ["value"]
    assert line.precursor_layer == 1 and 1.0 <= line.precursor < 20.0 and not line.steps[1].massive
    assert line.peak_layer in (2, 3) and line.steps[4].change == pytest.approx(-0.999 * line.steps[3].value, rel=1e-3)
    assert line.error < 1e-4
    for step in line.steps:  # the terms add up to the value at every block
        assert step.resid_in + step.attn + step.mlp == pytest.approx(step.value, rel=1e-4, abs=1e-6)
    # Every block the lifeline names is explained: the precursor's and the eraser's neurons too.
    top = {(a.layer, a.role): a.neurons[0].neuron for a in chain_report.mechanism.attribution}
    assert top == {(1, "precursor"): P, (2, "birth"): B, (4, "erasure"): E}
    assert {(o.layer, o.role, o.writer) for o in chain_report.mechanism.origin} == {(1, "precursor", "mlp"), (2, "birth", "mlp"),
                                                                          (4, "erasure", "mlp")}


@pytest.mark.parametrize("erase", [1.005, 2.5])
def test_an_eraser_through_zero_keeps_the_sign_of_birth(tokenizer, erase):
    """Block 4's eraser takes ``erase`` x the value off: at 1.005 it overshoots to -0.5% of it (not massive); at 2.5 to
    -1.5x, massive again with the other sign and larger than the birth value (a reversal, a new event)."""
    report = massact.scan(planted_chain(tokenizer, erase), TEXTS, tokenizer=tokenizer, min_abs=100.0, verify=False)
    line = report.mechanism.lifelines[0]
    held = line.steps[3].value
    assert line.steps[4].value == pytest.approx(-(erase - 1) * held, rel=1e-3)
    assert line.sign == 1 and line.peak == pytest.approx(held) and line.peak_layer in (2, 3)
    reversal = erase > 2
    assert [s.phase for s in line.steps] == ["", "", "birth", "hold", "reversal" if reversal else "erasure",
                                             "hold" if reversal else "after"]
    origins = {(o.layer, o.role): o.writer for o in report.mechanism.origin}
    assert origins == {(2, "birth"): "mlp", (4, "reversal" if reversal else "erasure"): "mlp"}
    for (layer, _), who in origins.items():  # the lifeline's writer is the origin's at every event
        assert line.steps[layer].writer == who
    top = {(a.layer, a.role): (a.neurons[0].neuron, a.super_weight.row, a.super_weight.col) for a in report.mechanism.attribution}
    assert top[2, "birth"] == (B, DIM, B) and top[4, "reversal" if reversal else "erasure"] == (E, DIM, E)
    words = " ".join(report.conclusion)
    if reversal:
        assert line.erased_at == [] and "At block 4 it is massive again with the other sign: block 4's MLP" in words
    else:
        assert line.erased_at == [4] and "Block 4 overshoots: it takes the value through zero" in words


def test_trigger_names_the_planted_source_and_chain(chain_report):
    trigger = chain_report.trigger[0]
    writers = {(n.layer, n.neuron) for n in trigger.neurons}
    assert writers == {(2, B), (2, C)}
    gate = next(n for n in trigger.neurons if n.neuron == B).splits[0]
    assert gate.site == "mlp_gate" and gate.error < 1e-4
    assert gate.sources[0].source == "block 0 MLP"
    assert gate.sources[0].here == pytest.approx(gate.value, rel=1e-4)  # B reads MARK only, and only block 0 writes it
    assert abs(gate.sources[0].others_mean) < 1e-3
    assert sum(s.here for s in gate.sources) == pytest.approx(gate.value, rel=1e-4)
    chain = [(link.kind, link.layer, link.index) for link in trigger.chain]
    assert chain == [("neuron", 2, B), ("neuron", 0, M), ("token embedding", None, None)]
    assert trigger.chain[1].source == "block 0 MLP"
    assert trigger.carriers.verdict == "token"  # BOS moved to position 1 still carries it, another token at 0 does not
    assert trigger.carriers.moved_massive and not trigger.carriers.swapped_massive


def test_patching_the_planted_source_removes_the_massive_value(chain_report):
    patches = chain_report.trigger[0].patching
    marker = [p for p in patches if p.source == "block 0 MLP"]
    assert {p.replacement for p in marker} == {"mean of the other positions", "zero"}
    for p in marker:  # what is left is the precursor, which block 1 writes without the mark
        assert not p.still_massive and abs(p.value_birth) < 20.0 and p.pre_activation == 0.0
        assert p.direct == pytest.approx(p.total, rel=1e-3)  # nothing between block 0 and the neuron reroutes MARK
    idle = [p for p in patches if p.source != "block 0 MLP"]  # sources with no part in the gate: a control
    assert idle and all(p.still_massive and abs(p.direct) < 1e-6 for p in idle)


def test_iterative_super_weights_find_each_planted_weight_in_order(chain_report):
    steps = chain_report.causal.super_weights
    assert [(s.step, s.neuron, s.weight.row, s.weight.col) for s in steps] == [(1, B, DIM, B), (2, C, DIM, C)]
    assert [s.weight.value for s in steps] == [pytest.approx(100.0), pytest.approx(60.0)]
    assert [s.weight.rank for s in steps] == [1, 2]  # ranks in the unmodified matrix
    assert steps[0].still_massive and not steps[1].still_massive
    assert steps[1].perplexity_ratio is not None and steps[0].perplexity is not None
    text = " ".join(chain_report.conclusion)
    assert "precursor" in text and "erased by block 4's MLP" in text and f"through neuron {M}" in text


def test_position_embedding_trigger_is_a_position_effect(tokenizer):
    """GPT-2 with the trigger in position 0's embedding instead of BOS's token embedding: any first token carries it."""
    model = tiny_model("gpt2", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, 1, 37, DIM)
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.bos_token_id, TRIGGER] = 0.0
        model.transformer.wpe.weight[0, TRIGGER] = 10.0
    report = massact.scan(model, TEXTS, tokenizer=tokenizer)
    trigger = report.trigger[0]
    assert trigger.carriers.verdict == "position" and trigger.carriers.swapped_massive and not trigger.carriers.moved_massive
    split_ = trigger.neurons[0].splits[0]
    assert split_.sources[0].source == "position embedding" and split_.error < 1e-4
    assert trigger.chain[-1].kind == "position embedding"


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "neox", "bert", "opt-postln", "phi3", "falcon", "olmo2", "cohere2", "lfm2",
                                    "qwen3_next", "granite", "olmo"])
def test_sources_sum_to_the_pre_activation_on_every_block_kind(family, tokenizer):
    """Pre-LN, sandwich, reordered-norm, parallel, post-LN, hybrid, branch-scaled (Granite) blocks and LayerNorms that
    do not state their eps (OLMo): the split is exact at every position, and a chain step's units (neurons, heads) add
    up to the source they split; a convolution or a linear attention is one source of its own, not split into heads."""
    from massact.analysis.trigger.decompose import units

    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=1), tokenizer)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    site = "mlp_gate" if lm.adapter.gated else "mlp_up"
    (piece,), at = split(lm, ids, [Target(3, 5, site)], 2)
    assert piece.error < 1e-4
    assert float((sum(piece.parts.values()) - piece.value).abs().max()) < 1e-4 * float(piece.value.abs().max())
    mixers = {"lfm2": "convolution", "qwen3_next": "linear attention"}
    for label in ("block 2 MLP", "block 1 attention"):
        if family == "qwen3_next" and label == "block 1 attention":  # block 1 is a Gated DeltaNet: one whole source
            label = "block 1 linear attention"
            assert units(lm, piece.terms[label], 1.0, at) == ([], pytest.approx(float("nan"), nan_ok=True))
            continue
        found, total = units(lm, piece.terms[label], float(piece.factors[label][2]), at)
        assert total == pytest.approx(float(piece.parts[label][2]), rel=1e-4, abs=1e-7)
        assert found[0].kind == ("neuron" if label.endswith("MLP") else "head")
    if family in mixers:
        assert f"block 0 {mixers[family]}" in piece.parts
    if family == "granite":  # block 0's input is the token embedding times the embedding multiplier: no other part
        assert "token embedding" in piece.parts and "position embedding" not in piece.parts


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_a_shared_expert_neuron_splits_against_its_projections(family, tokenizer):
    """A shared expert's neuron (the trigger's target where the shared expert writes most): its gate and up
    pre-activations, split into sources, add up at every position to what hooks on its gate and up projections see."""
    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=1), tokenizer)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    layer = next(layer for layer in range(lm.config.num_hidden_layers) if lm.at(layer).moe is not None and layer > 0)
    moe = lm.at(layer).moe
    seen = {}
    handles = [lm.adapter.module(lm.model, layer, f"{moe.block}.{moe.shared.part(name)}").register_forward_hook(
        lambda _module, _args, output, site=site: seen.__setitem__(site, output.detach().reshape(-1, output.shape[-1]).double()))
        for site, name in (("mlp_gate", moe.shared.gate), ("mlp_up", moe.shared.up))]
    try:
        pieces, _ = split(lm, ids, [Target(layer, 5, site, shared=True) for site in ("mlp_gate", "mlp_up")], 2)
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    for piece in pieces:
        hooked = seen[piece.target.site][:, 5]
        assert piece.error < 1e-5 and piece.target.key == (layer, piece.target.site, "shared", 5)
        assert float((sum(piece.parts.values()) - hooked).abs().max()) < 1e-5 * float(hooked.abs().max())


@pytest.mark.parametrize("family", ["gemma2", "bert", "neox", "olmo2", "lfm2", "qwen3_next"])
def test_lifeline_adds_up_on_every_block_kind(family, tokenizer):
    """Sandwich, post-LN and parallel blocks, planted as in test_families: the terms add up at every block; in a
    post-LN model the next block's LayerNorms are what erase the value."""
    from test_families import LAYER, planted

    report = massact.scan(planted(family, tokenizer), TEXTS, tokenizer=tokenizer)
    line = next(x for x in report.mechanism.lifelines if x.dim == DIM)
    assert line.error < 1e-4 and line.steps[LAYER].phase == "birth" and line.steps[LAYER].writer == "mlp"
    for step in line.steps:
        assert step.resid_in + step.attn + step.mlp + (step.norm or 0.0) == pytest.approx(step.value, rel=1e-4, abs=1e-6)
    if family == "bert":
        assert (line.steps[LAYER + 1].phase, line.steps[LAYER + 1].writer) == ("erasure", "norm")
        assert line.erased_at == line.removed_at == [LAYER + 1]
    else:
        assert line.erased_at == [] and all(s.phase == "hold" for s in line.steps[LAYER + 1 :])


@pytest.mark.parametrize("family", ["llama", "lfm2"])
def test_a_heads_strongest_keys_come_from_a_pass_that_stops_at_its_block(family, tokenizer):
    """The chain's head (``attends``) runs the model only to the head's block, whose attention is then the whole eager
    pass's (``attention_pass``): the same keys, tokens and probabilities, and no later block runs; on a hybrid, at
    each softmax block between its convolutions."""
    from massact.analysis.trigger.trigger import attends
    from massact.capture.attention import attention_pass, softmax_layers

    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=1), tokenizer)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    whole = attention_pass(lm, ids).maps
    ran: list[int] = []
    blocks = lm.adapter.blocks(lm.model)
    handles = [block.register_forward_hook(lambda *_, layer=layer: ran.append(layer)) for layer, block in enumerate(blocks)]
    try:
        for layer in softmax_layers(lm):
            ran.clear()
            found = attends(lm, ids, layer, 1, 4, tokens)
            row = whole[layer][0, 1, 4].float()
            order = row.argsort(descending=True)[:3].tolist()
            assert [key for key, _, _ in found] == order and [token for _, token, _ in found] == [tokens[k] for k in order]
            assert [p for _, _, p in found] == pytest.approx(row[order].tolist(), rel=1e-6)
            assert ran == list(range(layer + 1))
    finally:
        for handle in handles:
            handle.remove()
    assert len(softmax_layers(lm)) == (len(blocks) if family == "llama" else 2)
