"""The compression valley: the matrix entropy against hand computations, both Gram routes, a planted model where the
massive token makes the valley by construction, the section through report.json, a streamed scan's valley against the
in-memory one, and the atlas's sentence."""

from __future__ import annotations

import json
import math

import pytest
import torch

import massact
from conftest import PLANTED, plant_mlp, tiny_model
from massact.analysis.atlas.sentences import valley as valley_sentence
from massact.analysis.function.valley import gram_spectrum, matrix_entropy, reading, spectrum_entropy
from massact.capture.probe import block_output
from massact.errors import UsageError
from massact.models.loading import wrap
from massact.report.schema import read_report, write_report
from massact.report.text import section_text
from test_atlas import _row


def test_the_entropy_is_the_hand_computed_one():
    # X^T X = diag(2, 1): the eigenvalues 2 and 1 (and X X^T's third, 0), so p = (2/3, 1/3).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert gram_spectrum(x).tolist() == pytest.approx([1.0, 2.0], abs=1e-12)
    assert matrix_entropy(x) == pytest.approx((math.log(3) - 2 / 3 * math.log(2)) / math.log(3), rel=1e-12)
    rank_one = torch.tensor([[1.0, 2.0], [2.0, 4.0], [-3.0, -6.0]])
    assert matrix_entropy(rank_one) == pytest.approx(0.0, abs=1e-12)
    orthonormal = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0][:5]
    assert spectrum_entropy(gram_spectrum(orthonormal)) == pytest.approx(math.log(5), rel=1e-12)
    assert matrix_entropy(orthonormal) == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(matrix_entropy(x[:1])) and math.isnan(matrix_entropy(torch.zeros(3, 2)))


def test_both_gram_routes_give_one_spectrum():
    """A wide and a tall matrix: the decomposed Gram (the smaller one) against the other one, decomposed here."""
    generator = torch.Generator().manual_seed(1)
    for rows, width in ((4, 9), (9, 4)):
        x = torch.randn(rows, width, generator=generator, dtype=torch.float64)
        other = torch.linalg.eigvalsh(x.T @ x if rows <= width else x @ x.T)  # the larger Gram: its extra eigenvalues are 0
        rank = min(rows, width)
        assert torch.allclose(gram_spectrum(x)[-rank:], other[-rank:], rtol=1e-10, atol=1e-10)
        assert other[:-rank].abs().max() < 1e-10
        assert spectrum_entropy(gram_spectrum(x)) == pytest.approx(spectrum_entropy(other.clamp(min=0)), rel=1e-10)


def test_a_reading_leaves_the_massive_rows_out():
    x = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    found = reading(x, torch.tensor([True, False, False]))
    assert (found.massive, found.first_share, found.massive_share) == (1, pytest.approx(100 / 103), pytest.approx(100 / 103))
    assert math.isnan(found.first_share_without)  # the first token is the massive one
    # Without it: X X^T = [[1, 1], [1, 2]], eigenvalues (3 +- sqrt 5) / 2 over their sum 3.
    p = [(3 + math.sqrt(5)) / 6, (3 - math.sqrt(5)) / 6]
    assert found.entropy_without == pytest.approx(-sum(v * math.log(v) for v in p) / math.log(2), rel=1e-12)
    kept = reading(x, torch.tensor([False, True, False]))
    assert kept.first_share_without == pytest.approx(100 / 102) and kept.entropy == found.entropy


@pytest.fixture(scope="module")
def planted(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, *PLANTED)
    lm = wrap(model, tokenizer)
    return lm, massact.scan(lm, verify=False)


def test_the_massive_first_token_makes_the_valley_and_leaving_it_out_moves_it(planted, tokenizer):
    """The planted neuron writes a massive value on BOS from block 1 on: from there one row holds the whole norm, so the
    entropy is ~0 (the valley, at the birth); without that row the entropy is high there and the valley moves to block
    0, where BOS (10.0 in its trigger dim, not massive) still holds most of the norm. The entropies are those of each
    text's block output read again alone (``block_output``), means over the texts."""
    lm, report = planted
    v, (layer, _, dim) = report.valley, PLANTED
    assert [d.dim for d in report.findings.dims] == [dim] and v.birth == layer == 1
    assert (v.valley, v.from_birth, v.valley_without) == (1, 0, 0) and v.valley_depth == pytest.approx(1 / 3)
    texts = v.texts
    assert texts == sorted(report.findings.texts)[:6] and v.massive_tokens == [0] + [len(texts)] * 3
    for block in range(4):
        outputs = [block_output(lm, tokenizer(report.findings.texts[t], return_tensors="pt").input_ids, block) for t in texts]
        entropy = sum(matrix_entropy(x) for x in outputs) / len(texts)
        without = sum(matrix_entropy(x[1:] if block >= 1 else x) for x in outputs) / len(texts)
        first = sum(float(x[0].double().square().sum() / x.double().square().sum()) for x in outputs) / len(texts)
        assert v.entropy[block] == pytest.approx(entropy, rel=1e-4, abs=1e-6)
        assert v.entropy_without[block] == pytest.approx(without, rel=1e-4)
        assert v.first_share[block] == pytest.approx(first, rel=1e-5)
    assert max(v.entropy[1:]) < 1e-4 and min(v.entropy_without[1:]) > 0.5 and v.entropy[0] < 0.1
    assert v.gap == pytest.approx(v.entropy_without[1] - v.entropy[1]) and v.drop == pytest.approx(v.entropy[0] - v.entropy[1])
    assert v.first_share_correlation < -0.99  # the first token's share rises where the entropy falls


def test_the_section_round_trips_and_an_older_report_loads_without_it(planted):
    _, report = planted
    data = json.loads(write_report(report))
    back = read_report(data)
    assert json.loads(write_report(back)) == data and back.valley.valley == 1
    text = section_text(report, "valley")
    assert text.startswith("## 13. Compression valley") and "|     1 |   0.000 |" in text and "valley, birth" in text
    assert any(line.startswith("Compression valley: the entropy") for line in report.conclusion)
    data.pop("valley")
    older = read_report(data)
    assert older.valley is None and "Not in this report" in section_text(older, "valley")
    data["valley"] = {**json.loads(write_report(report))["valley"], "first_share": [0.5]}
    with pytest.raises(UsageError, match="field valley.first_share must hold one value per block"):
        read_report(data)


def test_a_streamed_scan_without_a_massive_value_reads_the_valley_in_one_more_pass(tokenizer, tmp_path):
    """Nothing massive, so no mechanism pass: the valley's own pass reads every block once more, and gives the
    in-memory valley (the streamed report with a massive value is compared whole in test_streaming)."""
    from massact.analysis.detect.stream import StreamPlace
    from massact.models.checkpoint import load_streamed
    from massact.pipeline import scan_streamed

    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "m")
    memory = massact.scan(str(tmp_path / "m"), verify=False, device="cpu")
    streamed = load_streamed(str(tmp_path / "m"), torch.float32, torch.device("cpu"))
    got = scan_streamed(streamed, place=StreamPlace(folder=tmp_path / "out"), device="cpu")
    assert not got.findings.dims and got.valley.texts == memory.valley.texts and sum(got.valley.massive_tokens) == 0
    blocks = sum(sum(streamed.checkpoint.sizes[name] for name in names) for names in streamed.checkpoint.blocks)
    assert streamed.checkpoint.bytes_read == streamed.checkpoint.size + blocks
    for name in ("entropy", "entropy_without", "first_share"):
        assert getattr(got.valley, name) == pytest.approx(getattr(memory.valley, name), rel=1e-5), name
    assert got.valley.entropy == got.valley.entropy_without and got.valley.valley == memory.valley.valley


def test_the_atlas_sentence_counts_the_valleys_near_the_birth():
    rows = [_row("a", dims=1, valley_from_birth=1, valley_drop=0.5, valley_drop_without=0.1),
            _row("b", dims=1, valley_from_birth=-5, valley_drop=0.3, valley_drop_without=0.3), _row("c")]
    assert [(s.text, s.rows) for s in valley_sentence(rows)] == [
        ("The compression valley lies within 2 blocks of the birth of the massive value in 1 of 2 models with both (a); the entropy "
         "falls by 0.40 into it on average, and by 0.20 with the massive tokens left out.", ["a", "b"])]
    assert valley_sentence(rows[:1] + rows[2:]) == []  # one model: nothing across models
