"""Gemma-4 (text): Gemma-3's sandwich norms, then a third branch in every block, the per-layer input, and a scalar on
the block's output.

After the MLP has landed, the block gates a per-layer input into the stream: ``per_layer_input_gate`` reads the stream
(ple_in, unnormed), its GELU multiplies the token's per-layer input for this block (a looked-up embedding of the token
mixed with a projection of its input embedding, made once by the model), ``per_layer_projection`` maps it back to
d_model (ple_raw) and ``post_per_layer_input_norm`` norms it before it lands (ple_out). The sum is then multiplied by
the block's ``layer_scalar`` buffer:

    resid_mid = resid_in + attn_out,   ple_in = resid_mid + mlp_out,   resid_out = layer_scalar x (ple_in + ple_out)

The values are read after ``v_norm`` (each head's value RMS-normed, no gain); blocks that reuse an earlier block's
keys and values (``num_kv_shared_layers``) have no value projection of their own: their values are not read.
Configs with ``enable_moe_block`` (experts beside the dense MLP) are not mapped.
"""

import dataclasses

from . import gemma2
from .base import Cut, PerLayerInput, Variant


def _as_read(output, config):
    """v_norm's output is already [batch, positions, kv heads, head_dim] (the block's own kv head count)."""
    return output


ADAPTER = dataclasses.replace(
    gemma2.ADAPTER,
    family="Gemma-4",
    model_types=("gemma4_text",),
    values=Cut("self_attn.v_norm", _as_read),
    per_layer_input=PerLayerInput(),
    output_scale="layer_scalar",
    when=lambda config: not config.enable_moe_block,
    variants=(Variant(when=lambda config, layer: not config.hidden_size_per_layer_input, changes={"per_layer_input": None}),
              Variant(when=lambda config, layer: config.kv_sharing_modes[layer] == "reuse", changes={"values": None})),
    notes=gemma2.ADAPTER.notes + "; a per-layer input gated into the stream after the MLP (per_layer_input_gate, "
          "per_layer_projection, post_per_layer_input_norm: the ple writer); the block output times its layer_scalar",
)
