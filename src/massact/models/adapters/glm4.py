"""GLM-4 (the dense GLM-4-0414 models): sandwich norms and a fused gated MLP.

Each branch is normed again before it lands: ``post_self_attn_layernorm`` on the attention output,
``post_mlp_layernorm`` on the MLP output; ``post_attention_layernorm`` is the MLP's input norm (RMSNorm gains are the
weight). The MLP's ``gate_up_proj`` makes the gate in the first half of its outputs and up in the second, as Phi-3's:
down(up x act(gate)).
"""

import dataclasses

from . import llama
from .base import Mlp

GLM4 = dataclasses.replace(
    llama.ADAPTER,
    family="GLM-4",
    model_types=("glm4",),
    mlp=Mlp(up="gate_up_proj", gate=None, fused=True, act="activation_fn"),
    branch_norms={"attn_out": "post_self_attn_layernorm", "mlp_out": "post_mlp_layernorm"},
    notes="sandwich norms: each branch is normed (post_self_attn_layernorm, post_mlp_layernorm) before it lands; gate and "
          "up fused in gate_up_proj (gate: first half of its rows, up: second half)",
)
