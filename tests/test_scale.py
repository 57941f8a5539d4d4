"""Batching with padding, and precision: statistics must not depend on how texts are grouped, and an overflow
must be named where it happens."""

import pytest

import massact
from massact.analysis.pipeline import encode
from massact.analysis.scan import scan_layers
from massact.errors import UsageError
from massact.texts import DEFAULT_TEXTS

from conftest import D_MODEL, plant_mlp, tiny_model

LAYER, NEURON, DIM = 1, 37, 20


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_and_one_by_one_statistics_agree(family, tokenizer):
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    lm = massact.wrap(model, tokenizer)
    _, inputs, _ = encode(lm, list(DEFAULT_TEXTS))
    assert len({ids.shape[1] for ids in inputs}) > 1  # different lengths, so batches carry padding
    alone = scan_layers(lm, inputs, candidates=64, batch_size=1)
    batched = scan_layers(lm, inputs, candidates=64, batch_size=3)
    tokens = sum(ids.shape[1] for ids in inputs)
    for one, many in zip(alone.histograms, batched.histograms):
        assert one.total == many.total == tokens * D_MODEL  # every real token once, no padding
        assert many.quantile(0.5) == pytest.approx(one.quantile(0.5), rel=2 * one.rel_error)
    for one, many in zip(alone.tops, batched.tops):
        one_items, many_items = one.items(), many.items()
        assert [abs(v) for v, _ in many_items] == pytest.approx([abs(v) for v, _ in one_items], rel=1e-4, abs=1e-5)
        # Entries clearly above the smallest kept one are the same (text, position, dim); ties may swap at the edge.
        edge = abs(one_items[-1][0]) * (1 + 1e-3) + 1e-5
        assert {tuple(l) for v, l in one_items if abs(v) > edge} == {tuple(l) for v, l in many_items if abs(v) > edge}
    report_one = massact.scan(lm, list(DEFAULT_TEXTS), batch_size=1)
    report_many = massact.scan(lm, list(DEFAULT_TEXTS), batch_size=4)
    found = [sorted((m.layer, m.text, m.position, m.dim) for m in r.massive) for r in (report_one, report_many)]
    assert found[0] == found[1] and len(found[0]) == len(DEFAULT_TEXTS) * (model.config.num_hidden_layers - LAYER)


def test_float16_overflow_is_named_with_its_block_and_dim(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=2000.0)  # about 2e5 > float16's 65504
    model.half()
    report = massact.scan(model, ["Summer is warm."], tokenizer=tokenizer)
    warning = next(w for w in report.warnings if w.startswith("non-finite"))
    assert f"block {LAYER}," in warning and f"dim {DIM}" in warning and "bfloat16 or float32" in warning
    report.to_json()  # inf and nan become null: the JSON stays valid


def test_long_texts_are_split_into_windows_not_truncated(tokenizer):
    lm = massact.wrap(tiny_model("llama", len(tokenizer)), tokenizer)
    long_text = " ".join(DEFAULT_TEXTS)
    n_tokens = tokenizer(long_text, return_tensors="pt").input_ids.shape[1]
    assert n_tokens > 64  # longer than the tiny model's context
    texts, inputs, tokens = encode(lm, [long_text, "Summer is warm."], max_length=32)
    assert [i.shape[1] for i in inputs[:-1]] == [32] * (n_tokens // 32) + ([n_tokens % 32] if n_tokens % 32 else [])
    assert sum(len(t) for t in tokens[:-1]) == n_tokens and texts[-1] == "Summer is warm."
    report = massact.scan(lm, [long_text], max_length=32)
    assert len(report.texts) == len(inputs) - 1
    assert any("split into" in w for w in report.warnings)
    with pytest.raises(UsageError, match="--max-length"):
        encode(lm, [long_text], max_length=1000)


def test_max_texts_keeps_the_first_texts(tmp_path):
    from massact.texts import gather_texts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i}." for i in range(100)), encoding="utf-8")
    assert gather_texts(file=str(corpus), max_texts=3) == ["Sentence number 0.", "Sentence number 1.", "Sentence number 2."]
