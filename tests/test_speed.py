"""The fast paths give the numbers the plain ones give: a pass run from its block on cached block inputs equals the
full pass under the same edit, batched evaluation windows equal one window at a time, a pass stopped after a block
reads what the full pass reads there."""

import math

import pytest
import torch

import test_verification
from massact.analysis.evaluation.mlm import next_token_windows
from massact.analysis.evaluation.perplexity import eval_windows, perplexity
from massact.analysis.evaluation.windows import Evaluation
from massact.capture.edits import ablate_neurons, read_coordinate, replace_massive
from massact.capture.hooks import forward_until, tap
from massact.settings import Criterion
from test_verification import DIM, EVAL, LAYER, NEURON

planted = test_verification.planted  # the fixture (gpt2 and llama), shared with the verification tests


def _full_logits(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = lm.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    return torch.log_softmax(logits[batch.labels != -100].float(), dim=-1)


@pytest.mark.parametrize("start", [1, 2, 3])
def test_a_pass_from_its_block_equals_the_full_pass_under_the_same_edit(planted, start):
    windows = eval_windows(planted, EVAL, window=12)  # 6 windows, the last one shorter: batches of 4, 1 and 1
    evaluation = Evaluation(planted, next_token_windows(windows), starts=[start])
    assert [len(b.ids) for b in evaluation.batches] == [4, 1, 1] and not any(b.inputs for b in evaluation.batches)
    assert evaluation.baseline == pytest.approx(perplexity(planted, windows), rel=1e-5)
    assert all(start in b.inputs for b in evaluation.batches)  # kept by the unmodified pass that gave the baseline
    # Edits strong enough to move every distribution: half the neurons; two dims set wherever they exceed 0.01.
    edits = [lambda: ablate_neurons(planted, start, list(range(0, 256, 2))),
             lambda: replace_massive(planted, start, {DIM: 5.0, 7: -5.0}, Criterion(min_abs=0.01, min_ratio=1e-6))]
    for edit in edits:
        for batch in evaluation.batches:
            with edit():
                fast, labels = evaluation.log_probs(batch, start)
                fast = fast.clone()  # the next call writes over its memory
                full = _full_logits(planted, batch)
            assert torch.equal(labels, batch.labels[batch.labels != -100])
            torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(fast, evaluation.log_probs(batch, start)[0], atol=1e-4)  # the edit changed them
    with ablate_neurons(planted, start, [NEURON]):
        assert evaluation.score(start) == pytest.approx(perplexity(planted, windows), rel=1e-5)


def test_batched_windows_score_as_one_window_at_a_time(planted):
    windows = eval_windows(planted, EVAL, window=16)
    evaluation = Evaluation(planted, next_token_windows(windows))
    assert evaluation.positions == sum(w.shape[1] - 1 for w in windows)
    assert evaluation.baseline == pytest.approx(perplexity(planted, windows), rel=1e-5)
    # Starts not asked for at construction: their block inputs are read now, by passes that stop there.
    for start in (LAYER, LAYER + 1):
        with ablate_neurons(planted, start, [NEURON]):
            assert evaluation.score(start, key=f"ablated {start}") == pytest.approx(perplexity(planted, windows), rel=1e-5)
    assert evaluation.cache[f"ablated {LAYER}"] != evaluation.baseline  # the planted neuron matters
    assert evaluation.score(LAYER, key=f"ablated {LAYER}") == evaluation.cache[f"ablated {LAYER}"]  # remembered


def test_a_pass_stopped_after_a_block_reads_what_the_full_pass_reads(planted):
    ids = planted.tokenizer(EVAL[:60], return_tensors="pt").input_ids
    seen: dict = {}
    sites = [(layer, "resid_out") for layer in range(4)]
    with torch.no_grad(), tap(planted.model, planted.adapter, sites,
                              lambda layer, s, t: seen.setdefault("full", {}).__setitem__(layer, t.clone())):
        planted.model(input_ids=ids, use_cache=False)
    with torch.no_grad(), tap(planted.model, planted.adapter, sites,
                              lambda layer, s, t: seen.setdefault("stopped", {}).__setitem__(layer, t.clone())):
        forward_until(planted.model, planted.adapter, LAYER, input_ids=ids, use_cache=False)
    assert sorted(seen["stopped"]) == [0, LAYER]  # the blocks after it never ran
    for layer in (0, LAYER):
        assert torch.equal(seen["stopped"][layer], seen["full"][layer])
    assert read_coordinate(planted, ids, [0, LAYER], 0, DIM)[LAYER] == float(seen["full"][LAYER][0, 0, DIM])


@pytest.mark.parametrize("group_bytes", [1, 2**20])
def test_the_scan_recorder_keeps_what_a_plain_computation_keeps(group_bytes):
    """``BlockRecorder`` (block outputs reduced a group at a time, real positions only; only entries at the top-k's
    floor go on) against the plain way: every real entry of every batch, one histogram and one sort by (|a| desc,
    text, position, dim) per block. Groups of one block and of all blocks; NaN and inf among the values."""
    from massact.capture import blocks
    from massact.capture.stats import LogHistogram

    generator = torch.Generator().manual_seed(0)
    recorder = blocks.BlockRecorder(n_layers=2, candidates=6, device="cpu", group_bytes=group_bytes)
    real: dict[int, list] = {0: [], 1: []}
    for first in (0, 3, 6, 9):  # four batches of 3 windows, 5 positions, 4 dims; the last rows are padding but in one
        lengths = [5, 5, 5] if first == 3 else [5, 3, 4]
        positions = torch.tensor([row * 5 + p for row, n in enumerate(lengths) for p in range(n)])
        recorder.start(torch.arange(first, first + 3), positions, 5)
        for layer in range(2):
            hidden = torch.randn(3, 5, 4, generator=generator).round(decimals=1)  # rounding makes ties
            hidden[:, 0, 1] = 9.0 * (layer + 1)  # the same value at every window's first position: ties across batches
            hidden[0, 1, 2] = -9.0 * (layer + 1)
            if first == 6:
                hidden[1, 2, 3], hidden[2, 3, 0] = float("inf"), float("nan")
            recorder.add(layer, hidden)
            real[layer] += [(float(hidden[row, position, dim]), (first + row, position, dim))
                            for row, n in enumerate(lengths) for position in range(n) for dim in range(4)]
        recorder.finish()
    histograms, tops = recorder.sync()
    for layer in range(2):
        plain = LogHistogram()
        plain.update(torch.tensor([value for value, _ in real[layer]]))
        assert torch.equal(histograms[layer].counts, plain.counts)
        order = sorted(real[layer], key=lambda entry: (not math.isnan(entry[0]), -abs(entry[0]), entry[1]))  # NaN first
        kept = tops[layer].items()
        assert [labels for _, labels in kept] == [list(labels) for _, labels in order[:6]]
        assert math.isnan(kept[0][0]) and kept[1][0] == math.inf and kept[2][0] == 9.0 * (layer + 1)

