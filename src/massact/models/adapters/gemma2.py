"""Gemma-2 and Gemma-3: sandwich norms. Each branch is normed again before it lands in the residual:
``post_attention_layernorm`` on the attention output, ``post_feedforward_layernorm`` on the MLP output, and
``pre_feedforward_layernorm`` is the MLP's input norm. attn_out and mlp_out are what lands; *_raw is before.

Every Gemma-3 from 4B up ships as ``Gemma3ForConditionalGeneration`` (model type ``gemma3``): its language model is
the same blocks under ``language_model``, and a text-only input never runs the vision tower.
"""

import dataclasses

from . import llama

ADAPTER = dataclasses.replace(
    llama.ADAPTER,
    family="Gemma-2/3",
    model_types=("gemma2", "gemma3_text"),
    mlp_norm=("pre_feedforward_layernorm",),
    branch_norms={"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    notes="sandwich norms: each branch is normed (post_attention_layernorm, post_feedforward_layernorm) before it lands",
)

GEMMA3_MULTIMODAL = dataclasses.replace(
    ADAPTER,
    model_types=("gemma3",),
    layers="language_model.layers",
    notes=ADAPTER.notes + "; the language model of a multimodal checkpoint, scanned on text only (the vision tower is not run)",
)
