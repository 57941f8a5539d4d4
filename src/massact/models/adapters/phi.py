"""Phi-2 (parallel block, one shared input norm, fc1/fc2 GELU MLP) and Phi-3 (sequential pre-RMSNorm block, gated
MLP with gate and up fused in ``gate_up_proj``: the first half of its output is the gate, the second half up)."""

import dataclasses

import torch

from . import llama
from .base import Adapter, Cut, Mlp, kv_heads

PHI2 = Adapter(
    family="Phi-2",
    model_types=("phi",),
    layers="layers",
    attention_out="dense",
    mlp=Mlp(up="fc1", gate=None, down="fc2", act="activation_fn"),
    parallel=True,
    mlp_norm=("input_layernorm",),
    values=Cut("self_attn.v_proj"),
    queries=("self_attn.q_layernorm", "self_attn.q_proj"),  # the norms where qk_layernorm is set
    keys=("self_attn.k_layernorm", "self_attn.k_proj"),
    notes="parallel block: attention and MLP read the same normed input (one shared input_layernorm)",
)


def _fused_values(qkv: torch.Tensor, config) -> torch.Tensor:
    """The value vectors of Phi-3's fused q | k | v output: its last kv x head_dim columns (head_dim = width /
    (heads + 2 kv)), per key/value head."""
    kv = kv_heads(config)
    head_dim = qkv.shape[-1] // (config.num_attention_heads + 2 * kv)
    return qkv[..., -kv * head_dim:].reshape(*qkv.shape[:2], kv, head_dim)


PHI3 = dataclasses.replace(
    llama.ADAPTER,
    family="Phi-3",
    model_types=("phi3",),
    mlp=Mlp(up="gate_up_proj", gate=None, fused=True, act="activation_fn"),
    values=Cut("self_attn.qkv_proj", _fused_values),
    queries=(), keys=(),  # fused in qkv_proj
    notes="gate and up projections fused in gate_up_proj (gate: first half of its rows, up: second half)",
)
