"""Granite (IBM Granite 3.x dense): Llama's block with four scalars from its config.

- ``residual_multiplier`` r multiplies each branch's output before it lands:
  resid_mid = resid_in + r attn(norm(resid_in)), resid_out = resid_mid + r mlp(norm(resid_mid)). attn_out and
  mlp_out are what lands (the sublayer's output times r), attn_raw and mlp_raw the sublayers' own outputs: the neurons
  and the super weight explain the raw MLP output, and the trigger's sources are carried back through r.
- ``embedding_multiplier`` multiplies the token embeddings before the first block (block 0's input holds the product).
- ``attention_multiplier`` is the attention's softmax scale (in place of 1/sqrt(head_dim)), inside the attention.
- ``logits_scaling`` divides the logits, after the final norm and the head: in the perplexity, not in any block.
"""

import dataclasses

from . import llama

GRANITE = dataclasses.replace(
    llama.ADAPTER,
    family="Granite",
    model_types=("granite",),
    branch_scale="residual_multiplier",
    embedding_scale="embedding_multiplier",
    notes="each branch is multiplied by the config's residual_multiplier before it lands (attn_out, mlp_out: what lands; "
          "attn_raw, mlp_raw: the sublayers' own outputs), the token embeddings by its embedding_multiplier",
)
