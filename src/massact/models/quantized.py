"""Quantized checkpoints read block by block, dequantized to the scan's dtype as each block is read.

Two formats the large models ship in are read, through transformers' own quantizers in their ``dequantize`` mode:
their weight converters collect each quantized tensor with its scales (and, for experts stored apart, dequantize each
expert before the experts are fused), so that what a block holds is what ``from_pretrained`` would dequantize.

- Block-scaled FP8 (``quant_method: fp8``, DeepSeek-V3/R1, Qwen3-FP8): a linear's ``weight`` is float8 and its
  ``weight_scale_inv`` (float32, one per block of ``weight_block_size`` = [rows, columns] of the weight) multiplies
  every value of its block. The blocks at the bottom and right edges are cut short where the weight's size is not a
  multiple of the block's (DeepSeek-V3's ``kv_a_proj_with_mqa``: 576 rows, 5 blocks of 128), so the scale grid is
  [ceil(rows / block rows), ceil(columns / block columns)]. transformers' ``Fp8Dequantize`` infers the block from the
  grid instead (576 / 5 is no whole block: it refuses the tensor, or, where the division happens to be whole, gives
  blocks of the wrong size), so its one-tensor step is replaced here, the rest of its path kept.
- MXFP4 experts (``quant_method: mxfp4``, gpt-oss): ``X_blocks`` holds two FP4 (e2m1) values per byte, 32 values per
  block, and ``X_scales`` one power-of-two exponent per block (E8M0: 2 ** (byte - 127)); transformers'
  ``Mxfp4Dequantize`` dequantizes them as it is.

The modules the checkpoint leaves unquantized (embeddings, norms, head, routers) are read as stored, cast to the
scan's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UsageError

READ = ("fp8", "mxfp4")  # the quantization methods a streamed model reads
FP8 = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the float8 dtypes


def quant_method(config) -> str | None:
    """The checkpoint's quantization method, from its config's ``quantization_config`` (None: not quantized)."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    method = settings.get("quant_method") if isinstance(settings, dict) else getattr(settings, "quant_method", None)
    return str(getattr(method, "value", method))


def dequantizer(config, name: str):
    """transformers' quantizer for the checkpoint of ``config`` in its ``dequantize`` mode (None where the checkpoint is
    not quantized); a method this module does not read is one UsageError line."""
    method = quant_method(config)
    if method is None:
        return None
    if method not in READ:
        raise UsageError(f"{name}: a streamed model reads {' and '.join(READ)} checkpoints; its quantization_config "
                         f"says {method!r}")
    from transformers.quantizers.auto import AutoQuantizationConfig
    from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

    settings = config.quantization_config
    settings = dict(settings if isinstance(settings, dict) else settings.to_dict(), dequantize=True)
    try:
        parsed = AutoQuantizationConfig.from_dict(settings)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{name}: cannot read its quantization_config: {error}") from None
    return _fp8_quantizer()(parsed, pre_quantized=True) if method == "fp8" else Mxfp4HfQuantizer(parsed, pre_quantized=True)


@functools.cache
def _fp8_quantizer():
    """transformers' FP8 quantizer with its dequantization step (``Fp8Dequantize``) taking the block size from the
    config rather than from the scale grid (built on first use: transformers is imported lazily)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    class BlockFp8Dequantize(Fp8Dequantize):
        def _dequantize_one(self, quantized: torch.Tensor, scales: torch.Tensor,
                            output_dtype: torch.dtype | None = None) -> torch.Tensor:
            block = getattr(self.hf_quantizer.quantization_config, "weight_block_size", None)
            # Per-tensor scales, packed FP4 values and E8M0 byte scales: transformers' own step
            if block is None or scales.dim() < 2 or not quantized.dtype.is_floating_point or scales.dtype == torch.uint8:
                return super()._dequantize_one(quantized, scales, output_dtype)
            return dequantize_fp8(quantized, scales, tuple(block), output_dtype or torch.bfloat16)

    class BlockFp8Quantizer(FineGrainedFP8HfQuantizer):
        def get_load_operations(self):
            return {"dequantize": BlockFp8Dequantize}

    return BlockFp8Quantizer


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``weight`` [..., rows, columns] (float8) times its block's scale, in ``dtype``: ``scale_inv`` [..., ceil(rows /
    block[0]), ceil(columns / block[1])] holds one factor per block of ``block`` values, the last row and column of
    blocks cut to the weight's edge. The product is taken in float32 (a float8 value times a float32 scale), then cast."""
    rows, columns = weight.shape[-2:]
    grid = (-(-rows // block[0]), -(-columns // block[1]))
    if tuple(scale_inv.shape[-2:]) != grid or scale_inv.shape[:-2] != weight.shape[:-2]:
        raise ValueError(f"scale grid {list(scale_inv.shape)} does not cover a weight of {list(weight.shape)} in blocks "
                         f"of {list(block)} (it needs {[*weight.shape[:-2], *grid]})")
    factors = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=-2)[..., :rows, :]
    factors = factors.repeat_interleave(block[1], dim=-1)[..., :columns]
    return weight.to(torch.float32).mul_(factors).to(dtype)


def check_scales(root: Path, method: str | None, files: Mapping[str, str], dtypes: Mapping[str, str],
                 renamed: Mapping[str, str]) -> None:
    """Refuse, in one UsageError line naming it, a quantized tensor whose scales the checkpoint lacks (a float8 weight
    without its ``weight_scale_inv``, MXFP4 ``X_blocks`` without ``X_scales``), which transformers would load as raw
    codes; and scales in a checkpoint whose config does not say it is quantized. ``dtypes`` maps each stored name to
    its safetensors dtype, ``renamed`` to its name after transformers' renamings (some checkpoints call the FP8 scale
    ``.scale``)."""
    if method is None:
        scale = next((name for name in files if name.endswith("weight_scale_inv")
                      or name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in files), None)
        if scale is not None:
            raise UsageError(f"{root}: the checkpoint stores quantized tensors ({scale}) but config.json has no "
                             f"quantization_config")
        return
    if method == "fp8":
        have = set(renamed.values())
        for name in files:
            if dtypes[name] in FP8 and renamed[name].endswith(".weight") and renamed[name] + "_scale_inv" not in have:
                raise UsageError(f"cannot dequantize {name} ({root / files[name]}): its scale {name}_scale_inv is not "
                                 f"in the checkpoint")
    else:
        for name in files:
            if name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" not in files:
                raise UsageError(f"cannot dequantize {name} ({root / files[name]}): its scales "
                                 f"{name.removesuffix('_blocks')}_scales are not in the checkpoint")
