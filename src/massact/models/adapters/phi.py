"""Phi-2 (parallel block, one shared input norm, fc1/fc2 GELU MLP) and Phi-3 (sequential pre-RMSNorm block, gated
MLP with gate and up fused in ``gate_up_proj``: the first half of its output is the gate, the second half up)."""

from .base import Adapter
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
    notes="parallel block: attention and MLP read the same normed input (one shared input_layernorm)",
)

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
    notes="gate and up projections fused in gate_up_proj (gate: first half of its rows, up: second half)",
)
