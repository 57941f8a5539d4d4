"""Hyper-connection families: DeepSeek-V4, HY-V4 and Qwen4-exp's text model. Their residual is N streams (``hc_mult``
or ``hc_count``, 4 in the released configs); each sublayer reads one combination of them and writes its output back
into every stream with a weight. How each family reads, writes and mixes (transformers 5.24's modeling files):

DeepSeek-V4 (manifold-constrained hyper-connections, ``attn_hc`` and ``ffn_hc``; streams [batch, positions, N, d]):
  weights from the N streams flattened, RMS-normed without a gain, times ``fn`` [(2 + N) N, N d], so every weight is
  input-dependent: pre = sigmoid(.) + eps [N], post = 2 sigmoid(.) [N], comb = softmax(.) + eps [N, N] made
  doubly stochastic by Sinkhorn iterations (``hc_sinkhorn_iters``).
  read:  x = sum_j pre[j] stream_j, then ``input_layernorm`` (``post_attention_layernorm`` for the MLP);
  write: new stream k = post[k] x sublayer output + sum_j comb[j, k] stream_j (the module returns post, comb, x).
  final: ``hc_head`` (a sigmoid pre-weight per stream, no post or comb) sums the streams, ``norm`` reads that sum.
  Its attention: one shared key-value head (the same vector is key and value), a learned sink logit per head in the
  softmax (``sinks``), and a grouped low-rank output projection (``o_a_proj`` per group of heads, then ``o_b_proj``
  to d_model: no per-head slice of the last projection). Its mixture of experts scores experts by
  sqrt(softplus(logit)); the first blocks (``mlp_layer_types`` "hash_moe") route by a fixed token-id table
  (``tid2eid``), the others by top-k with a correction bias.
HY-V4 (``attn_hc`` and ``ffn_hc``; streams [batch, positions, N, d]): DeepSeek-V4's form without comb: pre and post
  from (streams . fn) x RMS(streams), post scaled by ``hc_magnitude``; read as DeepSeek-V4's, write
  new stream k = post[k] x output + stream_k (the module returns post, x). Final read as DeepSeek-V4's (``hc_head``,
  then ``norm``). Multi-head latent attention; dense MLP in the blocks ``mlp_layer_types`` calls "dense".
Qwen4-exp (``attn_hyper_connection`` and ``mlp_hyper_connection``, a gated residual; streams flat [batch, positions,
  N x d]): the streams are RMS-normed each on its own (``hc_norm``, gain 1 + w); read: the mean over streams of
  sigmoid(low-rank(normed)) x normed, a per-dim gate (the sublayer reads it as it is: no norm of its own);
  write: new stream k = stream_k + 2 sigmoid(``block_inject_weight`` . normed / N)[k] x output (no mixing).
  final: ``hyper_connection_mixer``, the same read, is the last hidden state (no final norm after it).
  Gated DeltaNet in most blocks, softmax attention (with an indexer) in the others; a mixture of experts with a
  sigmoid-gated shared expert in every block. Blocks listed in ``ple_layer_ids`` add hashed n-gram features to every
  stream before the block: not a sublayer massact decomposes (the tiny test config has none).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import hybrid, llama, moe
from .base import Connection, Experts, HyperConnections, Mlp, Moe, Router, Variant, layer_types

_HC_NOTE = ("hyper-connections: the residual is N streams; each sublayer reads a learned, input-dependent combination of "
            "them and writes its output into every stream with a weight")

def _deepseek_v4_pre(module: nn.Module, streams: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's read weights, [batch, positions, N]: pre = sigmoid(scale_pre (fn_pre . RMS-normed streams) +
    base_pre) + eps, as ``DeepseekV4HyperConnection.forward`` computes them (and consumes them)."""
    count = module.hc_mult
    flat = module.input_norm(streams.flatten(2).float())
    logits = F.linear(flat, module.fn.float()[:count])
    return torch.sigmoid(logits * module.scale.float()[0] + module.base.float()[:count]) + module.hc_eps


def _hy_v4_pre(module: nn.Module, streams: torch.Tensor) -> torch.Tensor:
    """HY-V4's read weights, [batch, positions, N]: pre = sigmoid(scale_pre (fn_pre . streams) / RMS(streams) +
    base_pre) + eps (its ``input_norm`` returns the inverse RMS), as ``HYV4HyperConnection.forward`` computes them."""
    count = module.hc_mult
    flat = streams.flatten(2).float()
    logits = F.linear(flat, module.fn.float()[:count]) * module.input_norm(flat)
    return torch.sigmoid(logits * module.scale.float()[0] + module.base.float()[:count]) + module.hc_eps


def _qwen4_exp_read(module: nn.Module, streams: torch.Tensor) -> torch.Tensor:
    """Qwen4-exp's read weights, [batch, positions, N, d]: the read is the mean over streams of gate x normed, normed
    = stream x (1 + w) / RMS(stream) (``hc_norm``, each stream on its own) and gate = sigmoid(up(silu(down(normed) /
    N))); so stream j's weight at dim d is gate[j, d] (1 + w[j, d]) / (N RMS(stream j))."""
    norm, count = module.hc_norm, module.hc_count
    grouped = streams.float().unflatten(-1, (count, -1))
    inverse = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm.eps)
    gain = (1.0 + norm.weight.float()).view(count, -1)
    gate = torch.sigmoid(module.input_mix_weight_up(F.silu(module.input_mix_weight_down(norm(streams)) / count)))
    return gate.float().unflatten(-1, (count, -1)) * gain * inverse / count


_DEEPSEEK_V4_HC = HyperConnections(
    streams="hc_mult",
    attn=Connection(path="attn_hc", write=0, mix=1, read_weights=_deepseek_v4_pre),
    mlp=Connection(path="ffn_hc", write=0, mix=1, read_weights=_deepseek_v4_pre),
    read="sum_j sigmoid-weight[j] x stream_j, then the sublayer's RMSNorm",
    final=("norm", "in"),
    final_norm="norm",
)
_SQRT_SOFTPLUS = dict(score="sqrtsoftplus", renormalise="norm_topk_prob", scale="routed_scaling_factor")
_DEEPSEEK_V4_SHARED = Mlp(path="shared_experts")  # its projections clamp at swiglu_limit, as the experts' gate does


def _hash_moe(config, layer: int) -> bool:
    """DeepSeek-V4's first blocks route by a fixed token-id -> experts table."""
    return config.mlp_layer_types[layer] == "hash_moe"


DEEPSEEK_V4 = dataclasses.replace(
    llama.ADAPTER,
    family="DeepSeek-V4",
    model_types=("deepseek_v4",),
    attention_out="o_b_proj",
    heads_at_out=False,
    mlp=None,
    moe=Moe(router=Router(correction="e_score_correction_bias", **_SQRT_SOFTPLUS), shared=_DEEPSEEK_V4_SHARED),
    mlp_norm=(),
    values=None,  # one shared key-value head, normed and rotated before the softmax: not read as value vectors
    sinks="self_attn.sinks",
    hyper=_DEEPSEEK_V4_HC,
    attn_read=("input_layernorm", "in"),
    mlp_read=("post_attention_layernorm", "in"),
    variants=(Variant(when=_hash_moe, changes={"moe": Moe(router=Router(table="tid2eid", **_SQRT_SOFTPLUS), shared=_DEEPSEEK_V4_SHARED)}),),
    notes=_HC_NOTE + " (pre, post, and a doubly stochastic stream-mixing matrix comb, from attn_hc and ffn_hc); " + moe._NOTE
    + "; hash routing (a fixed token-id table) in the first blocks; learned attention sinks; a grouped low-rank output "
      "projection (o_a_proj per group of heads, then o_b_proj)",
)

_HY_V4_HC = dataclasses.replace(_DEEPSEEK_V4_HC, attn=Connection(path="attn_hc", write=0, read_weights=_hy_v4_pre),
                                mlp=Connection(path="ffn_hc", write=0, read_weights=_hy_v4_pre))


HY_V4 = dataclasses.replace(
    moe._MLA,
    family="HY-V4",
    model_types=("hy_v4",),
    mlp=None,
    moe=Moe(router=moe._SIGMOID, shared=moe._DEEPSEEK_SHARED),
    mlp_norm=(),
    hyper=_HY_V4_HC,
    attn_read=("input_layernorm", "in"),
    mlp_read=("post_attention_layernorm", "in"),
    variants=(Variant(when=moe._listed_dense, changes={"moe": None, "mlp": Mlp()}),),
    notes=_HC_NOTE + " (pre and post from attn_hc and ffn_hc; no mixing: each stream carries itself over); "
    "multi-head latent attention; " + moe._NOTE,
)

QWEN4_EXP = dataclasses.replace(
    hybrid.QWEN3_NEXT,
    family="Qwen4-exp",
    model_types=("qwen4_exp_text",),
    mlp=None,
    moe=Moe(router=Router(renormalise=True), experts=Experts(), shared=Mlp(path="shared_expert"), shared_gate="shared_expert_gate"),
    mlp_norm=(),
    gate=None,
    hyper=HyperConnections(
        streams="hc_count",
        flat=True,
        attn=Connection(path="attn_hyper_connection", write=2, read_weights=_qwen4_exp_read),
        mlp=Connection(path="mlp_hyper_connection", write=2, read_weights=_qwen4_exp_read),
        read="mean over streams of a per-dim sigmoid gate x the stream RMS-normed on its own (the sublayer's only norm)",
        final=("hyper_connection_mixer", "out"),
    ),
    attn_read=("attn_hyper_connection", "out"),
    mlp_read=("mlp_hyper_connection", "out"),
    variants=(Variant(when=lambda config, layer: layer_types(config, layer) == "linear_attention",
                      changes={"mixer": "linear", "attention": "linear_attn", "attention_out": "out_proj", "values": None}),),
    when=None,
    notes=_HC_NOTE + " (a per-dim gated read and a per-stream write weight from attn_hyper_connection and "
    "mlp_hyper_connection; no mixing); Gated DeltaNet linear attention in most blocks; " + moe._NOTE
    + ", plus a shared expert scaled by sigmoid(shared_expert_gate . x)",
)

