"""GPT-2: pre-LN blocks, Conv1D projections (weights stored transposed), GELU MLP."""

from .base import Adapter, Cut

ADAPTER = Adapter(
    family="GPT-2",
    model_types=("gpt2",),
    layers="h",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("attn", "out"),
        "resid_mid": ("ln_2", "in"),
        "mlp_in": ("mlp", "in"),
        "mlp_up": ("mlp.c_fc", "out"),
        "mlp_act": ("mlp.c_proj", "in"),
        "mlp_out": ("mlp", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="attn.c_proj",
    mlp_up="mlp.c_fc",
    mlp_down="mlp.c_proj",
    act_fn="mlp.act",
    mlp_norm=("ln_2",),
    values=Cut("attn.c_attn", lambda t, config: t.chunk(3, dim=-1)[2].view(*t.shape[:2], config.n_head, -1)),  # q | k | v
)
