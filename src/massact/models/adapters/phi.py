"""Phi-2 (parallel block, one shared input norm, fc1/fc2 GELU MLP) and Phi-3 (sequential pre-RMSNorm block, gated
MLP with gate and up fused in ``gate_up_proj``: the first half of its output is the gate, the second half up)."""

import torch

from .base import Adapter, Cut, kv_heads
from .llama import ADAPTER as LLAMA

PHI2 = Adapter(
    family="Phi-2",
    model_types=("phi",),
    layers="layers",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "mlp_in": ("mlp", "in"),
        "mlp_up": ("mlp.fc1", "out"),
        "mlp_act": ("mlp.fc2", "in"),
        "mlp_out": ("mlp", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="self_attn.dense",
    mlp_up="mlp.fc1",
    mlp_down="mlp.fc2",
    act_fn="mlp.activation_fn",
    mlp_norm=("input_layernorm",),
    values=Cut("self_attn.v_proj"),
    notes="parallel block: attention and MLP read the same normed input (one shared input_layernorm)",
)

def _fused_values(qkv: torch.Tensor, config) -> torch.Tensor:
    """The value vectors of Phi-3's fused q | k | v output: its last kv x head_dim columns (head_dim = width /
    (heads + 2 kv)), per key/value head."""
    kv = kv_heads(config)
    head_dim = qkv.shape[-1] // (config.num_attention_heads + 2 * kv)
    return qkv[..., -kv * head_dim:].reshape(*qkv.shape[:2], kv, head_dim)


PHI3 = Adapter(
    family="Phi-3",
    model_types=("phi3",),
    layers="layers",
    sites={**LLAMA.sites, "mlp_gate": ("mlp.gate_up_proj", "out", (0, 2)), "mlp_up": ("mlp.gate_up_proj", "out", (1, 2))},
    attn_proj="self_attn.o_proj",
    mlp_up="mlp.gate_up_proj",
    mlp_gate="mlp.gate_up_proj",
    mlp_down="mlp.down_proj",
    act_fn="mlp.activation_fn",
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.qkv_proj", lambda t, config: _fused_values(t, config)),
    notes="gate and up projections fused in gate_up_proj (gate: first half of its rows, up: second half)",
)
