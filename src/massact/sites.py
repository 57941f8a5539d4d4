"""Canonical site names, one scheme for the API, the JSON and the plots.

A *site* is a place in a transformer block where a vector is read. With ``layer`` the 0-based
block index, a (pre-norm) block computes

    resid_mid = resid_in + attn_out
    resid_out = resid_mid + mlp_out
    mlp_out   = W_down @ mlp_act (+ bias),  mlp_act = act(mlp_up)  or  act(mlp_gate) * mlp_up

``mlp_in`` is the MLP's input after its norm. Other block shapes use the same names:
  parallel blocks (GPT-NeoX, Phi-2, GPT-J, Falcon): no resid_mid; resid_out = resid_in + attn_out + mlp_out.
  sandwich norms (Gemma-2, Gemma-3): attn_out and mlp_out are what lands in the residual, after the branch's own
    norm; attn_raw and mlp_raw are the sublayers' outputs before it (mlp_raw = W_down @ mlp_act).
  branch scales (Granite): attn_out and mlp_out are the sublayers' outputs times the residual multiplier, what
    lands; attn_raw and mlp_raw the outputs before it.
  post-LN blocks (BERT, RoBERTa, OPT-350m): attn_sum = resid_in + attn_out, resid_mid = LN(attn_sum),
    resid_sum = resid_mid + mlp_out, resid_out = LN(resid_sum).
  per-layer inputs (Gemma-4): a third branch after the MLP reads ple_in = resid_mid + mlp_out and writes ple_out (its
    norm of the projection's raw output ple_raw); resid_out = scale x (ple_in + ple_out), the block's layer scalar.
  experts beside the dense MLP (Gemma-4's MoE block): mlp_in ... mlp_act are the dense MLP's, dense_raw its output
    and dense_out that normed; moe_in is the experts' input, moe_raw their weighted sum and moe_out that normed;
    mlp_raw = dense_out + moe_out is the branch norm's input, mlp_out its output.
  hyper-connections (DeepSeek-V4, HY-V4, Qwen4-exp): resid_in, resid_mid and resid_out hold N streams
    [batch, positions, N, width]; ``resid_out.s2`` is stream 2 alone. attn_read and mlp_read are the combinations
    of the streams the attention and the MLP read (before their own norm).
TransformerLens hook names are accepted as aliases.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import UsageError

SITES: tuple[str, ...] = (
    "resid_in",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_gate",
    "mlp_up",
    "mlp_act",
    "mlp_out",
    "resid_out",
    "attn_raw",
    "mlp_raw",
    "attn_sum",
    "resid_sum",
    "ple_in",
    "ple_raw",
    "ple_out",
    "attn_read",
    "mlp_read",
    "dense_raw",
    "dense_out",
    "moe_in",
    "moe_raw",
    "moe_out",
)

# The sites that hold the block state: several streams with hyper-connections, one without.
STATE_SITES: tuple[str, ...] = ("resid_in", "resid_mid", "resid_out")
_STREAM_PATTERN = re.compile(r"^(resid_in|resid_mid|resid_out)\.s(\d+)$")


def stream_site(site: str, stream: int) -> str:
    """The name of one stream of a block-state site: ``stream_site("resid_out", 2)`` is "resid_out.s2"."""
    return f"{site}.s{stream}"


def split_stream(name: str) -> tuple[str, int | None]:
    """(site, stream) of a per-stream name ("resid_out.s2": ("resid_out", 2)); (name, None) for any other name."""
    match = _STREAM_PATTERN.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)

# The sites massive activations can be detected in (an adapter's ``stream``): each block's output, or in post-LN blocks
# the residual sum before the block's last LayerNorm.
STREAMS: tuple[str, ...] = ("resid_out", "resid_sum")

# TransformerLens names. "mlp.hook_pre" is the pre-activation: the gate in a gated MLP, else the up projection.
_TL_ALIASES = {
    "hook_resid_pre": "resid_in",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_pre_linear": "mlp_up",
    "mlp.hook_post": "mlp_act",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_out",
}
_TL_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")


def resolve_site(name: str, gated: bool | Callable[[int], bool], layer: int | None = None) -> tuple[int, str]:
    """Map a canonical site (with ``layer``) or a TransformerLens hook name to ``(layer, site)``. ``gated``: whether
    the MLP is gated, or a function of the block that says (a model that mixes dense and expert blocks).

    >>> resolve_site("blocks.3.mlp.hook_pre", gated=True)
    (3, 'mlp_gate')
    """
    match = _TL_PATTERN.match(name)
    is_gated = gated if callable(gated) else (lambda block: gated)
    if match:
        layer, hook = int(match.group(1)), match.group(2)
        if hook == "mlp.hook_pre":
            return layer, "mlp_gate" if is_gated(layer) else "mlp_up"
        if hook not in _TL_ALIASES:
            raise UsageError(f"unknown TransformerLens hook {name!r}; known: mlp.hook_pre, {', '.join(_TL_ALIASES)}")
        return layer, _TL_ALIASES[hook]
    if split_stream(name)[0] not in SITES:  # "resid_out.s2": one stream of a hyper-connection block's state
        raise UsageError(f"unknown site {name!r}; canonical sites: {', '.join(SITES)}")
    if name == "mlp_gate" and not is_gated(layer if layer is not None else 0):
        raise UsageError("site 'mlp_gate' exists only in gated MLPs; this model's MLP is not gated")
    if layer is None:
        raise UsageError(f"site {name!r} needs a layer")
    return layer, name
