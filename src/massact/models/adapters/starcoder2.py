"""StarCoder2: sequential pre-LN blocks (LayerNorm with a bias, ``input_layernorm`` and ``post_attention_layernorm``),
biased projections and an ungated MLP: c_proj(act(c_fc(x)))."""

import dataclasses

from . import llama
from .base import Mlp

STARCODER2 = dataclasses.replace(
    llama.ADAPTER,
    family="StarCoder2",
    model_types=("starcoder2",),
    mlp=Mlp(up="c_fc", gate=None, down="c_proj", act="act"),
    notes="ungated MLP c_fc -> act -> c_proj; LayerNorms with a bias",
)
