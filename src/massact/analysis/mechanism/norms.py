"""Attribution through a norm: split what a norm does to one dim into normalisation, per-dim gain and bias.

Used where a norm sits between a sublayer and the residual (Gemma-2/3 sandwich norms) and where a post-LN block
norms the residual sum. A norm's gain on a massive dim far above its typical gain means the norm is the amplifier.
"""

from __future__ import annotations

import weakref

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
    scale = 1.0 / (1.0 + epsilon(norm, width)) ** 0.5  # v's rms is exactly 1: only eps shifts the normalisation
    return (plus - minus) / (2 * v * scale), (plus + minus) / 2


def epsilon(norm: nn.Module, width: int) -> float:
    """The eps the norm (of vectors of ``width``) adds to the mean square: its ``eps`` or ``variance_epsilon``, else
    measured on the module (a norm that has it in its forward alone, as a LayerNorm without parameters may)."""
    stated = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if stated is not None:
        return float(stated)
    if norm not in _MEASURED:
        _MEASURED[norm] = _measured_epsilon(norm, width)
    return _MEASURED[norm]


_MEASURED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
_PROBE = 1e-2  # the rms of the small probe vector: eps ~ 1e-5 moves its normalisation by a few percent


def _measured_epsilon(norm: nn.Module, width: int) -> float:
    """eps from the norm's odd part on v = (+1, -1, ...) (mean 0, rms 1) and on t v: it is gain x v x t / sqrt(t^2 +
    eps), so the ratio R of the two is t sqrt(1 + eps) / sqrt(t^2 + eps), and eps = t^2 (1 - R^2) / (R^2 - t^2). 0 where
    the norm has no gain to see it through."""
    parameter = next(norm.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
    v = torch.ones(width, dtype=torch.float32, device=device)
    v[1::2] = -1.0
    with torch.no_grad():  # forward itself: it may be measured from inside a hook on the norm
        odd = [(norm.forward((t * v).to(dtype)).double() - norm.forward((-t * v).to(dtype)).double()).abs().sum()
               for t in (1.0, _PROBE)]
    if float(odd[0]) == 0.0:
        return 0.0
    ratio = float(odd[1] / odd[0])
    return max(_PROBE**2 * (1 - ratio**2) / (ratio**2 - _PROBE**2), 0.0)


def centers(norm: nn.Module) -> bool:
    """LayerNorm subtracts the mean; RMSNorm does not."""
    return isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__ and "RMS" not in type(norm).__name__


def scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's normalisation factor for each vector of ``x`` [..., width], in float64: 1 / rms (RMSNorm), or
    1 / std of the centered vector (LayerNorm), eps included. Given it, the norm is linear in its input."""
    x = x.double()
    centered = x - x.mean(-1, keepdim=True) if centers(norm) else x
    return (centered.pow(2).mean(-1) + epsilon(norm, x.shape[-1])).rsqrt()


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
