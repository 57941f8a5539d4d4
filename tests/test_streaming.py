"""The corpus carried block by block from a sharded checkpoint (``massact.capture.streaming``): the streamed layer scan
against the in-memory one, what the pass reads, memory flat in depth, and damaged checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PLANTED, plant_mlp, tiny_model
from massact.analysis.detect.scan import scan_layers
from massact.analysis.detect.stream import stream_layers
from massact.errors import UsageError
from massact.models.checkpoint import load_streamed
from massact.models.loading import wrap
from massact.texts import DEFAULT_TEXTS


def _windows(tokenizer) -> list[torch.Tensor]:
    return [tokenizer(text, return_tensors="pt").input_ids for text in DEFAULT_TEXTS[:10]]


def _saved(tmp_path: Path, family: str, tokenizer, plant: bool) -> tuple[torch.nn.Module, Path]:
    """A tiny model of ``family`` saved in shards of at most 100 kB (so that blocks span files and files hold parts of
    several blocks), with its tokenizer."""
    model = tiny_model(family, len(tokenizer))
    if plant:
        plant_mlp(model, tokenizer.bos_token_id, *PLANTED)
    path = tmp_path / family
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return model, path


# A dense model, a mixture of experts (its checkpoint stores each expert's matrices apart, which transformers fuses
# when it loads), a convolution hybrid, per-layer inputs, and hyper-connections (4 streams, the final read after the
# last block).
@pytest.mark.parametrize("family, plant", [("llama", True), ("mixtral", False), ("lfm2", True), ("gemma4", False),
                                           ("deepseek_v4", False)])
def test_a_streamed_scan_gives_the_in_memory_statistics_reading_each_tensor_once(family, plant, tokenizer, tmp_path):
    model, path = _saved(tmp_path, family, tokenizer, plant)
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    windows = _windows(tokenizer)
    memory = scan_layers(wrap(model, tokenizer), windows, batch_size=4)
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    got = stream_layers(streamed, windows, batch_size=4)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size  # every stored tensor read exactly once
    _assert_same_scan(got, memory)
    if plant:  # the planted dim at its block, on BOS (text 0, position 0)
        layer, _, dim = PLANTED
        value, (text, position, found) = next(iter(got.tops[layer].items()))
        assert (text, position, found) == (0, 0, dim) and abs(value) > 1000


def _assert_same_scan(got, memory) -> None:
    """The streamed scan ``got`` gives the in-memory scan's statistics: the same block code on the same inputs, the
    same values up to what another summation order could change."""
    assert got.slots == memory.slots and len(got.tops) == len(memory.tops)
    for ours, theirs in zip(got.tops, memory.tops):
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.labels[:8], theirs.labels[:8])
    torch.testing.assert_close(torch.tensor(got.slot_medians()), torch.tensor(memory.slot_medians()), rtol=1e-3, atol=0)
    if memory.experts is not None:
        for ours, theirs in zip(got.experts, memory.experts):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_streamed_blocks_hold_the_weights_transformers_loads(tokenizer, tmp_path):
    """Each block's parameters, while the pass holds it, equal the in-memory model's (the experts fused from the
    checkpoint's per-expert tensors), in the dtype asked for; released, the block holds no memory."""
    from massact.capture.streaming import blocks

    model, path = _saved(tmp_path, "mixtral", tokenizer, plant=False)
    streamed = load_streamed(str(path), torch.bfloat16, torch.device("cpu"))
    stored = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0.w1." in name for name in stored)  # the checkpoint keeps the experts apart
    layers = streamed.lm.adapter.blocks(streamed.lm.model)
    for layer in blocks(streamed, range(len(layers))):
        theirs = dict(model.model.layers[layer].named_parameters())
        for name, parameter in layers[layer].named_parameters():
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, theirs[name].to(torch.bfloat16)), name
    assert all(p.device.type == "meta" for block in layers for p in block.parameters())
    assert streamed.lm.model.model.embed_tokens.weight.device.type == "cpu"


_PEAK = """
import sys, torch
from massact.analysis.detect.stream import stream_layers
from massact.analysis.detect.scan import scan_layers
from massact.models.checkpoint import load_streamed
from massact.models.loading import load
path, streamed = sys.argv[1], sys.argv[2] == "stream"
windows = [torch.arange(1, 17)[None]] * 4
if streamed:
    stream_layers(load_streamed(path, torch.float32, torch.device("cpu")), windows, batch_size=4)
else:
    scan_layers(load(path, device="cpu", log=lambda message: None), windows, batch_size=4)
# The process's own peak (VmHWM, this program's memory only): ru_maxrss would also count what the parent held when
# it forked this process.
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _wide(path: Path, n_layers: int, tokenizer) -> Path:
    """A Llama of blocks of 12.6 MB (d_model 512, d_mlp 2048, float32) and ``n_layers`` of them, saved."""
    import transformers as t

    config = t.LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=n_layers,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    t.AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="20MB")
    tokenizer.save_pretrained(path)
    return path


def test_peak_memory_stays_flat_in_depth_when_streamed(tokenizer, tmp_path):
    """Peak resident memory of a process that scans a 4-block and a 16-block model (150 MB more weights): streamed,
    the same to within 5% (one block and the next are held at a time); in memory, at least 100 MB apart, which shows
    that the measure sees the weights."""
    peaks = {}
    for n_layers in (4, 16):
        path = _wide(tmp_path / f"wide{n_layers}", n_layers, tokenizer)
        for how in ("stream", "memory"):
            run = subprocess.run([sys.executable, "-c", _PEAK, str(path), how], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr
            peaks[how, n_layers] = int(run.stdout.split()[-1])
    assert peaks["memory", 16] - peaks["memory", 4] > 100e6, peaks
    assert abs(peaks["stream", 16] - peaks["stream", 4]) < 0.05 * peaks["stream", 4], peaks


def test_a_missing_shard_or_a_tensor_of_the_wrong_shape_is_one_line_naming_it(tokenizer, tmp_path):
    _, path = _saved(tmp_path, "llama", tokenizer, plant=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.layers.2.mlp.down_proj.weight"]
    moved = path / shard
    moved.rename(tmp_path / "away")
    with pytest.raises(UsageError, match=f"cannot read {moved}: the shard is missing"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))
    (tmp_path / "away").rename(moved)

    from safetensors.torch import load_file, save_file

    tensors = load_file(moved)
    name = next(n for n in tensors if n.startswith("model.layers.2."))
    tensors[name] = torch.zeros(3, 5)
    save_file(tensors, moved, metadata={"format": "pt"})
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    with pytest.raises(UsageError, match=rf"cannot load tensor {name}: shape \[3, 5\] in {moved}, the model needs"):
        stream_layers(streamed, _windows(tokenizer)[:2])


# Massive keys: one rotary pair (dims 7 and 15 of a 16-dim head turn together) made 50 times larger at every token in
# both key heads of a softmax block, the first block of a Llama, the last of an LFM2 (where the keys are a norm's
# output: its gain, the same in every head).
QK_PLANTS = {"llama": (0, "k_proj"), "lfm2": (3, "k_layernorm")}
QK_DIMS, KV_HEADS, HEAD_DIM = (7, 15), 2, 16


@torch.no_grad()
def _plant_keys(model, family: str) -> None:
    layer, name = QK_PLANTS[family]
    weight = getattr(model.model.layers[layer].self_attn, name).weight
    rows = QK_DIMS if weight.dim() == 1 else [head * HEAD_DIM + dim for head in range(KV_HEADS) for dim in QK_DIMS]
    weight[list(rows)] *= 50.0


def _report_dir(tmp_path: Path, family: str, tokenizer) -> tuple[torch.nn.Module, Path]:
    """A tiny model of ``family`` with a planted truth (a dense neuron, or an expert's the router sends BOS to), and a
    planted massive key where ``QK_PLANTS`` has one, saved in shards of at most 100 kB."""
    from conftest import MOE_FAMILIES
    from test_families import planted, planted_moe

    model = planted_moe(family, tokenizer) if family in MOE_FAMILIES else planted(family, tokenizer)
    if family in QK_PLANTS:
        _plant_keys(model, family)
    path = tmp_path / family
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return model, path


def _comparable(report) -> dict:
    """A report's JSON without its warnings and conclusion (which say how it was read), nor whether it was streamed."""
    from massact.report.schema import write_report

    data = json.loads(write_report(report))
    for key in ("warnings", "conclusion"):
        data.pop(key)
    data["model"].pop("streamed", None)
    return data


def _close(ours, theirs, where: str = "", rel: float = 1e-5) -> None:
    """Equal structure, strings and integers; floats to within float32 summation order (``rel``, 1e-5 relative; what
    is stored rounded, to within its last digit)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            _close(ours[key], theirs[key], f"{where}.{key}", rel)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for index, (one, other) in enumerate(zip(ours, theirs)):
            _close(one, other, f"{where}[{index}]", rel)
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        # The birth state and the token view are stored to 4 and 3 significant digits: an order-of-summation
        # difference at a rounding boundary moves the last one.
        rounded = ".magnitude" in where or ".token_values.values" in where
        assert ours == pytest.approx(theirs, rel=2e-3 if rounded else rel, abs=rel), where
    else:
        assert ours == theirs, where


# A dense model, a mixture of experts (the planted truth in an expert) and a convolution hybrid; the hybrid's host
# allowance exactly its four blocks' bytes, which the trigger keeps (its carriers' probe reads block 3): the lanes'
# states have nothing left and go to their files.
@pytest.mark.parametrize("family", ["llama", "mixtral", "lfm2"])
def test_a_streamed_report_equals_the_in_memory_report(family, tokenizer, tmp_path):
    """Every section a streamed scan measures (the detection, lifelines, origins, neurons and super weights, experts,
    super experts, birth state, token view, headroom, compression valley, the trigger with its patches, and the
    verification: interventions, output effects, input dependence, attention sinks with the massive values replaced,
    super weights zeroed one by one, super experts pruned, the Q/K disruption test of planted massive keys) is the
    in-memory scan's, the planted truth found and confirmed by intervention; the checkpoint's blocks are read once per
    pass (the corpus, the lifelines with the valley, the mechanism, the trigger and the interventions in one) and the
    model's weights digest is the in-memory one."""
    import massact
    from massact.analysis.detect.stream import StreamPlace
    from massact.analysis.trigger.stream import block_bytes
    from massact.pipeline import scan_streamed

    _, path = _report_dir(tmp_path, family, tokenizer)
    memory = massact.scan(str(path), verify=True, device="cpu")
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    place = StreamPlace(folder=tmp_path / "out", host_bytes=block_bytes(streamed.lm, range(4)) if family == "lfm2" else 2**62)
    got = scan_streamed(streamed, place=place, device="cpu", verify=True)
    assert got.trigger[0].neurons[0].neuron == 37 and got.trigger[0].patching  # the planted neuron, patched
    assert [d.dim for d in got.findings.dims] == [d.dim for d in memory.findings.dims] == [20]
    assert (got.model.streamed, memory.model.streamed) == (True, False)
    found = got.mechanism.experts[0].moe if family == "mixtral" else got.mechanism.attribution[0]
    assert found.neurons[0].neuron == 37
    assert got.valley.valley == memory.valley.valley == 1 and got.valley.texts == memory.valley.texts  # the BOS row: born at 1
    verification = got.causal.verification
    assert any(row.confirms for row in verification.interventions) and got.causal.attention.texts > 0
    assert bool(got.causal.expert_pruning) == (family == "mixtral") and bool(got.causal.super_weights) == (family != "mixtral")
    _close(_comparable(got), _comparable(memory))  # the Q/K disruption test included
    # Run where keys are planted; the mixture has no massive Q/K dim, so no test and no Q/K lanes.
    assert (memory.qk.disruption is not None) == (family in QK_PLANTS)
    if family in QK_PLANTS:  # the planted dims alone found massive, and zeroed at their block
        layer, _ = QK_PLANTS[family]
        massive = {(b.layer, name, head): sorted(dims) for b in memory.qk.blocks if b.keys is not None
                   for name, heads in (("q", b.queries), ("k", b.keys)) for head, dims in enumerate(heads.dims) if dims}
        assert massive == {(layer, "k", head): list(QK_DIMS) for head in range(KV_HEADS)}
        qk_test = got.qk.disruption
        assert qk_test.blocks == [layer] and qk_test.zeroed == sum(map(len, massive.values())) == 4
        moved = lambda score: abs(math.log(score.perplexity / qk_test.base.perplexity))
        # The control's lane moves perplexity beyond the comparison's tolerance (so the comparison sees it zeroed), and
        # the massive dims' lane far more.
        assert 3e-5 < moved(qk_test.control) < moved(qk_test.massive) / 5
    blocks = sum(sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + 2 * blocks
    ratio = streamed.checkpoint.bytes_read / streamed.checkpoint.size  # blocks 3 times, embeddings and head once
    assert 2 < ratio < 3 and any(f"the checkpoint was read {ratio:.2g} times" in w for w in got.warnings), got.warnings
    assert not any((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / "stream-state.pt").exists()


# A dense model with two real engines, a mixture of experts (its fused experts quantized by the grid, not by hqq) and a
# convolution hybrid; each on the first 300 characters of the evaluation sample (6 windows of the tiny context).
@pytest.mark.parametrize("family, engines", [("llama", ("bnb", "quanto")), ("mixtral", ("hqq",)), ("lfm2", ())])
def test_a_streamed_model_is_quantized_as_in_memory(family, engines, tokenizer, tmp_path):
    """``scan --stream --quant``: every setting of the default grid and every way of each engine, as lanes of one pass
    after the massive tokens' pass, gives the in-memory sweep's rows (perplexity, the massive value at birth and peak,
    the massive tokens' error share, the engines' bytes and corrections); the massive tokens' pass reads the blocks to
    the last one a protected dim is massive in, and the settings' pass every block once."""
    import massact
    from massact.analysis.detect.stream import StreamPlace
    from massact.analysis.evaluation.perplexity import default_eval_text
    from massact.pipeline import scan_streamed

    _, path = _report_dir(tmp_path, family, tokenizer)
    text = tmp_path / "eval.txt"
    text.write_text(default_eval_text()[:300])
    options = {"quant": True, "engines": engines, "eval_file": str(text), "device": "cpu"}
    memory = massact.scan(str(path), **options)
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    got = scan_streamed(streamed, place=StreamPlace(folder=tmp_path / "out"), **options)
    ours, theirs = (dataclasses.asdict(report.deploy.quantization) for report in (got, memory))
    for sweep in (ours, theirs):  # timings differ, and nothing else may
        sweep.pop("seconds")
        for row in sweep["rows"] + sweep["engines"]:
            row.pop("seconds")
    # A quantizer rounds: an input whose last bit the order of summation moves can land one step of the quantizer
    # away (int8 of an activation: 1/127 of its row's largest), which moves a window's perplexity by about 1e-5.
    _close(ours, theirs, rel=1e-4)
    rows = memory.deploy.quantization.rows
    assert len(rows) == 20 and {r.method for r in rows} == {"rtn", "gguf", "activation"}
    assert [r.engine for r in memory.deploy.quantization.engines] == [e for e in engines for _ in range(4 if family == "llama" else 1)]
    assert memory.deploy.quantization.massive_tokens > 0 and any(r.kept_birth < 0.5 for r in rows)  # 3-bit loses the value
    sizes = [sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks]
    last = max(b for d in got.findings.dims for b in d.persists)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + 3 * sum(sizes) + sum(sizes[:last + 1])
    assert any("the quantization's massive tokens and settings" in w for w in got.warnings)
    assert not any((tmp_path / "out").glob("*.bin"))


def test_the_streamed_trigger_in_the_mechanism_pass_and_beyond_the_memory_allowance(tokenizer, tmp_path, monkeypatch):
    """Without verification the trigger runs in the mechanism's own pass on blocks 0 and 1 kept loaded (birth, peak
    and the carriers' probe at block 1), blocks 2 and 3 empty, and equals the in-memory trigger; with a host
    allowance smaller than those two blocks it is not measured, which the warnings say with both sizes. Either way
    each block is read 3 times, and every block is released after the pass."""
    import massact
    from massact.analysis.detect.stream import StreamPlace
    from massact.analysis.trigger import stream
    from massact.numbers import size
    from massact.pipeline import scan_streamed
    from massact.report.schema import write_report

    _, path = _report_dir(tmp_path, "llama", tokenizer)
    memory = massact.scan(str(path), verify=False, device="cpu")
    assert memory.trigger[0].carriers.probe_layer == memory.mechanism.lifelines[0].peak_layer == 1
    loaded = lambda lm: [next(block.parameters()).device.type for block in lm.adapter.blocks(lm.model)]
    seen, triggers = [], stream.triggers
    monkeypatch.setattr(stream, "triggers", lambda lm, *rest: seen.append(loaded(lm)) or triggers(lm, *rest))
    for allowance in (2**62, 400_000):
        streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
        prefix = stream.block_bytes(streamed.lm, range(2))
        got = scan_streamed(streamed, place=StreamPlace(folder=tmp_path / "out", host_bytes=allowance), device="cpu", verify=False)
        blocks = sum(sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks)
        assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + 2 * blocks
        assert loaded(streamed.lm) == ["meta"] * 4
        missed = [w for w in got.warnings if w.startswith("trigger not measured")]
        if allowance > prefix:
            assert missed == [] and got.trigger[0].neurons[0].neuron == 37 and seen == [["cpu", "cpu", "meta", "meta"]]
            _close(json.loads(write_report(got))["trigger"], json.loads(write_report(memory))["trigger"])
        else:
            assert prefix == 2 * 246_272 and got.trigger == [] and len(seen) == 1
            assert missed == [f"trigger not measured: blocks 0..1 ({size(prefix)}) exceed the memory allowance ({size(allowance)})"]
    assert memory.trigger and got.mechanism.attribution[0].neurons[0].neuron == 37  # the mechanism is measured still


def test_a_streamed_scan_with_nothing_massive_tests_the_massive_q_k_dims_as_in_memory(tokenizer, tmp_path):
    """No massive activation, so no mechanism pass: the Q/K concentration's own pass comes before the interventions'
    pass, which tests the planted keys; the Q/K section is the in-memory one, disruption test included, and the
    blocks are read 3 times (the corpus, the valley and Q/K concentration, the interventions)."""
    import massact
    from massact.analysis.detect.stream import StreamPlace
    from massact.pipeline import scan_streamed
    from massact.report.schema import write_report

    model = tiny_model("llama", len(tokenizer))
    _plant_keys(model, "llama")
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "m")
    memory = massact.scan(str(tmp_path / "m"), verify=True, device="cpu")
    streamed = load_streamed(str(tmp_path / "m"), torch.float32, torch.device("cpu"))
    got = scan_streamed(streamed, place=StreamPlace(folder=tmp_path / "out"), device="cpu", verify=True)
    assert not got.findings.dims and not memory.findings.dims
    assert got.qk.disruption.blocks == [QK_PLANTS["llama"][0]] and got.qk.disruption.zeroed == len(QK_DIMS) * KV_HEADS
    _close(json.loads(write_report(got))["qk"], json.loads(write_report(memory))["qk"])
    blocks = sum(sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + 2 * blocks


def test_hidden_states_beyond_memory_go_to_a_mapped_file_and_give_the_same_scan(tokenizer, tmp_path):
    """With no host memory allowed, every batch's hidden states live in the memory-mapped file in the output
    folder, which the pass writes in place block after block: the statistics are those held in memory, exactly; the
    file is removed at the end."""
    from massact.analysis.detect.stream import StreamPlace
    from massact.capture.streaming import HiddenStates

    _, path = _saved(tmp_path, "llama", tokenizer, plant=True)
    windows = _windows(tokenizer)
    held = stream_layers(load_streamed(str(path), torch.float32, torch.device("cpu")), windows, batch_size=4)
    seen: list[int] = []
    spilled = stream_layers(load_streamed(str(path), torch.float32, torch.device("cpu")), windows, batch_size=4,
                            on_block=lambda layer: seen.append((tmp_path / "out" / "stream-hidden.bin").stat().st_size),
                            place=StreamPlace(folder=tmp_path / "out", host_bytes=0))
    widths = [ids.shape[1] for ids in windows]
    batches = [max(widths[i:i + 4]) * len(widths[i:i + 4]) for i in range(0, len(widths), 4)]
    assert seen == [sum(batches) * 64 * 4] * 4  # [batch, positions, d_model] float32 per batch, the same file each block
    for ours, theirs in zip(spilled.tops, held.tops):
        assert torch.equal(ours.values, theirs.values) and torch.equal(ours.labels, theirs.labels)
    assert not (tmp_path / "out" / "stream-hidden.bin").exists()

    states = HiddenStates(device=torch.device("cpu"), device_bytes=0, host_bytes=2 * 4 * 3, path=tmp_path / "s.bin")
    values = [torch.randn(2, 3), torch.randn(2, 3), (torch.randn(1, 3), None)]
    for index, value in enumerate(values):
        states.put(index, value)
    assert states.places == {0: "host", 1: "file", 2: "file"}
    saved = states.persist()
    again = HiddenStates(device=torch.device("cpu"), device_bytes=0, host_bytes=0, path=tmp_path / "s.bin")
    again.restore(saved)
    assert torch.equal(again.get(0), values[0]) and torch.equal(again.get(1), values[1])
    assert torch.equal(again.get(2)[0], values[2][0]) and again.get(2)[1] is None


def test_an_interrupted_streamed_scan_resumes_at_the_next_block_to_the_same_statistics(tokenizer, tmp_path):
    """Stopped after block 2 (Ctrl-C, or a SIGTERM the command line turns into one), the pass leaves its statistics
    and the hidden states after block 2 in the output folder; resumed, it reads blocks 3 on alone and gives the
    uninterrupted statistics exactly. Another corpus is refused in one line."""
    from massact.analysis.detect.stream import StreamPlace

    _, path = _saved(tmp_path, "llama", tokenizer, plant=True)
    windows = _windows(tokenizer)
    whole = stream_layers(load_streamed(str(path), torch.float32, torch.device("cpu")), windows, batch_size=4)

    def stop(layer: int) -> None:
        if layer == 2:
            raise KeyboardInterrupt

    place = StreamPlace(folder=tmp_path / "out", identity="x")
    with pytest.raises(KeyboardInterrupt):
        stream_layers(load_streamed(str(path), torch.float32, torch.device("cpu")), windows, batch_size=4, on_block=stop,
                      place=place)
    assert (tmp_path / "out" / "stream-state.pt").is_file() and (tmp_path / "out" / "stream-hidden.bin").is_file()
    with pytest.raises(UsageError, match="stream-state.pt: it is of other texts or settings"):
        stream_layers(load_streamed(str(path), torch.float32, torch.device("cpu")), windows[:3], batch_size=4,
                      place=StreamPlace(folder=tmp_path / "out", identity="x", resume=True))
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    before = streamed.checkpoint.bytes_read
    resumed = stream_layers(streamed, windows, batch_size=4, place=StreamPlace(folder=tmp_path / "out", identity="x", resume=True))
    assert streamed.checkpoint.bytes_read - before == sum(streamed.checkpoint.sizes[name] for name in streamed.checkpoint.blocks[3])
    for ours, theirs in zip(resumed.tops, whole.tops):
        assert torch.equal(ours.values, theirs.values) and torch.equal(ours.labels, theirs.labels)
    assert resumed.medians() == whole.medians()
    assert not (tmp_path / "out" / "stream-state.pt").exists()


def test_the_command_line_streams_and_the_report_reads_back(tokenizer, tmp_path, capsys, monkeypatch):
    """``scan DIR --stream`` writes a report that ``verify`` completes in memory (the weights digest is the in-memory
    model's) and ``compare`` reads; a model larger than ``--memory`` is streamed with a line saying so; bad input is
    one line."""
    from conftest import run_massact
    from massact.analysis.evaluation.perplexity import default_eval_text
    from test_bad_input import run_main

    _, path = _report_dir(tmp_path, "llama", tokenizer)
    out = tmp_path / "report"
    run = run_massact("scan", str(path), "--stream", "--out", str(out), "--format", "json", "--quiet")
    assert run.returncode == 0, run.stderr
    saved = json.loads((out / "report.json").read_text())
    assert saved["findings"]["dims"][0]["dim"] == 20 and saved["mechanism"]["attribution"][0]["neurons"][0]["neuron"] == 37
    assert any("streamed model" in w for w in saved["warnings"])
    run = run_massact("verify", str(out), "--quiet", "--format", "json")
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "report.json").read_text())["causal"]["verification"]
    from safetensors.torch import load_file

    size = sum(t.numel() * 4 for shard in path.glob("*.safetensors") for t in load_file(shard).values())  # float32
    auto = tmp_path / "auto"
    code, err = run_main(capsys, "scan", path, "--memory", "100kB", "--out", auto, "--format", "json")
    assert code == 0, err
    assert json.loads((auto / "report.json").read_text())["causal"]["default"].startswith(
        "verified by default: the interventions were estimated at")
    assert (f"streaming the model block by block: its weights ({size / 1e6:.1f} MB in float32) exceed the memory limit "
            "(100.0 kB, --memory)") in err
    assert run_main(capsys, "compare", out, tmp_path / "auto", "--out", tmp_path / "cmp")[0] == 0
    for args, fragments in ((("--memory", "lots"), ["--memory 'lots'"]),
                            (("--stream", "--device-map", "auto"), ["--device-map", "streamed"])):
        code, err = run_main(capsys, "scan", path, *args, "--out", tmp_path / "x")
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(f in err for f in fragments), err
    code, err = run_main(capsys, "scan", tmp_path / "nowhere", "--stream", "--out", tmp_path / "x")
    assert code == 2 and "--stream reads a model directory of safetensors files" in err, err
    text = tmp_path / "eval.txt"
    text.write_text(default_eval_text()[:300])
    code, err = run_main(capsys, "quant", out, "--quant-grid", "none", "--engine", "bnb", "--eval-file", text, "--memory", "100kB")
    assert "streaming the model block by block" in err and "(100.0 kB, --memory)" in err, err
    monkeypatch.setattr("massact.models.checkpoint.available_memory", lambda: 1000)  # the model no longer fits
    swept = json.loads((out / "report.json").read_text())["deploy"]["quantization"]
    assert code == 0 and [row["kind"] for row in swept["engines"]] == ["all", "protected", "control", "sparse"], err
    assert swept["engines"][1]["modules_in_float"] == ["model.layers.1.mlp.down_proj"]  # the planted super weight's
    code, err = run_main(capsys, "verify", out, "--format", "json")  # streamed, the sweep kept: its inputs are the same
    assert code == 0 and "kept the saved quantization sweep" in err, err
    assert json.loads((out / "report.json").read_text())["deploy"]["quantization"] == swept
    code, err = run_main(capsys, "quant", path, "--protect", out / "protect.json", "--out", tmp_path / "x")
    assert code == 2 and "quant --protect runs the model in memory, and its weights" in err and "(1.0 kB)" in err, err
    code, err = run_main(capsys, "verify", auto, "--format", "json")  # streamed again, verified this time
    verified = json.loads((auto / "report.json").read_text())
    assert code == 0 and verified["settings"]["verify"] and verified["causal"]["verification"]["interventions"], err
    assert any("the mechanism and the interventions" in w for w in verified["warnings"])
    from safetensors.torch import save_file

    shard = next(f for f in sorted(path.glob("*.safetensors")) if any(".layers.1." in name for name in load_file(f)))
    tensors = load_file(shard)
    name = next(name for name in tensors if ".layers.1." in name and name.endswith("weight"))
    tensors[name] = tensors[name] + 1.0  # another model in the report's folder: verify refuses it, and writes nothing
    save_file(tensors, shard, metadata={"format": "pt"})
    before = (auto / "report.json").read_bytes()
    code, err = run_main(capsys, "verify", auto, "--format", "json")
    assert code == 2 and "was made from other weights than the model loaded now" in err and len(err.strip().splitlines()) == 1, err
    assert (auto / "report.json").read_bytes() == before
# Quantized checkpoints, written here as the big models ship them. FP8: DeepSeek-V3's layout (each linear's float8
# weight with its weight_scale_inv, the experts apart), in blocks of 16 rows x 32 columns, so that kv_a_proj_with_mqa
# (24 rows) ends in a short row of blocks and kv_b_proj (16 columns) is one short column. MXFP4: gpt-oss's experts.
FP8_BLOCK = (16, 32)
FP8_SETTINGS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK)}
MXFP4_SETTINGS = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                      "model.embed_tokens", "lm_head"]}
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 codes 0-7; code + 8 is the negative


def _fp8(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A linear's weight [rows, columns] as an FP8 checkpoint stores it, and its dequantized value: each block of
    FP8_BLOCK values divided by its largest |value| / 448 (float8 e4m3's largest), rounded to float8; the scale
    (weight_scale_inv) is that divisor. Dequantized: each code times its block's scale, the block found by index."""
    rows, columns = weight.shape
    scale = torch.tensor([[weight[i:i + FP8_BLOCK[0], j:j + FP8_BLOCK[1]].abs().max().item() / 448.0
                           for j in range(0, columns, FP8_BLOCK[1])] for i in range(0, rows, FP8_BLOCK[0])])
    per_value = scale[torch.arange(rows)[:, None] // FP8_BLOCK[0], torch.arange(columns)[None, :] // FP8_BLOCK[1]]
    codes = (weight / per_value).to(torch.float8_e4m3fn)
    dequantized = codes.float() * per_value
    assert ((dequantized - weight).abs() <= weight.abs() / 16 + per_value / 512).all()  # e4m3's 3 bits, its subnormals
    return {"weight": codes, "weight_scale_inv": scale}, dequantized


def _mxfp4(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A gpt-oss experts parameter [experts, in, out] as its MXFP4 checkpoint stores it, and its dequantized value:
    per expert and output row, 32 consecutive inputs share the exponent e, the smallest with max |w| / 2^e <= 6 (its
    byte e + 127 in the scales), each value w / 2^e rounded to the nearest e2m1 value, two codes to a byte (the even
    input in the low half). Dequantized: the rounded values times 2^e, before any packing."""
    rows = weight.transpose(1, 2)  # [experts, out, in]: the checkpoint's rows
    grouped = rows.reshape(*rows.shape[:2], rows.shape[2] // 32, 32)
    exponent = torch.ceil(torch.log2(grouped.abs().amax(-1) / 6.0))
    scaled = grouped / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1)
    codes = magnitude + 8 * (scaled < 0)
    packed = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)  # [experts, out, in / 32, 16]
    values = FP4_MAGNITUDES[magnitude] * scaled.sign() * torch.exp2(exponent)[..., None]
    assert ((values - grouped).abs() <= torch.exp2(exponent)[..., None]).all()  # within e2m1's widest step
    stored = {"blocks": packed, "scales": (exponent + 127).to(torch.uint8)}
    return stored, values.reshape(rows.shape).transpose(1, 2).contiguous()


def _quantize_fp8(name: str, tensor: torch.Tensor):
    """DeepSeek-V3's choice: every linear of the blocks in FP8, the router (mlp.gate), norms, embeddings, head not."""
    if not (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2 and ".mlp.gate." not in name):
        return None
    stored, dequantized = _fp8(tensor.float())
    return {name.removesuffix("weight") + key: value for key, value in stored.items()}, dequantized


def _quantize_mxfp4(name: str, tensor: torch.Tensor):
    """gpt-oss's choice: the experts' two matrices in MXFP4 (their biases, attention and router not)."""
    if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return None
    stored, dequantized = _mxfp4(tensor.float())
    return {f"{name}_{key}": value for key, value in stored.items()}, dequantized


_FORMATS = {"fp8": ("deepseek_v3", _quantize_fp8, FP8_SETTINGS), "mxfp4": ("gpt_oss", _quantize_mxfp4, MXFP4_SETTINGS)}


def _quantized(tmp_path: Path, form: str, tokenizer) -> tuple[Path, torch.nn.Module, int]:
    """A tiny model saved in shards, its weights quantized in format ``form`` (the config saying so); the model
    holding the dequantized weights (read back from a plain checkpoint of them), and the bytes the checkpoint stores."""
    import transformers as t
    from safetensors.torch import load_file, save_file

    family, quantize, settings = _FORMATS[form]
    model = tiny_model(family, len(tokenizer))
    path = tmp_path / form
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    dense, stored_bytes = {}, 0
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, tensor in load_file(path / file).items():
            done = quantize(name, tensor)
            stored, dense[name] = done if done is not None else ({name: tensor}, tensor)
            tensors.update(stored)
            index["weight_map"].update(dict.fromkeys(stored, file))
            stored_bytes += sum(value.numel() * value.element_size() for value in stored.values())
        save_file(tensors, path / file, metadata={"format": "pt"})
        for name in set(index["weight_map"]) - set(tensors):  # the names quantized away
            if index["weight_map"][name] == file:
                del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, quantization_config=settings)))
    plain = tmp_path / f"{form}-dequantized"
    model.config.save_pretrained(plain)
    save_file(dense, plain / "model.safetensors", metadata={"format": "pt"})
    reference = t.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()
    return path, reference, stored_bytes


@pytest.mark.parametrize("form", ["fp8", "mxfp4"])
def test_a_quantized_checkpoint_streams_its_dequantized_weights_and_their_scan(form, tokenizer, tmp_path):
    """A block-scaled FP8 DeepSeek-V3 and an MXFP4 gpt-oss: each streamed block holds the weights dequantized here
    (exactly, in float32 and in bfloat16), the streamed scan gives the statistics of the model holding them in
    memory, and the pass reads every stored tensor, scales included, once: the checkpoint's bytes as stored."""
    from massact.capture.streaming import blocks

    path, reference, stored_bytes = _quantized(tmp_path, form, tokenizer)
    windows = _windows(tokenizer)
    memory = scan_layers(wrap(reference, tokenizer), windows, batch_size=4)
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    got = stream_layers(streamed, windows, batch_size=4)
    checkpoint = streamed.checkpoint
    assert checkpoint.size == stored_bytes and checkpoint.bytes_read == stored_bytes
    # Every block's tensors, its scales included, read with that block; nothing of a block read before the pass
    assert all(name.startswith(f"model.layers.{layer}.") for layer, names in enumerate(checkpoint.blocks) for name in names)
    assert not any(name.startswith("model.layers.") for name in checkpoint.rest)
    assert sum(map(len, checkpoint.blocks)) + len(checkpoint.rest) == len(checkpoint.files)
    _assert_same_scan(got, memory)

    streamed = load_streamed(str(path), torch.bfloat16, torch.device("cpu"))
    layers = streamed.lm.adapter.blocks(streamed.lm.model)
    dequantized = 0
    for layer in blocks(streamed, range(len(layers))):
        theirs = dict(reference.model.layers[layer].named_parameters())
        for name, parameter in layers[layer].named_parameters():
            # The quantized weights in the dtype asked for; the others as the model keeps them (DeepSeek's router in float32)
            assert torch.equal(parameter, theirs[name].to(parameter.dtype)), name
            experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
            if experts or (form == "fp8" and "_proj" in name):
                assert parameter.dtype == torch.bfloat16, name
                dequantized += 1
    # DeepSeek-V3: 5 attention linears a block, 3 in the dense MLP of block 0, 3 shared and 2 fused experts after it
    assert dequantized == (4 * 5 + 3 + 3 * 5 if form == "fp8" else 4 * 2)
    assert streamed.checkpoint.bytes_read == stored_bytes


def _replace(path: Path, name: str, tensor: torch.Tensor | None) -> Path:
    """Store ``tensor`` as ``name`` in its shard, or remove it (None); the shard's path."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name], index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_a_quantized_checkpoint_without_its_scales_or_its_config_is_one_line_naming_it(tokenizer, tmp_path):
    path, _, _ = _quantized(tmp_path, "fp8", tokenizer)
    weight = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"
    shard = _replace(path, weight + "_scale_inv", torch.ones(3, 2))  # its grid is [2, 2]: 24 rows in blocks of 16
    streamed = load_streamed(str(path), torch.float32, torch.device("cpu"))
    with pytest.raises(UsageError, match=rf"cannot load tensor {weight} from {shard}: scale grid \[3, 2\] does not cover"):
        stream_layers(streamed, _windows(tokenizer)[:2])
    _replace(path, weight + "_scale_inv", None)
    with pytest.raises(UsageError, match=rf"^cannot dequantize {weight} \({shard}\): its scale {weight}_scale_inv is not in"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))
    config = json.loads((path / "config.json").read_text())
    settings = config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="stores quantized tensors .* but config.json has no quantization_config"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))
    (path / "config.json").write_text(json.dumps(dict(config, quantization_config=dict(settings, quant_method="awq"))))
    with pytest.raises(UsageError, match="a streamed model reads fp8 and mxfp4 checkpoints; its quantization_config says 'awq'"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))

    path, _, _ = _quantized(tmp_path, "mxfp4", tokenizer)
    blocks = "model.layers.1.mlp.experts.down_proj_blocks"
    shard = _replace(path, "model.layers.1.mlp.experts.down_proj_scales", None)
    with pytest.raises(UsageError, match=rf"^cannot dequantize {blocks} \({shard}\): its scales "
                                         r"model.layers.1.mlp.experts.down_proj_scales are not in the checkpoint$"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"stores quantized tensors \(model.layers.0.mlp.experts.gate_up_proj_blocks\) but"):
        load_streamed(str(path), torch.float32, torch.device("cpu"))


def test_the_streaming_benchmark_writes_a_checkpoint_that_transformers_loads_whole(tokenizer, tmp_path):
    """benchmarks/bench_stream.py's builder, which writes the shards and index by hand: transformers loads every
    parameter from them (none missing, none left over), the index's total and the block size it planned are the loaded
    model's own bytes, and a block is at most a sixth of the limit."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    path = Path(__file__).parent.parent / "benchmarks" / "bench_stream.py"
    spec = importlib.util.spec_from_file_location("bench_stream", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    limit = bench.parse_size("24MB")
    built = bench.build(tmp_path, bench.parse_size("10MB"), limit, lambda message: None, tokenizer)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert built["bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert built["shapes"]["block_bytes"] == block <= limit / 6 and len(model.model.layers) == 3
    assert built["shards"] > 1 and float(model.model.layers[1].input_layernorm.weight.mean()) == 1.0
    assert abs(float(model.model.layers[1].mlp.down_proj.weight.std()) - 0.02) < 1e-3
    assert bench.build(tmp_path, bench.parse_size("10MB"), limit, lambda message: None, tokenizer) == built  # kept, not rebuilt


def test_the_report_benchmark_plants_its_massive_activation_in_the_tensors_transformers_loads(tokenizer, tmp_path, monkeypatch):
    """benchmarks/bench_stream_report.py's planting, done on each shard's tensors by name as they are drawn: the
    checkpoint transformers loads is the unplanted build's bit for bit but at the planted entries, which hold what
    conftest's plant_mlp sets in a model (the trigger dim on <s> alone, written by no block; the neuron reading it alone
    and writing the planted dim, which no other weight writes) and the scaled key pair; and the loaded model's planted
    dim is massive on <s> from its block on, and nowhere else."""
    from transformers import AutoModelForCausalLM

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    from bench_stream import build, parse_size
    from bench_stream_report import Plant

    limit, size, quiet = parse_size("24MB"), parse_size("10MB"), lambda message: None
    plant = Plant()
    built = build(tmp_path / "planted", size, limit, quiet, tokenizer, plant=plant)
    plain = build(tmp_path / "plain", size, limit, quiet, tokenizer)
    assert (built["plant"], plain["plant"]) == (repr(plant), None) and built["shapes"] == plain["shapes"]
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "planted", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    weights, unplanted = model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    bos, k, d, n, layer = tokenizer.bos_token_id, plant.trigger, plant.dim, plant.neuron, plant.layer
    changed = {name: torch.zeros_like(tensor, dtype=torch.bool) for name, tensor in weights.items()}
    embedding = weights["model.embed_tokens.weight"]
    assert embedding[bos, k] == 10.0 and not embedding[:, k].clone().index_fill_(0, torch.tensor([bos]), 0).any()
    changed["model.embed_tokens.weight"][:, k] = True
    for block in range(model.config.num_hidden_layers):
        for part in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{block}.{part}.weight"
            writes = weights[name][[k, d]].clone()
            if block == layer and part == "mlp.down_proj":
                assert writes[1, n] == 100.0
                writes[1, n] = 0.0
            assert not writes.any()
            changed[name][[k, d]] = True
    for part in ("gate_proj", "up_proj"):
        name = f"model.layers.{layer}.mlp.{part}.weight"
        assert weights[name][n, k] == 2.0 and int((weights[name][n] != 0).sum()) == 1
        changed[name][n] = True
    name, rows = f"model.layers.{plant.key_layer}.self_attn.k_proj.weight", [7, 39]
    assert plant.key_pair == (7, 39) and head_dim == 64 and model.config.num_key_value_heads == 1
    assert torch.equal(weights[name][rows], unplanted[name][rows] * 50.0)
    changed[name][rows] = True
    for name, tensor in weights.items():  # every other entry is the unplanted build's, bit for bit
        assert torch.equal(tensor[~changed[name]], unplanted[name][~changed[name]]), name
    ids = tokenizer("The library opens at nine.", return_tensors="pt").input_ids
    assert ids[0, 0] == bos
    outputs = []  # each block's output (the model's last hidden state is the final norm's)
    hooks = [block.register_forward_hook(lambda _, __, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    values = torch.stack([out[0, :, d] for out in outputs])  # block x position
    assert (values[layer:, 0] > 1e4).all() and float(values[:layer, 0].abs().max()) < 1.0
    assert float(values[:, 1:].abs().max()) < 1.0
    assert build(tmp_path / "plain", size, limit, quiet, tokenizer, plant=plant)["plant"] == repr(plant)  # built again, planted


def test_the_report_benchmark_finds_every_section_of_a_streamed_report(tmp_path):
    """benchmarks/bench_stream_report.py on a small model (40MB of weights under a 20MB limit, 12 blocks): it runs
    massact scan as a user does, and its table has every section of the report, the planted dim born in block 1,
    its neuron and super weight, and the checkpoint's reads from the report's own warning."""
    script = Path(__file__).parent.parent / "benchmarks" / "bench_stream_report.py"
    done = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path), "--size", "40MB", "--memory", "20MB"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in done.stdout.splitlines() if line.startswith("| ")}
    sections = ["detection", "mechanism", "trigger", "verification", "attention sinks", "super weights zeroed", "quantization",
                "precision headroom", "compression valley", "Q/K"]
    assert all(rows[name][0] == "yes" for name in sections), done.stdout
    assert rows["detection"][1].startswith("massive dims [200] (planted [200]), born at block 1 (planted 1)")
    assert "top neuron 700 (planted 700); super weight model.layers.1.mlp.down_proj.weight[200, 700] = +100" in rows["mechanism"][1]
    assert "zero super weight [200, 700]" in rows["verification"][1] and "(verification's: the same)" in rows["quantization"][1]
    assert rows["Q/K"][1].startswith("massive keys in 1 head(s) of block 0 (planted); disruption test: 2 dims zeroed in blocks [0]")
    reads = float(rows["times the checkpoint was read (the report's warning)"][0].split("**")[1])
    # Every block 5 times (the corpus, the lifelines, the mechanism and interventions, the quantization's massive tokens, to
    # the last block, where the planted dim is still massive, and its settings); the embeddings and head once.
    assert 4.5 < reads < 5
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["model"]["streamed"] and report["settings"]["verify"] and report["settings"]["quant"]
