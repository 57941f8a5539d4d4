"""Cohere-2 (Command R7B, Command A): a parallel block with one shared LayerNorm, as GPT-J:
resid_out = resid_in + attn(ln(resid_in)) + mlp(ln(resid_in)). Sliding-window blocks use rotary positions; the
full-attention blocks (one in four) use none (NoPE)."""

import dataclasses

from . import llama
from .base import Variant, layer_types

COHERE2 = dataclasses.replace(
    llama.ADAPTER,
    family="Cohere-2",
    model_types=("cohere2",),
    parallel=True,
    mlp_norm=("input_layernorm",),
    # Only a sliding-window block applies the rotary embedding.
    variants=(Variant(when=lambda config, layer: not (config.sliding_window is not None
                                                      and layer_types(config, layer) == "sliding_attention"),
                      changes={"positions": False}),),
    notes="parallel block: attention and MLP read the same normed input (one shared input_layernorm); full-attention "
          "blocks use no rotary positions",
)
