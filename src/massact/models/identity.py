"""What makes two loaded models the same model: every parameter's name, shape and dtype, and the exact bytes of a
sample of its entries. A resumed scan, a track's finished checkpoint and a report re-run by ``massact verify`` are
each checked against it, so that numbers from one model are never written under another's name."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import UsageError

SAMPLE = 4096  # entries of each parameter whose exact bytes go into the identity


def weights_sample(tensor: torch.Tensor, size: int = SAMPLE) -> bytes:
    """The exact bytes of ``size`` evenly spaced entries of a tensor (all of a smaller one; the first and the last
    always): cheap on any device (one small strided copy) and the same wherever the model runs. Two models that
    differ only outside these entries are not told apart; another checkpoint, even a fine-tune, differs in almost
    all."""
    flat = tensor.detach().flatten()
    if flat.numel() > size:  # a strided view, not an index gather, which was 40x slower on a busy 2-core CPU
        flat = torch.cat([flat[:: flat.numel() // (size - 1)][: size - 1], flat[-1:]])
    return flat.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def weights_sha256(model: nn.Module, samples: dict[str, bytes] | None = None) -> str:
    """sha256 of every parameter's name, shape, dtype and sampled bytes (``weights_sample``; a parameter still on the
    meta device: its sample in ``samples``, taken while it was loaded (a streamed model's blocks), else name and shape
    only). It depends on the dtype the model is loaded in."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}|".encode())
        if parameter.device.type != "meta":
            digest.update(weights_sample(parameter))
        elif samples is not None and name in samples:
            digest.update(samples[name])
    return digest.hexdigest()


def check_same_weights(saved: str | None, saved_dtype: str, model: nn.Module, where: str,
                       samples: dict[str, bytes] | None = None) -> None:
    """Refuse, in one line, a model whose weights are not those a saved file was made from (``saved``: its
    ``weights_sha256``, made in ``saved_dtype``; ``samples``: those of a streamed model's blocks, as
    ``weights_sha256`` takes them). Files made before the identity was saved (None) and a model loaded in another
    dtype, whose bytes differ by rounding, are not checked here."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if saved is not None and dtype == saved_dtype and weights_sha256(model, samples) != saved:
        raise UsageError(f"{where} was made from other weights than the model loaded now (its weights changed on disk, or "
                         "this is another model); scan it again, or use another output directory")
