"""The scan in every number format: float32, bfloat16 and float16, each with padded batches (texts of mixed lengths,
8 per pass) and unpadded ones (one text per pass), on the default model and on a planted one, and the training
monitor the same way.

A model run in half precision rounds at every operation, so its activations are not float32's: what must hold is the
same massive dims, born at the same blocks, at the same places, with values within the format's precision of
float32's. With eps = ``torch.finfo(dtype).eps`` (2**-7 for bfloat16, 2**-10 for float16): a massive value written at
its birth block within one eps, and half an eps more for each block after it (each adds its branches to the stream and
rounds the sum once); a block's median within two eps (and the sketch's own half float16 step on both sides). On the
default model bfloat16 gives dim 507 +24,320 against +24,494 at its birth (0.91 eps), float16 +24,480 (0.59 eps); the
largest gaps after birth are 0.87 eps in bfloat16 and 1.9 eps in float16 (block 23, 12 blocks after birth: bound 7).

In float32 the padded batch and the one-text pass run the same operations on the same numbers, but a matrix product
of another shape may sum its terms in another order (the kernel blocks it differently: AVX-512 and AVX2 builds do);
the difference is then a few eps of the largest partial sum, not one eps of the result (24,494.061 against 24,494.080
on one machine: 7 eps). Float32 is therefore bounded by ``ORDER_RTOL``, what any summation order of these products
stays within, and the half formats by their own rounding, which is a thousand times coarser.
"""

from __future__ import annotations

import pytest
import torch

import massact
from conftest import PLANTED
from massact.pipeline import detect_stage
from massact.settings import ScanSettings
from massact.texts import DEFAULT_TEXTS, Corpus
from massact.track.monitor import Monitor

DTYPES = ("float32", "bfloat16", "float16")
BATCHES = {"padded": 8, "unpadded": 1}  # the default texts differ in length: 8 per pass pads all but the longest


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module", params=["default", "planted"])
def models(request, model_dir):
    """The model in each format."""
    spec = None if request.param == "default" else str(model_dir)
    return request.param, {dtype: massact.load(spec, dtype=dtype, device="cpu", log=_quiet) for dtype in DTYPES}


def _detect(lm, batch_size: int):
    corpus = Corpus()
    return detect_stage(lm, corpus, corpus.check(), ScanSettings(batch_size=batch_size), None, lambda *_: lambda: None).findings


def _eps(dtype: str) -> float:
    return torch.finfo(getattr(torch, dtype)).eps


# Two summation orders of a float32 product of n terms differ by at most about n * eps times the sum of the terms'
# magnitudes; for the widths here (576 to 1,536) and the cancellation in a residual stream, 1e-5 relative holds with a
# margin of ten over what was seen (8e-7), while an error of 1e-4 relative is still caught.
ORDER_RTOL = 1e-5


def _close(found: float, expected: float, dtype: str, blocks_after_birth: int = 0) -> bool:
    """Whether ``found`` (in ``dtype``, batched) agrees with float32's one-text ``expected``: within the summation
    order's bound in float32, within the format's eps (half an eps more per block after the birth) in half precision."""
    if dtype == "float32":
        return abs(found - expected) <= ORDER_RTOL * abs(expected)
    return abs(found - expected) <= _eps(dtype) * (1 + blocks_after_birth / 2) * abs(expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batches", BATCHES)
def test_the_scan_agrees_with_float32_within_the_format(models, dtype, batches):
    name, lms = models
    assert lms[dtype].model.dtype == getattr(torch, dtype)
    reference, found = _detect(lms["float32"], 1), _detect(lms[dtype], BATCHES[batches])
    if name == "planted":
        layer, _, dim = PLANTED
        assert [(d.dim, d.born_at) for d in found.dims] == [(dim, layer)]
    else:
        assert [d.dim for d in found.dims] == [247, 507]
    assert [(d.dim, d.born_at, d.persists, d.removed_at, d.tokens) for d in found.dims] == \
        [(d.dim, d.born_at, d.persists, d.removed_at, d.tokens) for d in reference.dims]
    assert [(m.layer, m.text, m.position, m.dim) for m in found.massive] == \
        [(m.layer, m.text, m.position, m.dim) for m in reference.massive]
    born = {d.dim: d.born_at for d in reference.dims}
    for got, want in zip(found.massive, reference.massive):
        assert _close(got.value, want.value, dtype, want.layer - born[want.dim]), (got, want)
    for got, want in zip(found.layers, reference.layers):
        assert abs(got.median - want.median) <= (2 * _eps(dtype) + 2 * 2**-11) * want.median
    if dtype == "float32":  # batching changes nothing in float32 beyond the sums' order
        assert [m.value for m in found.massive] == pytest.approx([m.value for m in reference.massive], rel=ORDER_RTOL)


def test_the_float32_bound_still_catches_a_real_error(models):
    """The summation-order bound is loose enough for any kernel, not so loose that an error of 1e-4 passes: every
    massive value of the one-text scan, moved by 1e-4 relative, fails it, while the batched scan's values pass."""
    _, lms = models
    reference, batched = _detect(lms["float32"], 1), _detect(lms["float32"], BATCHES["padded"])
    assert reference.massive
    for got, want in zip(batched.massive, reference.massive, strict=True):
        assert _close(got.value, want.value, "float32")
        assert not _close(want.value * (1 + 1e-4), want.value, "float32")
        assert not _close(got.value * (1 - 1e-4), want.value, "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_whole_padded_scan_in_half_precision_names_the_same_mechanism(models, dtype):
    """The padded scan that crashed in half precision, through every stage but verification."""
    name, lms = models
    report = massact.scan(lms[dtype], None, batch_size=8, verify=False)
    assert report.model.dtype == dtype
    layer, neuron, dim = (11, 1229, 507) if name == "default" else PLANTED
    birth = next(a for a in report.mechanism.attribution if a.dim == dim and a.role == "birth")
    assert (birth.layer, birth.neurons[0].neuron) == (layer, neuron)
    assert (birth.super_weight.row, birth.super_weight.col) == (dim, neuron)
    line = next(x for x in report.mechanism.lifelines if x.dim == dim)
    assert (line.born_at, line.sign) == (layer, 1)
    if name == "default":
        assert line.erased_at == [28, 29]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batches", BATCHES)
def test_the_monitor_agrees_with_float32_within_the_format(models, dtype, batches):
    _, lms = models
    reference = Monitor(lms["float32"].tokenizer, batch_size=1).measure(lms["float32"].model, 0)
    record = Monitor(lms[dtype].tokenizer, batch_size=BATCHES[batches]).measure(lms[dtype].model, 0)
    assert record["texts"] == len(DEFAULT_TEXTS)
    birth = next(block["layer"] for block in reference["blocks"] if block["massive"])
    for got, want in zip(record["blocks"], reference["blocks"], strict=True):
        assert (got["layer"], got["massive"]) == (want["layer"], want["massive"])
        if want["massive"]:  # a massive block's top entry is the massive dim, far above every other
            assert got["top_dim"] == want["top_dim"] and _close(got["top1"], want["top1"], dtype, want["layer"] - birth)
    assert sum(block["massive"] for block in record["blocks"]) > 0
