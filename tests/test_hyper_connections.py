"""Hyper-connections (DeepSeek-V4, HY-V4, Qwen4-exp): the block state is 4 streams. The pieces massact reads add up
against transformers' own hidden states; a value planted in one stream, through a write weight that writes only that
stream, is found in that stream, born by its writer and carried on by the mixing weight that keeps it there; the hash
router's choice is recomputed from the token ids; and scan -> verify -> quant -> compare runs on one of them."""

import json

import pytest
import torch

from conftest import HYPER_FAMILIES, TRIGGER, tiny_model
from massact.analysis.deploy import quant
from massact.analysis.deploy.quant import Setting
from massact.capture.batches import pad_batch
from massact.capture.edits import ablate_neurons, read_coordinate, set_weight
from massact.capture.hooks import Trace, tap_final
from massact.capture.routing import MoeBlock, model_routing, route
from massact.capture.streams import probe_streams
from massact.cli import main
from massact.models.adapters import adapter_for
from massact.models.loading import wrap
from massact.report.schema import load_profile, load_report

STREAMS, LAYER, NEURON, DIM, STREAM = 4, 1, 7, 20, 2  # the planted value: block 1's MLP writes dim 20 into stream 2 only
TEXTS = ["The sun rose over the hills.", "Rain fell all day long and the river rose high."]
EVAL = ("The old house stood at the end of the lane. Its windows were dark, and the garden had grown wild over many "
        "summers. People in the village said that nobody had lived there for years.")


def _lm(family, tokenizer, model=None):
    return wrap(model if model is not None else tiny_model(family, len(tokenizer)), tokenizer, name=family)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of two computation orders: 1e-5 of the larger magnitude."""
    return bool((a - b).abs().max() <= 1e-5 * max(float(a.abs().max()), float(b.abs().max()), 1.0))


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_streams_add_up_against_transformers(family, tokenizer):
    """On a padded batch: each block's input and output streams are transformers' hidden states; "resid_out.s2" is
    stream 2; every stream of resid_mid and resid_out is the mixing of the streams before it plus the sublayer's
    output through its write weight; the final read is what the final norm turns into the last hidden state."""
    lm = _lm(family, tokenizer)
    adapter = lm.adapter
    assert adapter is adapter_for(lm.model.config) and adapter.streams(lm.config) == STREAMS
    ids, mask = pad_batch([tokenizer(text, return_tensors="pt").input_ids for text in TEXTS])
    sites = [(layer, site) for layer in range(4) for site in ("resid_in", "resid_out", "resid_out.s2", "mlp_read", "mlp_in")]
    final = {}
    with torch.no_grad(), Trace(lm.model, adapter, sites) as trace, tap_final(lm.model, adapter, lambda t: final.update(read=t.clone())):
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    shape = lambda h: h.view(*h.shape[:2], STREAMS, -1)  # Qwen4-exp keeps the streams flat, [batch, positions, N x d]
    # transformers' hidden states: each block's input streams, then the last hidden state (after the final read)
    for layer in range(4):
        assert trace[layer, "resid_in"].shape == (2, ids.shape[1], STREAMS, 64)
        assert _close(trace[layer, "resid_in"][real], shape(out.hidden_states[layer])[real])
        assert torch.equal(trace[layer, "resid_out.s2"], trace[layer, "resid_out"][..., 2, :])
        if layer:
            assert torch.equal(trace[layer - 1, "resid_out"], trace[layer, "resid_in"])
        # the MLP reads its combination through its norm (read at the norm's input), or as it is (Qwen4-exp)
        path, direction = adapter.sites["mlp_read"]
        with torch.no_grad():
            read = adapter.module(lm.model, layer, path)(trace[layer, "mlp_read"]) if direction == "in" else trace[layer, "mlp_read"]
        assert _close(read[real], trace[layer, "mlp_in"][real])
    norm = adapter.hyper.final_norm
    with torch.no_grad():
        last = adapter.base(lm.model).get_submodule(norm)(final["read"]) if norm else final["read"]
    assert _close(last[real], out.hidden_states[4][real])
    text = ids[1:, : int(mask[1].sum())]
    position = text.shape[1] - 1
    probes = probe_streams(lm, text, list(range(4)), [0, position])
    for layer, probe in probes.items():
        for part, before, after in (("attn", "resid_in", "resid_mid"), ("mlp", "resid_mid", "resid_out")):
            mixed = torch.einsum("pjk,pjd->pkd", probe[f"{part}_mix"], probe[before])
            assert _close(mixed + probe[f"{part}_write"][..., None] * probe[f"{part}_out"][:, None], probe[after]), (layer, part)


@torch.no_grad()
def _isolate(model, bos: int) -> None:
    """Only BOS carries TRIGGER (10 in its embedding, in every stream) and no sublayer writes it."""
    adapter, config = adapter_for(model.config), model.config
    base = adapter.base(model)
    base.embed_tokens.weight[:, TRIGGER] = 0.0
    base.embed_tokens.weight[bos, TRIGGER] = 10.0
    for layer, block in enumerate(adapter.blocks(model)):
        here = adapter.at(config, layer)
        adapter.weight_out_in(block.get_submodule(here.attn_proj))[TRIGGER] = 0.0
        if here.moe is None:  # HY-V4's dense first block
            block.get_submodule(here.mlp_down).weight[TRIGGER] = 0.0
            continue
        moe = block.get_submodule(here.moe.block)
        moe.experts.down_proj[:, TRIGGER, :] = 0.0
        moe.get_submodule(here.moe.shared.path).down_proj.weight[TRIGGER] = 0.0


@torch.no_grad()
def _plant(model, bos: int, at: int = LAYER) -> None:
    """Only BOS carries TRIGGER and nothing writes it (``_isolate``); neuron NEURON of block ``at``'s MLP (its shared
    expert in a mixture) fires on it and writes DIM; block ``at``'s MLP connection writes into stream STREAM only, and
    from there on each stream carries itself (DeepSeek-V4's mixing made the identity)."""
    adapter, config = adapter_for(model.config), model.config
    _isolate(model, bos)
    here = adapter.at(config, at)
    mlp = adapter.module(model, at, here.mlp.path if here.moe is None else f"{here.moe.block}.{here.moe.shared.path}")
    for projection in (mlp.gate_proj, mlp.up_proj):
        projection.weight[NEURON] = 0.0
        projection.weight[NEURON, TRIGGER] = 0.5
    mlp.down_proj.weight[DIM, NEURON] = 100.0
    connection = adapter.module(model, at, adapter.hyper.mlp.path)
    if adapter.hyper.flat:  # Qwen4-exp: 2 sigmoid(w . normed / N), only TRIGGER (at BOS) moves it off 1
        weight = connection.block_inject_weight.weight
        weight.zero_()
        weight[:, [stream * 64 + TRIGGER for stream in range(STREAMS)]] = -40.0
        weight[STREAM, [stream * 64 + TRIGGER for stream in range(STREAMS)]] = 40.0
        return
    connection.fn[STREAMS : 2 * STREAMS] = 0.0  # post = magnitude x sigmoid(base): ~0 but in STREAM
    connection.base[STREAMS : 2 * STREAMS] = -30.0
    connection.base[STREAMS + STREAM] = 30.0
    if adapter.hyper.mlp.mix is not None:
        for block in adapter.blocks(model)[at:]:
            for hc in (block.attn_hc, block.ffn_hc):
                hc.fn[2 * STREAMS :] = 0.0
                hc.base[2 * STREAMS :] = (30.0 * torch.eye(STREAMS)).flatten()


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_a_value_planted_in_one_stream(family, tokenizer):
    """The scan finds DIM massive in stream s2 only (and in what the next sublayer reads), born at block LAYER; the
    stream origin names the MLP's write weight there and, one block on, the mixing weight that carries it in s2."""
    import massact

    model = tiny_model(family, len(tokenizer))
    _plant(model, tokenizer.bos_token_id)
    report = massact.scan(_lm(family, tokenizer, model), texts=TEXTS, verify=False)
    (summary,) = report.findings.dims
    # Qwen4-exp's sublayers read the streams each RMS-normed: what they read holds no massive value
    streams = ["s2"] if family == "qwen4_exp" else ["s2", "read"]
    assert (summary.dim, summary.born_at, summary.streams) == (DIM, LAYER, streams)
    assert {m.stream for m in report.findings.massive} == set(streams) and {m.position for m in report.findings.massive} == {0}
    stats = report.findings.layers[LAYER]
    assert [s.stream for s in stats.streams] == ["s0", "s1", "s2", "s3", "read"] and stats.top[0].stream == "s2"
    entry = next(m for m in report.findings.massive if m.layer == LAYER and m.stream == "s2")
    assert entry.ratio == pytest.approx(abs(entry.value) / stats.streams[STREAM].median, rel=1e-9)  # against its stream's median
    (line,) = report.mechanism.lifelines
    assert line.stream == "s2" and line.steps[LAYER].phase == "birth" and line.steps[LAYER].writer == "mlp"
    birth, carried = report.mechanism.streams[:2]
    assert (birth.layer, birth.stream, birth.carrier, birth.role) == (LAYER, "s2", "mlp", "write")
    # the write weight: 2 sigmoid(30) (DeepSeek-V4), hc_magnitude 2 x sigmoid(30) (HY-V4), 2 sigmoid(40 x ~8 / 4) (Qwen4-exp)
    assert next(t for t in birth.terms if t.source == "mlp").weight == pytest.approx(2.0, rel=1e-5)
    assert (carried.layer, carried.carrier, carried.role) == (LAYER + 1, "s2", "carry")
    assert next(t for t in carried.terms if t.source == "s2").weight == pytest.approx(1.0, rel=1e-5)
    assert max(birth.error, carried.error) < 1e-5
    assert any("stream s2" in sentence for sentence in report.conclusion)
    # inside the writer: the planted neuron of the shared expert, its super weight where it is stored, and the write
    # weight (~2) between the MLP's output and stream s2
    (expert,) = report.mechanism.experts
    split = expert.moe
    assert (expert.layer, expert.role, expert.stream, expert.position) == (LAYER, "birth", "s2", 0)
    assert split.top_expert is None and split.neurons[0].neuron == NEURON and split.error < 1e-4
    assert split.shared_expert.share == pytest.approx(1.0, abs=1e-3)  # the routed experts write nothing into DIM
    path = "shared_expert" if family == "qwen4_exp" else "shared_experts"
    weight = split.super_weight
    assert (weight.matrix, weight.index, weight.value, weight.rank) == (f"model.layers.{LAYER}.mlp.{path}.down_proj.weight",
                                                                       [DIM, NEURON], 100.0, 1)
    assert float(model.get_parameter(weight.matrix)[DIM, NEURON]) == 100.0  # the name and index as the model stores them
    assert expert.write == pytest.approx(2.0, rel=1e-5)
    assert expert.landed == pytest.approx(next(t.value for t in birth.terms if t.source == "mlp"), rel=1e-5)
    # the birth state: |a| of block LAYER's output in stream s2 on the carrier's text, the massive entry's value at BOS
    state = report.mechanism.birth_state
    assert (state.layer, state.text, state.dims) == (LAYER, 0, [DIM])
    assert state.magnitude[0][DIM] == pytest.approx(abs(entry.value), rel=1e-3)
    # the token view: DIM in stream s2 at every block and token, transformers' hidden states (block outputs before
    # the last, whose hidden state is after the final read), to 3 significant digits
    view = report.mechanism.token_values
    assert (view.dims, view.streams) == ([DIM], ["s2"])
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    values = view.values[view.texts.index(0)][0]
    for layer in range(3):
        real = hidden[layer + 1][0].view(ids.shape[1], STREAMS, -1)[:, STREAM, DIM]
        assert values[layer] == pytest.approx(real.tolist(), rel=5e-3, abs=1e-6)


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_the_trigger_through_the_streams_names_the_planted_token(family, tokenizer):
    """The trigger of the planted value: the shared expert's neuron NEURON, its gate read from the BOS token's
    embedding (dim TRIGGER) through the read weights, the chain ending there; BOS moved one position on keeps the value
    massive in s2, another token at position 0 does not (a token); patching the embedding at BOS (in every stream of
    block 0's input) takes the value off, patching a source with no part in the gate leaves it."""
    import massact
    from massact.analysis.trigger.decompose import Target
    from massact.analysis.trigger.patching import patch_sources
    from massact.analysis.trigger.streams import stream_split

    model = tiny_model(family, len(tokenizer))
    _plant(model, tokenizer.bos_token_id)
    lm = _lm(family, tokenizer, model)
    report = massact.scan(lm, texts=TEXTS, verify=False)
    (trigger,) = report.trigger
    neuron = trigger.neurons[0]
    assert (neuron.layer, neuron.neuron, neuron.expert, neuron.shared) == (LAYER, NEURON, None, True)
    gate = neuron.splits[0]
    assert gate.site == "mlp_gate" and gate.error < 1e-5 and gate.value > 1.0
    assert sum(s.here for s in gate.sources) == pytest.approx(gate.value, rel=1e-5)
    assert gate.sources[0].source == "token embedding" and gate.sources[0].here == pytest.approx(gate.value, rel=1e-3)
    assert [(link.kind, link.layer, link.index) for link in trigger.chain] == [("neuron", LAYER, NEURON),
                                                                              ("token embedding", None, None)]
    assert trigger.chain[0].shared and trigger.chain[1].feeds == pytest.approx(gate.sources[0].here)
    carriers = trigger.carriers
    assert carriers.verdict == "token" and carriers.moved_massive and not carriers.swapped_massive
    assert carriers.first_tokens == [["<s>", len(TEXTS)]]
    # the embedding's part of the gate at BOS, dim by dim: TRIGGER's (the planted 0.5 x 10, through the read weights)
    (line,) = report.mechanism.lifelines
    ids = tokenizer(TEXTS[line.text], return_tensors="pt").input_ids
    (piece,), _ = stream_split(lm, ids, [Target(LAYER, NEURON, "mlp_gate", shared=True)], line.position)
    embedding = model.get_input_embeddings().weight[ids[0, line.position]].detach().double()
    by_dim = piece.factors["token embedding"][line.position] * piece.terms["token embedding"].reader * embedding
    assert int(by_dim.abs().argmax()) == TRIGGER and float(by_dim.sum()) == pytest.approx(gate.value, rel=1e-3)
    patches = patch_sources(lm, ids, piece, line, report.findings.stream_medians("s2"), report.findings.criterion)
    embedded = [p for p in patches if p.source == "embedding (block 0 input)"]
    assert {p.replacement for p in embedded} == {"mean of the other positions", "zero"}
    assert all(not p.still_massive and p.direct == pytest.approx(p.total, rel=1e-3) for p in embedded)
    idle = [p for p in patches if p.source != "embedding (block 0 input)"]
    assert idle and all(p.still_massive and abs(p.direct) < 1e-3 * gate.value for p in idle)


@pytest.mark.parametrize("family", ["hy_v4", "deepseek_v4"])
def test_a_neuron_planted_in_block_0(family, tokenizer):
    """Planted in block 0: HY-V4's dense MLP (its neuron, super weight as stored, anatomy) and DeepSeek-V4's hash-routed
    mixture (the table's choice, recomputed from the token id). The verification's edits, read in stream s2: ablating
    the neuron and zeroing its super weight take the value off; ablating another neuron leaves it."""
    import massact

    model = tiny_model(family, len(tokenizer))
    _plant(model, tokenizer.bos_token_id, at=0)
    lm = _lm(family, tokenizer, model)
    report = massact.scan(lm, texts=TEXTS[:1], verify=False)
    (summary,) = report.findings.dims
    assert (summary.dim, summary.born_at) == (DIM, 0)
    birth = report.mechanism.streams[0]
    landed = next(t.value for t in birth.terms if t.source == "mlp")
    if family == "hy_v4":
        (attribution,) = report.mechanism.attribution
        assert (attribution.layer, attribution.stream, attribution.neurons[0].neuron) == (0, "s2", NEURON)
        assert attribution.error < 1e-4 and attribution.neurons[0].share == pytest.approx(1.0, abs=1e-3)
        assert attribution.write == pytest.approx(2.0, rel=1e-5) and attribution.landed == pytest.approx(landed, rel=1e-5)
        weight = attribution.super_weight
        assert (weight.matrix, weight.row, weight.col, weight.value, weight.rank) == ("model.layers.0.mlp.down_proj.weight", DIM,
                                                                                  NEURON, 100.0, 1)
        (anatomy,) = report.mechanism.anatomy
        assert anatomy.layer == 0 and anatomy.activation_impact.top[0].neuron == NEURON
        edits = {"neuron": ablate_neurons(lm, 0, [NEURON]), "weight": set_weight(lm, weight.matrix, (DIM, NEURON)),
                 "other": ablate_neurons(lm, 0, [NEURON + 1])}
    else:
        (expert,) = report.mechanism.experts
        split = expert.moe
        assert (expert.layer, expert.stream, split.top_expert, split.neurons[0].neuron) == (0, "s2", None, NEURON)
        table = model.model.layers[0].mlp.gate.tid2eid[tokenizer.bos_token_id]
        assert sorted(e.expert for e in split.experts) == sorted(table.tolist())
        assert split.error < 1e-4 and expert.landed == pytest.approx(landed, rel=1e-5)
        matrix = "model.layers.0.mlp.shared_experts.down_proj.weight"
        assert (split.super_weight.matrix, split.super_weight.index) == (matrix, [DIM, NEURON])
        edits = {"neuron": set_weight(lm, matrix, (slice(None), NEURON)), "weight": set_weight(lm, matrix, (DIM, NEURON)),
                 "other": set_weight(lm, matrix, (slice(None), NEURON + 1))}
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    assert read_coordinate(lm, ids, [0], 0, DIM, "s2")[0] == pytest.approx(birth.value, rel=1e-5)
    for name, edit in edits.items():
        with edit:
            value = read_coordinate(lm, ids, [0], 0, DIM, "s2")[0]
        assert (abs(value) < 1e-3 * abs(birth.value)) == (name != "other"), name


def test_a_head_planted_in_a_stream_block(tokenizer):
    """Qwen4-exp's softmax block 3: head HEAD reads TRIGGER into its value and writes it, x 50, into DIM; at BOS it
    attends to itself. The stream origin at birth names the attention and splits its output into heads, which add up
    to the attention's output at DIM (the "attn" term's input) and give HEAD all of it."""
    import massact

    head, layer = 1, 3
    model = tiny_model("qwen4_exp", len(tokenizer))
    _isolate(model, tokenizer.bos_token_id)
    config = model.config
    attention = model.model.layers[layer].self_attn
    kv_head = head // (config.num_attention_heads // config.num_key_value_heads)
    with torch.no_grad():
        attention.v_proj.weight[kv_head * config.head_dim, TRIGGER] = 5.0
        attention.o_proj.weight[DIM, head * config.head_dim] = 50.0
    report = massact.scan(_lm("qwen4_exp", tokenizer, model), texts=TEXTS, verify=False)
    (summary,) = report.findings.dims
    assert (summary.dim, summary.born_at) == (DIM, layer)
    birth = next(o for o in report.mechanism.streams if o.layer == layer)
    assert (birth.carrier, birth.role) == ("attn", "write") and birth.error < 1e-5
    attn = next(t for t in birth.terms if t.source == "attn")
    assert sum(h.contribution for h in birth.heads) == pytest.approx(attn.input, rel=1e-5)
    assert birth.heads[0].head == head and birth.heads[0].share == pytest.approx(1.0, abs=1e-3)
    assert any(f"head {head} gives 100% of the attention output" in sentence for sentence in report.conclusion)


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_the_trigger_split_adds_up_through_the_streams(family, tokenizer):
    """Untrained weights (the read, write and mixing weights all in play): neurons of block 3's shared expert, of a
    routed expert of block 2 and (HY-V4) of block 0's dense MLP, each pre-activation split into the embedding and every
    sublayer before it. The parts add up, at every position, to what hooks on the gate and up projections see (for the
    routed expert: the MoE block's input through the expert's rows of gate_up_proj); and each term's reader, dotted with
    its source as a hook reads it, gives the source's part at the position. A softmax attention's part splits into
    heads that add up to it (the chain's next link); DeepSeek-V4's grouped output projection does not split."""
    from massact.analysis.trigger.decompose import Target, units
    from massact.analysis.trigger.streams import stream_split

    lm = _lm(family, tokenizer, tiny_model(family, len(tokenizer), seed=1))
    config, position, neuron, expert = lm.config, 3, 5, 1
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    targets = [Target(3, neuron, site, shared=True) for site in ("mlp_gate", "mlp_up")]
    targets += [Target(2, neuron, site, expert) for site in ("mlp_gate", "mlp_up")]
    dense = lm.adapter.at(config, 0).moe is None  # HY-V4's first block
    if dense:
        targets += [Target(0, neuron, site) for site in ("mlp_gate", "mlp_up")]
    pieces, at = stream_split(lm, ids, targets, position)
    seen, handles = {}, []

    def keep(name):  # [positions, width]: Qwen4-exp's MoE block hands its experts flat rows
        return lambda _module, _args, output: seen.__setitem__(name, output.detach().reshape(-1, output.shape[-1]).double())

    block = lambda layer: lm.adapter.blocks(lm.model)[layer]
    for site, projection in (("mlp_gate", "gate_proj"), ("mlp_up", "up_proj")):
        moe = lm.adapter.at(config, 3).moe
        handles.append(block(3).get_submodule(f"{moe.block}.{moe.shared.part(projection)}").register_forward_hook(keep((3, site))))
        if dense:
            handles.append(block(0).get_submodule(f"mlp.{projection}").register_forward_hook(keep((0, site))))
    moe_input = lambda _module, args: seen.__setitem__("moe_in", args[0].reshape(-1, args[0].shape[-1]).double())
    handles.append(block(2).get_submodule(lm.adapter.at(config, 2).moe.block).register_forward_pre_hook(moe_input))
    sources = [(layer, site) for layer in range(4) for site in ("attn_out", "mlp_out")]
    try:
        with torch.no_grad(), Trace(lm.model, lm.adapter, sources) as trace:
            lm.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    fused = block(2).mlp.experts.gate_up_proj[expert].detach().double()  # [gate; up] rows of the expert
    seen[2, "mlp_gate"], seen[2, "mlp_up"] = (seen["moe_in"] @ fused.T).split(fused.shape[0] // 2, dim=-1)
    for piece in pieces:
        target = piece.target
        hooked = seen[target.layer, target.site][:, target.neuron]
        total = sum(piece.parts.values())
        assert piece.error < 1e-5 and _close(total, hooked), target
        for label, term in piece.terms.items():
            if term.layer is None:
                continue
            source = trace[term.layer, term.site][0, position].double()
            part, factor = float(piece.parts[label][position]), float(piece.factors[label][position])
            assert factor * float(term.reader @ source) == pytest.approx(part, rel=1e-6, abs=1e-9), (target, label)
            here = lm.at(term.layer)
            if term.site == "attn_out" and here.mixer == "attention":
                found, total = units(lm, term, factor, at)
                assert [u.kind for u in found] == (["head"] * config.num_attention_heads if here.heads_at_out else [])
                if found:
                    assert total == pytest.approx(part, rel=1e-5, abs=1e-9), (target, label)


def test_the_hash_router_is_recomputed_from_the_token_ids(tokenizer):
    """DeepSeek-V4's block 0 routes by its token-id table: the recomputed choice is the table's, its weights
    (sqrt-softplus scores, renormalised and scaled) the router module's; block 1 routes by top-k as the module does."""
    model = tiny_model("deepseek_v4", len(tokenizer))
    lm = _lm("deepseek_v4", tokenizer, model)
    torch.manual_seed(1)
    table = MoeBlock.at(lm, 0).router.tid2eid
    table.copy_(torch.stack([torch.randperm(4)[:2] for _ in range(len(table))]))
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids[0]
    x = torch.randn(len(ids), 64)
    for layer, token_ids in ((0, ids), (1, None)):
        moe = MoeBlock.at(lm, layer)
        routing = route(moe, x, token_ids=token_ids)
        indices, weights = model_routing(moe, x, token_ids)
        order = routing.indices.argsort(-1)
        assert torch.equal(routing.indices.gather(1, order).cpu(), indices)
        assert _close(routing.weights.gather(1, order).float(), weights)
    assert torch.equal(route(MoeBlock.at(lm, 0), x, token_ids=ids).indices, table[ids])
    with pytest.raises(ValueError, match="needs token_ids"):
        route(MoeBlock.at(lm, 0), x)


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_the_chain_on_hyper_connections(family, tokenizer, tmp_path, capsys, monkeypatch):
    """scan -> verify DIR -> quant DIR -> compare -> profile DIR on the planted model; the streams and the trigger read
    back through the schema, the verification's zeroing in stream s2 takes the value off, and the profile finds DIM
    massive from block LAYER on, at position 0."""
    monkeypatch.setattr(quant, "grid", lambda name="default", block=quant.DEFAULT_BLOCK: [Setting("rtn", 8, "tensor", "plain")])
    model = tiny_model(family, len(tokenizer))
    _plant(model, tokenizer.bos_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("The old house stood at the end of the lane. Its windows were dark, and the garden had grown wild "
                         "over many summers. People in the village said that nobody had lived there for years.\n", encoding="utf-8")
    out, quiet = tmp_path / "report", ["--format", "json,txt", "--quiet"]
    capsys.readouterr()  # what saving the model printed
    for step in (["scan", tmp_path / "model", "--text", TEXTS[0], "--no-verify", "--out", out, *quiet],
                 ["verify", out, "--eval-file", eval_file, *quiet], ["quant", out, "--eval-file", eval_file, *quiet],
                 ["compare", out, out, "--out", tmp_path / "compare"], ["profile", out, "--quiet"]):
        code = main([str(part) for part in step])
        assert code == 0 and capsys.readouterr().err == "", step[0]
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    streams = ["s2"] if family == "qwen4_exp" else ["s2", "read"]  # Qwen4-exp reads each stream RMS-normed
    assert data["findings"]["dims"][0]["streams"] == streams and data["mechanism"]["streams"][0]["stream"] == "s2"
    report = load_report(out)
    assert report.findings.massive[0].stream == "s2" and report.deploy.quantization.dim == DIM
    rows = {row.name: row for row in report.causal.verification.interventions}
    zero = next(i for i in rows.values() if i.target == f"zero {LAYER}:[{DIM}]")
    assert zero.value_birth == 0.0 and not zero.still_massive  # zeroed in stream s2, where it is massive
    # inside the shared expert, read in stream s2: the neuron's column and its super weight zeroed take the value off,
    # a weight of like size elsewhere in the matrix does not
    baseline, weight = rows["none (baseline)"], report.mechanism.experts[0].moe.super_weight
    assert baseline.value_birth == pytest.approx(report.mechanism.streams[0].value, rel=1e-5) and baseline.still_massive
    for name in (f"ablate neuron {NEURON} of the shared expert", f"zero expert super weight {weight.index}"):
        assert rows[name].confirms and abs(rows[name].value_birth) < 1e-3 * abs(baseline.value_birth), name
    assert next(row for name, row in rows.items() if name.startswith("control: zero weight")).still_massive
    (trigger,) = report.trigger  # the shared expert's neuron, read from the BOS token's embedding
    assert (trigger.neurons[0].layer, trigger.neurons[0].neuron, trigger.neurons[0].shared) == (LAYER, NEURON, True)
    assert trigger.chain[-1].kind == "token embedding" and trigger.carriers.verdict == "token"
    assert f"block {LAYER} shared expert neuron {NEURON}" in (out / "report.txt").read_text(encoding="utf-8")
    profile = load_profile(out / "profile.json")
    born = profile.blocks[LAYER]
    assert DIM in born.dims and born.massive_tokens > 0 and "position 0" in born.carriers
    assert [b.layer for b in profile.massive_blocks()][0] == LAYER


def test_stream_fields_are_optional_in_the_json():
    """The stream fields are written only where a state has several streams, and a file without them (every report of
    a one-stream model, version 2 as before) reads them as their defaults."""
    from massact.analysis.detect.results import Massive
    from massact.report.schema import read, to_data

    one = Massive(layer=1, text=0, position=0, token="<s>", dim=20, value=300.0, ratio=5000.0)
    assert "stream" not in to_data(one) and read(Massive, to_data(one), "report.json").stream == ""
    several = Massive(layer=1, text=0, position=0, token="<s>", dim=20, value=300.0, ratio=5000.0, stream="s2")
    assert to_data(several)["stream"] == "s2" and read(Massive, to_data(several), "report.json") == several


SECOND = 30  # HY-V4's dense block 0 also writes this dim, through neuron NEURON + 1, negative


@pytest.mark.parametrize("family, at", [("hy_v4", 0), ("deepseek_v4", LAYER)])
def test_a_streamed_report_equals_the_in_memory_report(family, at, tokenizer, tmp_path):
    """Read block by block from its checkpoint, the planted model's report is the in-memory one: each lifeline in
    stream s2 (HY-V4: two dims at one carrier), its stream origins (the MLP's write at birth, the mixing carrying it a
    block on), the MLP opened (HY-V4's dense block 0: neurons, anatomy, super weight; DeepSeek-V4's shared expert), the
    birth state and token view in s2, the trigger, and the verification (interventions in s2, output effects, input
    dependence, sinks, super weights zeroed; HY-V4's super expert of block 2 pruned, the dims read at blocks 0 and 1
    before it unmodified). The blocks are read 3 times: the corpus, the lifelines with the valley, the mechanism with
    the trigger and the interventions; nothing is said not measured."""
    import massact
    from massact.analysis.detect.stream import StreamPlace
    from massact.models.checkpoint import load_streamed
    from massact.pipeline import scan_streamed
    from test_streaming import _close as _same
    from test_streaming import _comparable

    model = tiny_model(family, len(tokenizer))
    _plant(model, tokenizer.bos_token_id, at=at)
    dims = [DIM, SECOND] if family == "hy_v4" else [DIM]
    if family == "hy_v4":
        mlp = model.model.layers[at].mlp
        with torch.no_grad():
            for projection in (mlp.gate_proj, mlp.up_proj):
                projection.weight[NEURON + 1] = 0.0
                projection.weight[NEURON + 1, TRIGGER] = 0.5
            mlp.down_proj.weight[SECOND, NEURON + 1] = -80.0
    path = tmp_path / family
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(EVAL, encoding="utf-8")
    options = {"texts": TEXTS, "verify": True, "device": "cpu", "eval_file": str(eval_file)}
    memory = massact.scan(str(path), **options)
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    got = scan_streamed(streamed, place=StreamPlace(folder=tmp_path / "out"), **options)
    lines = got.mechanism.lifelines
    assert [(line.dim, line.text, line.position, line.stream, line.born_at) for line in lines] == [(dim, 0, 0, "s2", at) for dim in dims]
    assert [(o.dim, o.layer, o.carrier, o.role) for o in got.mechanism.streams] == [
        (dim, layer, carrier, role) for dim in dims for layer, carrier, role in ((at, "mlp", "write"), (at + 1, "s2", "carry"))]
    opened = got.mechanism.attribution if family == "hy_v4" else [expert.moe for expert in got.mechanism.experts]
    assert [split.neurons[0].neuron for split in opened] == [NEURON + k for k in range(len(dims))]
    assert len(got.mechanism.anatomy) == (len(dims) if family == "hy_v4" else 0)
    assert got.mechanism.birth_state.layer == at and got.mechanism.token_values.streams == ["s2"] * len(dims)
    assert [trigger.neurons[0].neuron for trigger in got.trigger] == [NEURON + k for k in range(len(dims))]
    rows = got.causal.verification.interventions
    assert any(row.confirms for row in rows) and any(row.target == f"zero {at}:{dims}" for row in rows)
    assert got.causal.attention.texts > 0 and bool(got.causal.super_weights) == (family == "hy_v4")
    if family == "hy_v4":
        assert [(row.kind, row.massive_dims) for row in got.causal.expert_pruning] == [("super", dims), ("random", dims)]
    _same(_comparable(got), _comparable(memory))
    blocks = sum(sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + 2 * blocks
    (said,) = [w for w in got.warnings if w.startswith("streamed model:")]
    assert said.endswith("the corpus pass, the lifelines and the compression valley, the mechanism and the interventions)"), said
    assert not any((tmp_path / "out").glob("*.bin"))


@pytest.mark.parametrize("family", HYPER_FAMILIES)
def test_a_block_read_alone_gives_the_attention_of_the_whole_pass(family, tokenizer):
    """What a streamed pass reads of one softmax block's attention (``block_attention``, found where the model or only
    its base model declares the module transformers records it from: Qwen4-exp's text model) is what the eager pass
    of the whole model returns for that block."""
    from massact.capture.attention import attention_pass, block_attention, eager_attention, softmax_layers

    lm = _lm(family, tokenizer)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    whole = attention_pass(lm, ids)
    layer = softmax_layers(lm)[-1]
    seen = []
    with torch.no_grad(), eager_attention(lm), block_attention(lm, layer, lambda found: seen.append(found.maps[layer])):
        lm.model(input_ids=ids, use_cache=False)
    (maps,) = seen
    assert maps.shape == whole.maps[layer].shape and _close(maps, whole.maps[layer])
