"""massact atlas: the rows against each model's own report, the architecture columns against the adapters, a resumed
atlas against an uninterrupted one, a model in a process of its own, the sentence rules, and bad input."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import re
import shutil

import pytest

import massact
from conftest import D_MLP, D_MODEL, MIXERS, N_LAYERS, save_planted, tiny_model
from massact.analysis.atlas.results import AtlasDim, Row
from massact.analysis.atlas.rows import row as atlas_row
from massact.analysis.atlas.sentences import apart, birth, feature, qk_band, survival
from massact.atlas import run as atlas_run
from massact.cli import main
from massact.errors import UsageError
from massact.models.adapters import adapter_for
from massact.models.adapters.base import text_config
from massact.models.architecture import Architecture, architecture, mixer
from massact.report.schema import load_architecture, load_atlas, load_report
from test_visual import assert_policy

NEURON, DIM = 37, 20
# (family, block its planted neuron writes from): two pre-norm models with a massive value born at different depths,
# and OLMo-2, whose reordered norms land every branch normed, so that nothing it writes can be massive.
PLANTED = (("llama", 1), ("phi", 2), ("olmo2", 1))
EVAL = ("The old house stood at the end of the lane. Its windows were dark, and the garden had grown wild over many "
        "summers. People in the village said that nobody had lived there for years.\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("atlas-models")
    (root / "eval.txt").write_text(EVAL, encoding="utf-8")
    return root, [str(save_planted(root / family, family, tokenizer, layer, NEURON, DIM)) for family, layer in PLANTED]


def atlas_args(root, specs, out, *extra, quiet: bool = True):
    return ["atlas", *specs, "--out", str(out), "--verify", "--eval-file", str(root / "eval.txt"), "--max-texts", "3",
            *(["--quiet"] if quiet else []), *extra]


@pytest.fixture(scope="module")
def atlas(models, tmp_path_factory):
    root, specs = models
    out = tmp_path_factory.mktemp("atlas") / "out"
    assert main(atlas_args(root, specs, out, "--in-process")) == 0
    return out


def test_rows_are_each_models_own_report(models, atlas):
    _, specs = models
    found = load_atlas(atlas / "atlas.json")
    assert [r.model for r in found.rows] == specs and [r.report for r in found.rows] == [f for f, _ in PLANTED]
    for (family, layer), row in zip(PLANTED, found.rows):
        report = load_report(atlas / row.report)
        layers = report.findings.layers
        assert row.dims == [AtlasDim(dim=d.dim, value=d.max_value, born_at=d.born_at, tokens=d.tokens)
                            for d in report.findings.dims]
        peak = max(layers, key=lambda s: abs(s.top[0].value))
        assert (row.top, row.top_block, row.median) == (abs(peak.top[0].value), peak.layer, peak.median)
        assert row.ratios == [s.ratio for s in layers] and row.ratio == pytest.approx(peak.ratio)
        # float16's largest value over the largest |a|, as the report's precision stage says.
        assert row.headroom == report.deploy.precision.headroom == pytest.approx(65504 / row.top)
        attention = report.causal.attention
        assert row.verified and row.sink_rate == attention.overall_rate and row.sink_rates == attention.rate
        assert row.has_sink == bool(attention.sink_layers) and row.sink_positions == [0]  # the first token: BOS
        shares = [v for block in attention.share for v in block]
        assert row.sink_share == pytest.approx(sum(shares) / len(shares))
        valley = report.valley  # the compression valley's columns and curve, as the report has them
        assert (row.valley, row.valley_depth, row.valley_drop, row.valley_drop_without, row.entropies) == (
            valley.valley, valley.valley / (N_LAYERS - 1), valley.drop, valley.drop_without, valley.entropy)
        assert row.valley_from_birth == (None if valley.birth is None else valley.valley - valley.birth)
        # The Q/K columns: the largest max/mean of any query or key head, per block and over the model, and the
        # disruption test's perplexity over the unmodified one (every tiny model here is verified and rotary).
        qk = report.qk
        per_block = [max(r for part in (b.queries, b.keys) for r in part.ratio) for b in qk.blocks]
        assert row.qk_ratios == per_block and row.qk_ratio == max(per_block)
        heads = [bool(d) for b in qk.blocks for part in (b.queries, b.keys) for d in part.dims]
        assert row.qk_heads == sum(heads) / len(heads)
        if qk.disruption is not None:
            assert row.qk_perplexity == qk.disruption.massive.perplexity / qk.disruption.base.perplexity
        # A dense model with no gate and no learned sink: those columns are empty, not 0.
        assert row.super_experts is None and row.gate_sink is None and row.learned_sink is None and row.expert is None
        if family == "olmo2":  # nothing massive: every column of the lead dim is empty
            assert row.dims == [] and (row.lead, row.birth, row.writer, row.neuron, row.super_weight) == (None,) * 5
            continue
        # The planted neuron, read back from the report: the block it writes from, its super weight as planted.
        assert (row.lead, row.birth, row.birth_depth, row.writer, row.neuron) == (DIM, layer, layer / (N_LAYERS - 1), "mlp", NEURON)
        matrix = report.mechanism.attribution[0].super_weight.matrix
        assert (row.super_weight, row.super_weight_value) == (f"{matrix}[{DIM}, {NEURON}]", 100.0)
        assert row.neuron_share == report.mechanism.attribution[0].neurons[0].share > 0.9
        assert row.erased_at == report.mechanism.lifelines[0].erased_at
    # atlas.csv holds the same numbers, exactly; an empty cell where the row has None.
    lines = list(csv.DictReader(io.StringIO((atlas / "atlas.csv").read_text(encoding="utf-8"))))
    assert [line["model"] for line in lines] == specs
    for line, row in zip(lines, found.rows):
        assert float(line["top |a|"]) == row.top and float(line["float16 headroom"]) == row.headroom
        assert line["birth block"] == ("" if row.birth is None else str(row.birth)) and line["experts"] == ""
        assert line["norms"] == {"llama": "pre 100%", "phi": "pre 100%", "olmo2": "reordered 100%"}[row.report]


def test_architecture_columns_are_the_adapters(models, atlas):
    """The atlas's architecture columns are the loaded model's (the adapter's declarations, the modules' sizes)."""
    found = load_atlas(atlas / "atlas.json")
    for spec, row in zip(models[1], found.rows):
        lm = massact.load(spec, device="cpu", log=lambda m: None)
        assert row.architecture == architecture(lm.adapter, lm.model) == load_architecture(atlas / row.report / "architecture.json")
    llama, phi, olmo2 = (r.architecture for r in found.rows)
    # Llama's parameters by hand: the embeddings and the untied head, per block q, k, v (2 of 4 heads for keys and
    # values), o, the gated MLP's three matrices and two norms, then the final norm.
    vocab = 400
    block = 2 * D_MODEL * D_MODEL + 2 * D_MODEL * D_MODEL // 2 + 3 * D_MODEL * D_MLP + 2 * D_MODEL
    assert llama.parameters == 2 * vocab * D_MODEL + N_LAYERS * block + D_MODEL
    assert (llama.norms, llama.mixers, llama.positions, llama.rotary, llama.parallel) == ({"pre": 1.0}, {"softmax": 1.0},
                                                                                         {"RoPE": 1.0}, 1.0, 0.0)
    assert (phi.parallel, phi.positions, phi.rotary) == (1.0, {"partial RoPE": 1.0}, 0.5)  # its partial_rotary_factor
    assert olmo2.norms == {"reordered": 1.0} and llama.experts is None and llama.streams == 1


# Tiny models of families whose blocks differ, and what their adapters declare (conftest's tiny configs: 4 blocks;
# experts: 4 routed, 2 per token, 1 shared, block 0 dense; hyper-connections: 4 streams).
FAMILY_COLUMNS = {
    "gpt2": dict(norms={"pre": 1.0}, positions={"learned": 1.0}, rotary=None),
    "gemma2": dict(norms={"sandwich": 1.0}),
    "opt-postln": dict(norms={"post": 1.0}, positions={"learned": 1.0}),
    "exaone4": dict(norms={"reordered": 1.0}),
    "neox": dict(parallel=1.0, positions={"partial RoPE": 1.0}, rotary=0.25),
    "qwen3_next": dict(mixers={"gated": 0.25, "linear": 0.75}, rotary=0.25),
    "nemotron_h": dict(mixers={"softmax": 0.25, "state space": 0.25, "none": 0.5}, positions={"NoPE": 1.0}),
    "deepseek_v3": dict(experts=4, top_k=2, shared=1, expert_blocks=0.75, positions={"partial RoPE": 1.0}, rotary=0.5),
    "gpt_oss": dict(mixers={"learned sink": 1.0}, experts=4, top_k=2, shared=0, expert_blocks=1.0),
    "hy_v4": dict(streams=4),
}


@pytest.mark.parametrize("family", FAMILY_COLUMNS)
def test_architecture_of_tiny_families(family):
    model = tiny_model(family, 400)
    adapter, config = adapter_for(model.config), text_config(model)
    found = architecture(adapter, model)
    assert {key: getattr(found, key) for key in FAMILY_COLUMNS[family]} == FAMILY_COLUMNS[family]
    # Per block, the adapter's own declarations: the mixer kinds conftest lists for the hybrids, the NoPE blocks.
    blocks = [adapter.at(config, layer) for layer in range(N_LAYERS)]
    if family in MIXERS:
        kinds = {None: "none", "attention": "softmax", "ssm": "state space", "linear": "linear", "conv": "convolution"}
        declared = [kinds[kind] if kind != "attention" or mixer(b) == "softmax" else mixer(b) for kind, b in zip(MIXERS[family], blocks)]
        assert found.mixers == {kind: declared.count(kind) / N_LAYERS for kind in dict.fromkeys(declared)}
    softmax = [b for b in blocks if b.mixer == "attention"]
    assert found.positions.get("NoPE", 0.0) == pytest.approx(sum(not b.positions for b in softmax) / len(softmax)) or \
        found.positions == {"NoPE": 1.0}  # no rotary and no learned positions at all
    assert found.parameters == sum(p.numel() for p in model.parameters()) and found.blocks == N_LAYERS


def test_a_mixture_of_experts_row_names_the_expert_and_its_super_weight(tokenizer):
    """A planted expert neuron (test_families: expert 2's neuron 37 of block 1 writes dim 20 on BOS): the row takes the
    expert, the neuron and its share, the super weight at its index in the fused experts, and the super experts, as
    the report has them; the architecture its 4 routed experts, 2 per token."""
    from test_families import EXPERT, TEXTS, planted_moe

    model = planted_moe("mixtral", tokenizer)
    report = massact.scan(model, TEXTS, tokenizer=tokenizer, verify=False)
    found = atlas_row("mixtral", architecture(adapter_for(model.config), model), report.findings, report.mechanism, report.causal.attention,
                report.deploy.precision)
    split = report.mechanism.experts[0].moe
    assert (found.lead, found.birth, found.writer, found.expert, found.neuron) == (DIM, 1, "mlp", EXPERT, NEURON)
    assert found.neuron_share == split.neurons[0].share > 0.9 and found.super_weight_value == 100.0
    assert found.super_weight == f"{split.super_weight.matrix}[{', '.join(map(str, split.super_weight.index))}]"
    assert found.super_experts == [[x.layer, x.expert] for x in report.mechanism.super_experts.found]
    assert (found.architecture.experts, found.architecture.top_k, found.architecture.shared) == (4, 2, 0)
    assert not found.verified and found.sink_rate is None and found.sink_rates is None  # not verified: no sink columns


def test_exaone4_nope_blocks_are_its_full_attention_blocks():
    """EXAONE-4's full-attention blocks skip the rotary embedding where it has a sliding window: a NoPE share."""
    model = tiny_model("exaone4", 400)
    config = text_config(model)
    nope = sum(config.layer_types[layer] == "full_attention" for layer in range(N_LAYERS)) / N_LAYERS
    assert 0 < nope < 1 and architecture(adapter_for(model.config), model).positions == {"RoPE": 1 - nope, "NoPE": nope}


def test_a_resumed_atlas_equals_an_uninterrupted_one(models, atlas, tmp_path, capsys):
    """An atlas stopped after its first model's report was written: run again, it scans the others, keeps that one
    as it is, and is the uninterrupted atlas, byte for byte."""
    root, specs = models
    out = tmp_path / "out"
    shutil.copytree(atlas / "llama", out / "llama")
    kept = (out / "llama" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(atlas_args(root, specs, out, "--in-process", quiet=False)) == 0
    err = capsys.readouterr().err
    assert f"model 1/3 ({specs[0]}): already done, in {out / 'llama'}" in err and f"model 2/3 ({specs[1]}): scanning" in err, err
    assert err.count(": scanning") == 2 and (out / "llama" / "report.json").stat().st_mtime_ns == kept
    for name in ("atlas.json", "atlas.csv"):
        assert (out / name).read_text(encoding="utf-8") == (atlas / name).read_text(encoding="utf-8"), name
    # A report made with other settings is refused, not mixed in.
    assert main(atlas_args(root, specs, out, "--in-process", "--top-k", "3")) == 2
    assert "holds a report made with other texts or settings" in capsys.readouterr().err


def test_two_processes_share_the_models(models, atlas, monkeypatch):
    """Under torchrun process r of n surveys models r, r + n, ...; every process waits for the others, then the first
    reads every folder back: here the fixture's folders, so its atlas is the fixture's."""
    _, specs = models
    surveyed, waits = [], []
    monkeypatch.setattr(atlas_run, "survey", lambda job, progress=None, log=None: surveyed.append(job.model.spec))
    monkeypatch.setattr(atlas_run, "wait_for_all", lambda: waits.append(True))
    report = load_report(atlas / "llama")
    checkpoints = atlas_run.models(specs)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        surveyed.clear()
        shares[rank] = (atlas_run.run(checkpoints, report.corpus.spec, report.settings, atlas, lambda m: None, isolate=False),
                        list(surveyed))
    assert shares["1"] == (None, [specs[1]]) and shares["0"][1] == [specs[0], specs[2]] and waits == [True, True]
    saved = load_atlas(atlas / "atlas.json")
    assert (shares["0"][0].rows, shares["0"][0].sentences) == (saved.rows, saved.sentences)


def test_a_model_in_a_process_of_its_own(models, atlas, tmp_path):
    """The default: the model's survey runs in a spawned interpreter; its report kept, its architecture.json written."""
    root, specs = models
    out = tmp_path / "out"
    shutil.copytree(atlas / "llama", out / "llama")
    (out / "llama" / "architecture.json").unlink()
    assert main(atlas_args(root, specs[:1], out)) == 0
    row = load_atlas(out / "atlas.json").rows[0]
    assert row == load_atlas(atlas / "atlas.json").rows[0]


def test_what_a_models_process_raises_comes_back(models, atlas, tmp_path):
    """A model's process sends back what it raised (here the refusal of a report made with other settings), which
    the atlas raises as its own: one line."""
    root, specs = models
    shutil.copytree(atlas / "llama", tmp_path / "llama")
    checkpoint = atlas_run.models(specs[:1])[0]
    report = load_report(atlas / "llama")
    job = atlas_run.Job(model=checkpoint, texts=report.corpus.spec, settings=report.settings.replace(top_k=3),
                        folder=tmp_path / "llama", formats=frozenset({"json"}))
    receive, send = multiprocessing.Pipe(duplex=False)
    atlas_run._child(send, job)
    kind, raised = receive.recv()
    assert kind == "done" and isinstance(raised, UsageError) and "holds a report made with other texts or settings" in str(raised)


def test_the_default_model_by_name(models, tmp_path):
    """MODEL ``default`` is the embedded default model (what ``massact scan`` scans without a MODEL), named as its
    report names it; the same file given by its path is the same model twice. Its row's top |a|, block and lead dim are
    those of plain forward passes (each block's output by a hook), and its report's weights are those of
    ``massact.load(None)``."""
    import torch

    from massact.models.identity import weights_sha256
    from massact.models.loading import DEFAULT_NAME, default_gguf

    assert atlas_run.models(["default"]) == [atlas_run.Checkpoint(spec=DEFAULT_NAME, target=str(default_gguf()))]
    with pytest.raises(UsageError, match=f"{re.escape(str(default_gguf()))} is in the atlas twice"):
        atlas_run.models(["default", str(default_gguf())])
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    out = tmp_path / "out"
    assert main(["atlas", "default", models[1][0], "--out", str(out), *[a for t in texts for a in ("--text", t)], "--in-process", "--quiet",
                 "--format", "json"]) == 0
    found = load_atlas(out / "atlas.json").rows[0]
    assert (found.model, found.report, found.architecture.blocks) == (DEFAULT_NAME, DEFAULT_NAME, 30)
    lm = massact.load(None, device="cpu", log=lambda m: None)
    assert load_report(out / DEFAULT_NAME).model.weights_sha256 == weights_sha256(lm.model)
    outputs: list[list[torch.Tensor]] = [[] for _ in lm.model.model.layers]
    hooks = [layer.register_forward_hook(lambda _m, _a, o, i=i: outputs[i].append((o[0] if isinstance(o, tuple) else o)[0].abs()))
             for i, layer in enumerate(lm.model.model.layers)]
    with torch.no_grad():
        for text in texts:
            lm.model(input_ids=lm.tokenizer(text, return_tensors="pt").input_ids)
    for hook in hooks:
        hook.remove()
    blocks = [torch.cat(parts) for parts in outputs]  # [tokens, d_model] per block
    top_block = max(range(len(blocks)), key=lambda layer: float(blocks[layer].max()))
    assert found.top_block == top_block and found.top == pytest.approx(float(blocks[top_block].max()), rel=1e-5)
    assert found.lead == int(blocks[top_block].max(dim=0).values.argmax())


def test_a_model_over_the_memory_limit_is_streamed_and_its_row_is_its_report(models, atlas, tmp_path, capsys):
    """--memory below the Llama's weights: the atlas reads it block by block (a line says so) and verifies it; its row
    is its streamed report's, and the in-memory row's in every column (the sinks and the Q/K concentration and
    disruption test included), to float32 summation order. Run again, the report is kept, its model checked in one
    pass over the blocks; weights changed since are refused in one line."""
    from dataclasses import asdict

    from safetensors.torch import load_file, save_file

    from test_streaming import _close

    root, specs = models
    model = shutil.copytree(specs[0], tmp_path / "llama")
    out = tmp_path / "out"
    size = sum(t.numel() * 4 for t in load_file(model / "model.safetensors").values())  # float32, as the scan loads it
    capsys.readouterr()
    assert main(atlas_args(root, [str(model)], out, "--in-process", "--memory", "100kB", quiet=False)) == 0
    err = capsys.readouterr().err
    assert (f"{model}: streaming the model block by block: its weights ({size / 1e6:.1f} MB in float32) exceed the memory "
            "limit (100.0 kB, --memory)") in err, err
    found = load_atlas(out / "atlas.json").rows[0]
    report = load_report(out / "llama")
    assert report.model.streamed and report.causal.attention is not None and report.settings.verify
    assert (found.streamed, found.verified) == (True, True) and found.dims and found.erased_at is not None
    assert found.dims == [AtlasDim(dim=d.dim, value=d.max_value, born_at=d.born_at, tokens=d.tokens) for d in report.findings.dims]
    assert (found.lead, found.birth, found.writer, found.neuron) == (DIM, 1, "mlp", NEURON) and found.super_weight_value == 100.0
    assert found.headroom == report.deploy.precision.headroom and found.erased_at == report.mechanism.lifelines[0].erased_at
    assert found.architecture == load_atlas(atlas / "atlas.json").rows[0].architecture
    ours, theirs = asdict(found), asdict(load_atlas(atlas / "atlas.json").rows[0])
    assert theirs["sink_rate"] is not None
    for key in ("model", "streamed", "verified"):
        ours.pop(key), theirs.pop(key)
    _close(ours, theirs)
    line = next(csv.DictReader(io.StringIO((out / "atlas.csv").read_text(encoding="utf-8"))))
    assert (line["streamed"], line["verified"]) == ("yes", "yes") and float(line["sink rate"]) == pytest.approx(found.sink_rate, abs=1e-3)
    assert float(line["top |a|"]) == found.top and line["erased at"] == (", ".join(map(str, found.erased_at)) or "never")

    kept = (out / "llama" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(atlas_args(root, [str(model)], out, "--memory", "100kB", quiet=False)) == 0  # in a process of its own
    assert f"{model}: streaming the model block by block" in capsys.readouterr().err  # its line, sent back to the atlas
    assert (out / "llama" / "report.json").stat().st_mtime_ns == kept and load_atlas(out / "atlas.json").rows[0] == found
    # A report made in memory, now over the limit: kept, its model checked block by block.
    shutil.copytree(atlas / "llama", tmp_path / "mixed" / "llama")
    assert main(atlas_args(root, [specs[0]], tmp_path / "mixed", "--in-process", "--memory", "100kB")) == 0
    assert load_atlas(tmp_path / "mixed" / "atlas.json").rows[0] == load_atlas(atlas / "atlas.json").rows[0]
    # The super weight changed on disk: the pass that checks the saved report finds it in its block.
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][DIM, NEURON] = 7.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(atlas_args(root, [str(model)], out, "--in-process", "--memory", "100kB")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "super_weights[0]: model.layers.1.mlp.down_proj.weight[20, 37] is +7 in the model" in err, err


def test_the_page_shows_each_sentence_with_its_rows(models, atlas):
    found = load_atlas(atlas / "atlas.json")
    llama, phi, olmo2 = models[1]
    assert [(s.rule, s.text, s.rows) for s in found.sentences] == [
        ("feature", "reordered norms: 1 of 1 model without a massive value, against 0 of 2 of the others; mean sink rate "
                    f"{found.rows[2].sink_rate:.2f} against {(found.rows[0].sink_rate + found.rows[1].sink_rate) / 2:.2f}.",
         [olmo2, llama, phi]),
        ("birth", f"The massive value is born between 33% and 67% of the depth in the 2 models that have one ({llama} block 1 of 4, "
                  f"{phi} block 2 of 4).", [llama, phi]),
        ("apart", f"2 of 3 models whose sink was measured have a massive value without a sink ({llama}, {phi}).", [llama, phi, olmo2]),
        # The planted value on BOS holds nearly all of the norm from its birth on: each valley lies at its birth.
        ("valley", f"The compression valley lies within 2 blocks of the birth of the massive value in 2 of 2 models with both ({llama}, "
                   f"{phi}); the entropy falls by {(found.rows[0].valley_drop + found.rows[1].valley_drop) / 2:.2f} into it on "
                   f"average, and by {(found.rows[0].valley_drop_without + found.rows[1].valley_drop_without) / 2:.2f} with the "
                   "massive tokens left out.", [llama, phi]),
    ]
    assert [row.valley_from_birth for row in found.rows[:2]] == [0, 0]
    page = (atlas / "atlas.html").read_text(encoding="utf-8")
    assert_policy(page)
    assert page.count('src="data:image/png;base64,') == 4  # the four curves: top / median, sink rate, entropy, Q/K
    for sentence in found.sentences:
        section = page.split(sentence.text.replace("&", "&amp;"), 1)[1].split("</section>", 1)[0]
        assert [cell for cell in section.split("<tr>")[2:] if cell] and all(f"<td>{m}</td>" in section for m in sentence.rows)
        assert section.count("<tr>") == len(sentence.rows) + 1  # a header, then one line per row it rests on


def _row(model: str, dims: int = 0, **fields) -> Row:
    """A row as the sentence rules read it: its architecture (pre-norm softmax unless ``fields`` says otherwise), its
    massive dims, its sink."""
    arch = dict(family="F", model_type="f", blocks=4, d_model=8, parameters=1, norms={"pre": 1.0}, parallel=0.0, mixers={"softmax": 1.0},
                positions={"RoPE": 1.0}, rotary=1.0, experts=None, top_k=None, shared=0, expert_blocks=0.0, streams=1)
    arch |= {k: fields.pop(k) for k in list(fields) if k in arch}
    found = Row(model=model, report=model, architecture=Architecture(**arch), verified=True, dims=[], top=1.0, top_block=0, median=1.0,
                ratio=1.0, ratios=[1.0] * 4, **fields)
    found.dims = [AtlasDim(dim=d, value=2000.0, born_at=1, tokens=["<s>"]) for d in range(dims)]
    return found


def test_sentence_rules():
    gated = [_row("g1", mixers={"gated": 1.0}, sink_rate=0.1), _row("g2", mixers={"gated": 0.5, "linear": 0.5}, sink_rate=0.3)]
    plain = [_row("p1", dims=1, sink_rate=0.5), _row("p2", dims=2)]  # p2's sink not measured: not in the mean
    assert [(s.text, s.rows) for s in feature(gated + plain)] == [
        ("gated attention: 2 of 2 models without a massive value, against 0 of 2 of the others; mean sink rate 0.20 against 0.50.",
         ["g1", "g2", "p1", "p2"]),
        ("linear attention: 1 of 1 model without a massive value, against 1 of 3 of the others; mean sink rate 0.30 against 0.30.",
         ["g2", "g1", "p1", "p2"])]
    assert feature(plain) == [] and feature(gated[:1]) == []  # no model on one side: no comparison
    born = [_row("a", dims=1, birth=1, birth_depth=1 / 3), _row("b", dims=1, birth=3, birth_depth=1.0), _row("c")]
    assert [(s.text, s.rows) for s in birth(born)] == [
        ("The massive value is born between 33% and 100% of the depth in the 2 models that have one (a block 1 of 4, b block 3 of 4).",
         ["a", "b"])]
    assert birth(born[:1] + born[2:]) == []  # one model: nothing across models
    sinks = [_row("s", has_sink=True), _row("m", dims=1, has_sink=False), _row("both", dims=1, has_sink=True), _row("unmeasured")]
    assert [(s.text, s.rows) for s in apart(sinks)] == [
        ("1 of 3 models whose sink was measured has a sink without a massive value (s).", ["s", "m", "both"]),
        ("1 of 3 models whose sink was measured has a massive value without a sink (m).", ["s", "m", "both"])]
    assert apart(sinks[2:]) == []
    zeroed = [_row("k", sink_survives=True, sink_kept=2, sink_reached=3), _row("l", sink_survives=False, sink_kept=0, sink_reached=2),
              _row("n")]
    assert [(s.text, s.rows) for s in survival(zeroed)] == [
        ("The sink survives the massive values set to zero in 1 of 2 models where that was measured (k).", ["k", "l"])]
    assert survival(zeroed[2:]) == []
    # Q/K: only rows whose top Q/K dim is massive (max/mean >= 5) and turned (a band) count.
    qk = [_row("lo", qk_ratio=9.0, qk_band="low"), _row("hi", qk_ratio=6.0, qk_band="high"), _row("weak", qk_ratio=3.0, qk_band="low"),
          _row("nope", qk_ratio=8.0)]
    assert [(s.text, s.rows) for s in qk_band(qk)] == [
        ("Rotary models: the top massive Q/K dim in the low-frequency band in 1 of 2 models (lo).", ["lo", "hi"])]
    assert qk_band(qk[2:]) == []


def test_atlas_json_is_read_back_strictly(atlas, tmp_path):
    data = json.loads((atlas / "atlas.json").read_text(encoding="utf-8"))
    assert (data["format"], data["version"]) == ("massact-atlas", 1)
    cases = [({**data, "version": 2}, "atlas version 2; this massact reads version 1"),
             ({**data, "rows": [{**data["rows"][0], "architecture": {**data["rows"][0]["architecture"], "norms": {"middle": 1.0}}}]},
              "field rows[0].architecture.norms must hold shares of pre, sandwich, reordered, post that sum to 1"),
             ({**data, "rows": [{**data["rows"][0], "ratios": [1.0]}]}, "field rows[0].ratios must hold one ratio per block"),
             ({**data, "rows": data["rows"][:1]}, "field sentences must hold rows of models in the atlas")]
    for broken, expected in cases:
        path = tmp_path / "atlas.json"
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(UsageError, match=re.escape(expected)):
            load_atlas(path)


@pytest.mark.parametrize("case", ["missing model", "unreadable list", "empty list", "not a model directory", "twice",
                                  "stream a gguf", "memory"])
def test_bad_input_is_one_line_and_exit_2(case, models, tmp_path, capsys):
    root, specs = models
    if case == "missing model":
        args, expected = [specs[0], str(tmp_path / "nowhere")], "nowhere: no such file or directory"
    elif case == "unreadable list":
        args, expected = ["--list", str(tmp_path)], f"{tmp_path}: cannot read the list of models"
    elif case == "empty list":
        (tmp_path / "models.txt").write_text("# nothing yet\n\n", encoding="utf-8")
        args, expected = ["--list", str(tmp_path / "models.txt")], "atlas needs at least one MODEL (or --list FILE)"
    elif case == "not a model directory":
        args, expected = [str(root)], "is a directory but not a Hugging Face model (no config.json)"
    elif case == "twice":
        (tmp_path / "models.txt").write_text(f"{specs[0]}\n", encoding="utf-8")
        args, expected = [specs[0], "--list", str(tmp_path / "models.txt")], "is in the atlas twice"
    elif case == "stream a gguf":  # refused before any model loads: a .gguf file has no safetensors blocks
        (tmp_path / "m.gguf").write_bytes(b"")
        args = [specs[0], str(tmp_path / "m.gguf"), "--stream"]
        expected = f"--stream reads a model directory of safetensors files; {tmp_path / 'm.gguf'} is not one"
    else:
        args, expected = [specs[0], "--memory", "lots"], "--memory 'lots': give a size such as 1.5GB"
    assert main(["atlas", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("massact: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()
