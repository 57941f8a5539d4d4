"""Mixtral and Qwen2-MoE: Llama-like blocks whose MLP is a sparse mixture of experts. transformers 5 fuses the
experts' weights into 3-D parameters, so the sites inside an expert are not modules: the scan reads the MoE block's
input and output, and ``massact.analysis.moe`` recomputes the routed experts and their neurons from the weights."""

from .base import Adapter, Cut
from .llama import ADAPTER as LLAMA

ADAPTER = Adapter(
    family="Mixtral/Qwen-MoE",
    model_types=("mixtral", "qwen2_moe"),
    layers="layers",
    sites={site: LLAMA.sites[site] for site in ("resid_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_out")},
    attn_proj="self_attn.o_proj",
    mlp_up="mlp",
    mlp_down="mlp",
    act_fn="mlp",
    moe=True,
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.v_proj"),
    notes="mixture-of-experts MLP: attributed to the routed experts (router weight x expert output), then to neurons inside them",
)
