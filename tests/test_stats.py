"""The streaming statistics against exact computations, and their state protocol."""

import math

import pytest
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


# The state protocol: state_dict() -> load_state_dict(state) restores a statistic exactly, and it goes on as the
# original does; a state of the wrong kind or shape is a ValueError naming the field.


def _bits(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Exact equality for floats, NaN included: compare the bit patterns."""
    return tensor.view(torch.int32) if tensor is not None and tensor.dtype == torch.float32 else tensor


def _same_top(a: TopK, b: TopK) -> bool:
    """The same entries in the same order, bit for bit (NaN equals NaN), and the same labels."""
    if a.values is None or b.values is None:
        return a.values is None and b.values is None and a.labels is None and b.labels is None
    return torch.equal(_bits(a.values), _bits(b.values)) and torch.equal(a.labels, b.labels)


def _awkward(generator: torch.Generator, n: int) -> torch.Tensor:
    """Signed values with many ties (rounded to 0.5), zeros, subnormals, values past float16's range, inf, -inf, NaN."""
    values = (torch.randn(n, generator=generator) * 4).round() / 2
    values[torch.randperm(n, generator=generator)[:8]] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("nan"),
                                                                       1e6, -1e-7, 0.0, -0.0])
    return values


def test_a_log_histogram_state_round_trips_and_goes_on_the_same():
    generator = torch.Generator().manual_seed(4)
    original = LogHistogram()
    for _ in range(3):
        original.update(_awkward(generator, 1000))
    state = original.state_dict()
    copy = LogHistogram()
    copy.load_state_dict(state)
    quantiles = (0.0, 0.1, 0.5, 0.9, 0.999, 1.0)
    assert torch.equal(copy.counts, original.counts) and copy.total == original.total == 3000
    assert repr([copy.quantile(q) for q in quantiles]) == repr([original.quantile(q) for q in quantiles])  # nan equals nan
    assert torch.equal(LogHistogram.from_state(state).counts, original.counts)
    more = _awkward(generator, 500)
    original.update(more)
    copy.update(more)
    assert torch.equal(copy.counts, original.counts) and copy.total == 3500
    assert repr([copy.quantile(q) for q in quantiles]) == repr([original.quantile(q) for q in quantiles])  # nan equals nan
    assert state["counts"].sum() == 3000  # a snapshot: the updates after it left it as it was


def test_a_topk_state_round_trips_and_goes_on_the_same():
    """Ties in |a| (broken by labels), inf, -inf and NaN among the kept entries; labels of three columns."""
    generator = torch.Generator().manual_seed(5)
    original, seen = TopK(40), 0
    for size in (30, 200, 77):
        values = _awkward(generator, size)
        labels = torch.stack([torch.arange(seen, seen + size) // 10, torch.randint(0, 3, (size,), generator=generator),
                              torch.zeros(size, dtype=torch.long)], dim=1)
        original.update(values, labels)
        seen += size
    state = original.state_dict()
    copy = TopK(40)
    copy.load_state_dict(state)
    assert _same_top(copy, original) and _same_top(TopK.from_state(state), original)
    assert repr(copy.items()) == repr(original.items()) and len(copy.items()) == 40  # repr: nan equals nan
    assert [math.isnan(value) for value, _ in copy.items()[:7]] == [True] * 6 + [False] and abs(copy.items()[6][0]) == math.inf
    assert len({abs(value) for value, _ in original.items()}) < 30  # ties among what is kept
    for _ in range(2):
        values = _awkward(generator, 90)
        labels = torch.stack([torch.arange(seen, seen + 90) // 10, torch.arange(90) % 7, torch.ones(90, dtype=torch.long)], dim=1)
        original.update(values, labels)
        copy.update(values, labels)
        seen += 90
        assert _same_top(copy, original)
    assert torch.equal(_bits(state["values"]), _bits(TopK.from_state(state).values))
    assert not torch.equal(_bits(state["values"]), _bits(original.values))  # a snapshot: the updates moved on, it did not
    empty = TopK.from_state(TopK(3).state_dict())
    assert empty.k == 3 and empty.items() == [] and _same_top(empty, TopK(3))


def test_two_topk_halves_merged_equal_one_pass():
    generator = torch.Generator().manual_seed(6)
    values = _awkward(generator, 600)
    labels = torch.stack([torch.arange(600) // 20, torch.arange(600) % 20, torch.randint(0, 5, (600,), generator=generator)], dim=1)
    one, left, right = TopK(50), TopK(50), TopK(50)
    one.update(values, labels)
    halves = torch.randperm(600, generator=generator).split(300)  # each half holds entries from all over
    left.update(values[halves[0]], labels[halves[0]])
    right.update(values[halves[1]], labels[halves[1]])
    left.merge(right)
    assert _same_top(left, one)


def _recorder_batches(recorder, generator: torch.Generator, first: int, count: int) -> None:
    """``count`` batches of 3 windows (5 positions, 4 dims, the last rows padding), texts from ``first`` on, with ties,
    inf and NaN."""
    from massact.capture.blocks import BlockRecorder

    assert isinstance(recorder, BlockRecorder)
    for start in range(first, first + 3 * count, 3):
        lengths = [5, 3, 4]
        recorder.start(torch.arange(start, start + 3), torch.tensor([row * 5 + p for row, n in enumerate(lengths) for p in range(n)]), 5)
        for layer in range(2):
            hidden = torch.randn(3, 5, 4, generator=generator).round(decimals=1)
            hidden[:, 0, 1] = 9.0  # the same value in every window: ties across batches
            hidden[0, 1, layer], hidden[1, 2, 3] = float("nan"), float("-inf")
            recorder.add(layer, hidden)
        recorder.finish()


def test_the_scan_recorder_state_round_trips_and_goes_on_the_same():
    from massact.capture.blocks import BlockRecorder

    generator = torch.Generator().manual_seed(7)
    # 16 kept: after 5 batches, 5 NaNs, 5 -infs and 6 of the 15 tied 9.0s (a full top-k whose floor is a tie).
    original = BlockRecorder(2, 16, "cpu", group_bytes=1)
    _recorder_batches(original, generator, 0, 3)
    copy = BlockRecorder(2, 16, "cpu")  # another grouping: the statistics do not depend on it
    copy.load_state_dict(original.state_dict())
    for h1, t1, h2, t2 in zip(*original.sync(), *copy.sync()):
        assert torch.equal(h1.counts, h2.counts) and h1.total == 3 * 12 * 4 and _same_top(t1, t2)
    state = generator.get_state()
    for recorder in (original, copy):
        generator.set_state(state)  # the same batches for both
        _recorder_batches(recorder, generator, 9, 2)
    for h1, t1, h2, t2 in zip(*original.sync(), *copy.sync()):
        assert torch.equal(h1.counts, h2.counts) and h1.total == 5 * 12 * 4 and _same_top(t1, t2)
        assert [labels for value, labels in t1.items() if value == 9.0] == [[text, 0, 1] for text in range(6)]


@pytest.fixture(scope="module")
def moe_lm(tokenizer):
    import massact
    from conftest import tiny_model

    return massact.wrap(tiny_model("mixtral", len(tokenizer)), tokenizer)


def _keep_some(maxima, generator: torch.Generator, rounds: int) -> None:
    """Random outputs for random (block, expert) and the shared slots, some holding inf or NaN."""
    blocks, experts = maxima.routed.shape
    for _ in range(rounds):
        layer, expert = int(torch.randint(0, blocks, (1,), generator=generator)), int(torch.randint(-1, experts, (1,), generator=generator))
        output = (torch.randn(5, 8, generator=generator) * 3).round()
        if torch.rand(1, generator=generator) < 0.1:
            output[0, 0] = float("nan") if torch.rand(1, generator=generator) < 0.5 else float("-inf")
        maxima.keep(layer, expert if expert >= 0 else None, output)


def test_the_experts_maxima_state_round_trips_goes_on_the_same_and_halves_merge_to_one_pass(moe_lm):
    from massact.capture.expert_maxima import ExpertMaxima

    generator = torch.Generator().manual_seed(8)
    original = ExpertMaxima(moe_lm)
    assert original.routed.shape[1] == 4
    _keep_some(original, generator, 60)
    copy = ExpertMaxima(moe_lm)
    copy.load_state_dict(original.state_dict())
    for name in ("routed", "shared"):
        assert torch.equal(_bits(getattr(copy, name)), _bits(getattr(original, name)))
    assert original.routed.isnan().any() and original.routed.isinf().any()  # -inf: never routed to, and a kept -inf
    state = generator.get_state()
    for maxima in (original, copy):
        generator.set_state(state)
        _keep_some(maxima, generator, 30)
    for name in ("routed", "shared"):
        assert torch.equal(_bits(getattr(copy, name)), _bits(getattr(original, name)))

    one, left, right = ExpertMaxima(moe_lm), ExpertMaxima(moe_lm), ExpertMaxima(moe_lm)
    generator.manual_seed(9)
    _keep_some(left, generator, 40)
    _keep_some(right, generator, 40)
    generator.manual_seed(9)
    _keep_some(one, generator, 80)
    left.merge(right)
    for name in ("routed", "shared"):  # NaN equals NaN: a vectorized maximum makes NaNs of other bits
        merged, single = getattr(left, name), getattr(one, name)
        assert torch.equal(merged.isnan(), single.isnan()) and torch.equal(merged[~merged.isnan()], single[~single.isnan()])


HISTOGRAM = LogHistogram().state_dict()
TOP = TopK(4).state_dict() | {"values": torch.tensor([3.0, -2.0]), "labels": torch.tensor([[0, 1, 2], [0, 1, 3]])}


@pytest.mark.parametrize("make, state, field", [
    (LogHistogram, [HISTOGRAM["counts"]], "a LogHistogram state is a dict, not a list"),
    (LogHistogram, TOP, "kind: 'TopK', not 'LogHistogram'"),
    (LogHistogram, {"kind": "LogHistogram"}, "counts: missing"),
    (LogHistogram, HISTOGRAM | {"total": 5}, "total: not a field"),
    (LogHistogram, HISTOGRAM | {"counts": torch.zeros(100, dtype=torch.float64)}, "counts: has 100 bins, not 32768"),
    (LogHistogram, HISTOGRAM | {"counts": torch.zeros(2, LogHistogram.bins, dtype=torch.float64)},
     r"counts: shape \[2, 32768\], not \[n\]"),
    (LogHistogram, HISTOGRAM | {"counts": torch.zeros(LogHistogram.bins)}, "counts: dtype float32, not float64"),
    (LogHistogram, HISTOGRAM | {"counts": torch.full((LogHistogram.bins,), -1.0, dtype=torch.float64)}, "counts: holds a negative"),
    (LogHistogram, HISTOGRAM | {"counts": [0] * LogHistogram.bins}, "counts: a list, not a tensor"),
    (lambda: TopK(4), HISTOGRAM, "kind: 'LogHistogram', not 'TopK'"),
    (lambda: TopK(4), TOP | {"k": 5}, "k: the state keeps 5 entries, this top-k 4"),
    (lambda: TopK(4), TOP | {"k": 4.0}, "k: a float, not an int"),
    (lambda: TopK(4), TOP | {"labels": None}, "labels: None while the other is not"),
    (lambda: TopK(4), TOP | {"values": torch.tensor([3, -2])}, "values: dtype int64, not floating"),
    (lambda: TopK(4), TOP | {"labels": torch.tensor([[0.0, 1.0], [0.0, 2.0]])}, "labels: dtype float32, not integer"),
    (lambda: TopK(4), TOP | {"labels": torch.tensor([0, 1])}, r"labels: shape \[2\], not \[2, n\]"),
    (lambda: TopK(4), TOP | {"labels": torch.zeros(3, 3, dtype=torch.long)}, r"labels: shape \[3, 3\], not \[2, n\]"),
    (lambda: TopK(1), TOP | {"k": 1}, "values: holds 2 entries, more than k = 1"),
    (lambda: TopK(4), TOP | {"values": torch.tensor([-2.0, 3.0])}, "values: not in kept order"),
    (lambda: TopK(4), TOP | {"labels": torch.tensor([[0, 1, 3], [0, 1, 2]]), "values": torch.tensor([3.0, 3.0])},
     "values: not in kept order"),  # a tie in |a| with the larger labels first
])
def test_a_state_of_the_wrong_kind_or_shape_is_refused_by_field(make, state, field):
    statistic = make()
    before = statistic.state_dict()
    with pytest.raises(ValueError, match=field):
        statistic.load_state_dict(state)
    after = statistic.state_dict()  # nothing changed
    assert after.keys() == before.keys() and all(
        torch.equal(after[key], before[key]) if isinstance(after[key], torch.Tensor) else after[key] == before[key] for key in after)


def test_the_recorder_and_the_experts_refuse_a_state_that_is_not_theirs_and_keep_their_own(moe_lm):
    from massact.capture.blocks import BlockRecorder
    from massact.capture.expert_maxima import ExpertMaxima

    recorder = BlockRecorder(2, 6, "cpu")
    _recorder_batches(recorder, torch.Generator().manual_seed(10), 0, 1)
    kept = [h.counts.clone() for h in recorder.sync()[0]], [t.items() for t in recorder.sync()[1]]
    good = recorder.state_dict()
    last = good["tops"][1]
    for change, field in [
        ({"histograms": good["histograms"][:1]}, "histograms: 1 blocks, the model 2"),
        ({"tops": tuple(good["tops"])}, "tops: a tuple, not a list"),
        ({"tops": [good["tops"][0], TopK(5).state_dict()]}, "tops\\[1\\]: k: the state keeps 5 entries, this top-k 6"),
        ({"tops": [good["tops"][0], last | {"labels": last["labels"][:, :2]}]}, "tops\\[1\\]: labels: 2 per entry, not 3"),
        ({"tops": [good["tops"][0], last | {"values": last["values"].double()}]}, "tops\\[1\\]: values: dtype float64"),
        ({"histograms": [good["histograms"][0], good["tops"][0]]}, "histograms\\[1\\]: kind: 'TopK', not 'LogHistogram'"),
        ({"kind": "TopK"}, "kind: 'TopK', not 'BlockRecorder'"),
    ]:
        with pytest.raises(ValueError, match=field):
            recorder.load_state_dict(good | change)
        assert all(torch.equal(h.counts, c) for h, c in zip(recorder.sync()[0], kept[0]))
        assert repr([t.items() for t in recorder.sync()[1]]) == repr(kept[1])

    maxima = ExpertMaxima(moe_lm)
    state = maxima.state_dict()
    blocks = len(state["shared"])
    for change, field in [
        ({"routed": state["routed"][:, :2]}, rf"routed: shape \[{blocks}, 2\], not \[{blocks}, 4\]"),
        ({"shared": state["shared"].double()}, "shared: dtype float64, not float32"),
        ({"kind": "BlockRecorder"}, "kind: 'BlockRecorder', not 'ExpertMaxima'"),
    ]:
        with pytest.raises(ValueError, match=field):
            maxima.load_state_dict(state | change)
