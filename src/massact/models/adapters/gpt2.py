"""GPT-2: pre-LN blocks, Conv1D projections (weights stored [in, out]), GELU MLP."""

from transformers.pytorch_utils import Conv1D

from .base import Adapter, Cut, Mlp

ADAPTER = Adapter(
    family="GPT-2",
    model_types=("gpt2",),
    layers="h",
    attention="attn",
    attention_out="c_proj",
    mlp=Mlp(up="c_fc", gate=None, down="c_proj", act="act"),
    mlp_norm=("ln_2",),
    in_out=(Conv1D,),
    values=Cut("attn.c_attn", lambda t, config: t.chunk(3, dim=-1)[2].view(*t.shape[:2], config.n_head, -1)),  # q | k | v
)
