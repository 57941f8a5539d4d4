"""The corpus carried block by block from a sharded checkpoint (``massact.capture.streaming``): the streamed layer scan
against the in-memory one, what the pass reads, memory flat in depth, and damaged checkpoints."""

from __future__ import annotations

import json
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
    assert got.slots == memory.slots and len(got.tops) == len(memory.tops)
    # The same block code on the same inputs: the same values, up to what another summation order could change.
    for ours, theirs in zip(got.tops, memory.tops):
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.labels[:8], theirs.labels[:8])
    torch.testing.assert_close(torch.tensor(got.slot_medians()), torch.tensor(memory.slot_medians()), rtol=1e-3, atol=0)
    if memory.experts is not None:
        for ours, theirs in zip(got.experts, memory.experts):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if plant:  # the planted dim at its block, on BOS (text 0, position 0)
        layer, _, dim = PLANTED
        value, (text, position, found) = next(iter(got.tops[layer].items()))
        assert (text, position, found) == (0, 0, dim) and abs(value) > 1000


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
