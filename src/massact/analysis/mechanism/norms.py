"""Attribution through a norm: split what a norm does to one dim into normalisation, per-dim gain and bias.

Used where a norm sits between a sublayer and the residual (Gemma-2/3 sandwich norms) and where a post-LN block
norms the residual sum. A norm's gain on a massive dim far above its typical gain means the norm is the amplifier.
"""

from __future__ import annotations

import torch
from torch import nn

from .results import NormFactors

AMPLIFIER = 10.0  # a gain this many times the median |gain| makes the norm an amplifier of that dim


def gain_and_bias(norm: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's effective per-dim gain and bias, read from the module itself (whatever its convention: weight,
    1 + weight): on v = (+1, -1, +1, ...), whose mean is 0 and rms 1, norm(v) = v x gain + bias (up to eps)."""
    parameter = next(norm.parameters(), None)  # a LayerNorm without affine parameters has none
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
    v = torch.ones(width, dtype=torch.float32, device=device)
    v[1::2] = -1.0
    with torch.no_grad():
        plus, minus = norm(v.to(dtype)).double().cpu(), norm((-v).to(dtype)).double().cpu()
    v = v.double().cpu()
    scale = 1.0 / (1.0 + epsilon(norm)) ** 0.5  # v's rms is exactly 1: only eps shifts the normalisation
    return (plus - minus) / (2 * v * scale), (plus + minus) / 2


def epsilon(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 0.0)


def centers(norm: nn.Module) -> bool:
    """LayerNorm subtracts the mean; RMSNorm does not."""
    return isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__ and "RMS" not in type(norm).__name__


def scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's normalisation factor for each vector of ``x`` [..., width], in float64: 1 / rms (RMSNorm), or
    1 / std of the centered vector (LayerNorm), eps included. Given it, the norm is linear in its input."""
    x = x.double()
    centered = x - x.mean(-1, keepdim=True) if centers(norm) else x
    return (centered.pow(2).mean(-1) + epsilon(norm)).rsqrt()


def norm_factors(norm: nn.Module, parameter: str, raw: torch.Tensor, landed: torch.Tensor, dim: int) -> NormFactors:
    """Factors of ``landed[dim] = norm(raw)[dim]``; ``raw`` and ``landed`` are the whole vectors at one position."""
    x = raw.double()
    centered = x - x.mean() if centers(norm) else x
    normalization = float(scale(norm, x))
    gain, bias = gain_and_bias(norm, x.numel())
    product = normalization * float(centered[dim]) * float(gain[dim]) + float(bias[dim])
    observed = float(landed[dim])
    typical = float(gain.abs().median())
    ratio = abs(float(gain[dim])) / typical if typical > 0 else float("inf")
    weight = getattr(norm, "weight", None)
    return NormFactors(
        parameter=parameter,
        dim=dim,
        raw=float(x[dim]),
        centered=float(centered[dim]),
        normalization=normalization,
        gain=float(gain[dim]),
        weight=float(weight[dim]) if weight is not None else float("nan"),
        bias=float(bias[dim]),
        landed=observed,
        error=abs(product - observed) / max(abs(observed), 1e-12),
        typical_gain=typical,
        gain_ratio=ratio,
        amplifier=ratio >= AMPLIFIER,
    )
