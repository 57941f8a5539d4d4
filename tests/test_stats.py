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
    """The bin comes from the float's bits: one value's sketch reports the middle of the bin holding it, so within
    rel_error of it, across the octaves; values outside the range go to the end bins."""
    generator = torch.Generator().manual_seed(2)
    values = (torch.rand(2000, generator=generator) * 60 - 30).exp2()  # 2**-30 .. 2**30
    for value in values.tolist():
        sketch = LogHistogram()
        sketch.update(torch.tensor([value, -value]))
        assert abs(sketch.quantile(0.5) - value) / value <= sketch.rel_error
    edges = LogHistogram()
    edges.update(torch.tensor([0.0, 2.0**-40, float("inf"), float("nan")]))
    assert edges.counts[0] == 2 and edges.counts[-1] == 2 and edges.total == 4
