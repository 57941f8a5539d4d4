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
