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

With ``enable_moe_block`` every block has routed experts beside its dense MLP (``MOE``), each part behind its own norms
and summed before ``post_feedforward_layernorm``:

    dense_out = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(resid_mid)))        (dense_raw: mlp's output)
    moe_out = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(resid_mid), router(resid_mid)))
    mlp_raw = dense_out + moe_out,   mlp_out = post_feedforward_layernorm(mlp_raw)

mlp_in, mlp_gate, mlp_up and mlp_act are the dense MLP's. The router reads the unnormed stream and norms it itself (a
gainless RMS norm, times its ``scale`` and hidden_size^-0.5), a softmax over the experts, the top-k renormalised, then
each chosen weight times ``per_expert_scale``. The experts' input and output are flat rows [batch x positions, width].
"""

import dataclasses

from . import gemma2
from .base import Beside, Cut, Experts, Moe, PerLayerInput, Router, Variant


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

MOE = dataclasses.replace(
    ADAPTER,
    moe=Moe(block="", router=Router(path="router", weight="proj", renormalise=True, norm="norm",
                                    input_scales=("scale", "scalar_root_size"), expert_scale="per_expert_scale"),
            experts=Experts(path="experts"),
            beside=Beside(norm="pre_feedforward_layernorm_2", dense_norm="post_feedforward_layernorm_1",
                          routed_norm="post_feedforward_layernorm_2")),
    flat_rows=True,
    when=lambda config: config.enable_moe_block,
    notes=ADAPTER.notes + "; routed experts beside the dense MLP in every block, each part behind its own norms "
          "(post_feedforward_layernorm_1, post_feedforward_layernorm_2) and summed before post_feedforward_layernorm; the "
          "router norms the unnormed stream itself and scales each chosen expert's weight (per_expert_scale)",
)
