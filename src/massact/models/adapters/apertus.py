"""Apertus: pre-norm blocks with their own norm names (``attention_layernorm``, ``feedforward_layernorm``) and a plain
(ungated) MLP whose activation is xIELU, quadratic for positive inputs: down(xIELU(up(x)))."""

import dataclasses

from . import llama
from .base import Mlp

APERTUS = dataclasses.replace(
    llama.ADAPTER,
    family="Apertus",
    model_types=("apertus",),
    mlp=Mlp(gate=None),
    mlp_norm=("feedforward_layernorm",),
    notes="ungated MLP with the xIELU activation (quadratic above zero)",
)
