"""The streaming statistics against exact computations."""

import torch

from massact.capture.stats import LogHistogram, TopK


def test_log_histogram_median_within_stated_error():
    torch.manual_seed(0)
    data = torch.randn(200_000).exp() * 3.0 * torch.randn(200_000).sign()
    sketch = LogHistogram()
    for chunk in data.split(7_000):
        sketch.update(chunk)
    exact = data.abs().median().item()
    assert abs(sketch.quantile(0.5) - exact) / exact <= sketch.rel_error + 1e-4
    assert sketch.rel_error < 0.01
    assert sketch.total == data.numel()


def test_log_histogram_merge_equals_one_pass():
    torch.manual_seed(1)
    a, b = torch.randn(5000), torch.randn(3000) * 10
    one, left, right = LogHistogram(), LogHistogram(), LogHistogram()
    one.update(torch.cat([a, b]))
    left.update(a)
    right.update(b)
    left.merge(right)
    assert torch.equal(one.counts, left.counts)


def test_topk_keeps_largest_magnitudes_with_labels():
    top = TopK(3)
    top.update(torch.tensor([1.0, -9.0, 2.0]), torch.tensor([[0], [1], [2]]))
    other = TopK(3)
    other.update(torch.tensor([5.0, -0.5]), torch.tensor([[3], [4]]))
    top.merge(other)
    assert top.items() == [(-9.0, [1]), (5.0, [3]), (2.0, [2])]


def test_a_single_value_is_reported_within_half_a_bin():
    """A value's bin is its float16: one value's sketch reports that float16, within rel_error of the value across
    the normal float16 range and within error_at below it; zero and what rounds to zero go to bin 0, what passes
    65504 to inf, NaN above it."""
    generator = torch.Generator().manual_seed(2)
    values = (torch.rand(2000, generator=generator) * 29 - 14).exp2()  # 2**-14 .. 2**15: the normal range
    for value in values.tolist():
        sketch = LogHistogram()
        sketch.update(torch.tensor([value, -value]))
        assert abs(sketch.quantile(0.5) - value) / value <= sketch.rel_error
    for value in (3e-5, 1e-6, 2e-7):  # subnormal float16: steps of 2**-24
        sketch = LogHistogram()
        sketch.update(torch.tensor([value]))
        error = abs(sketch.quantile(0.5) - value) / value
        assert error <= LogHistogram.error_at(sketch.quantile(0.5)) * 1.0001
    edges = LogHistogram()
    edges.update(torch.tensor([0.0, 2.0**-40, 1e6, float("inf"), float("nan")]))
    inf = int(torch.tensor(float("inf"), dtype=torch.float16).view(torch.int16))
    assert edges.counts[0] == 2 and edges.counts[inf] == 2 and edges.counts[inf + 1 :].sum() == 1 and edges.total == 5
    assert LogHistogram.error_at(1.0) == LogHistogram.rel_error == 2.0**-11
