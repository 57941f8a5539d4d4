"""Massive values in the queries and keys: a key planted at one head and rotary pair is found there, in its band, and
nowhere else; the numbers equal a recomputation from the block's input; zeroing the planted dims costs more than the
control; partial rotary, latent attention and convolution blocks are reported as what they are; the section round-trips
through report.json."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import N_HEADS, tiny_model, weights_hash
from massact.analysis.evaluation.perplexity import EvalText, default_eval_text
from massact.analysis.function.qk import THRESHOLD, TOP, bands, disruption, measure, passkey_prompts, qk_values
from massact.models.loading import wrap
from massact.report.schema import read_report, write_report
from massact.report.text import to_text
from massact.texts import DEFAULT_TEXTS

LAYER, KV_HEAD, PAIR, HEAD_DIM = 2, 1, 7, 16  # tiny Llama: 4 query heads, 2 key heads of 16 dims, 8 rotary pairs


def _inputs(tokenizer, count: int = 4) -> dict[int, torch.Tensor]:
    return {i: tokenizer(text, return_tensors="pt").input_ids[:, :48] for i, text in enumerate(DEFAULT_TEXTS[:count])}


@torch.no_grad()
def _plant_key(model, layer: int, kv_head: int, dims: tuple[int, ...], factor: float = 50.0) -> None:
    """Key head ``kv_head`` of block ``layer`` made ``factor`` times larger at ``dims``, at every token: its k_proj rows."""
    k_proj = model.model.layers[layer].self_attn.k_proj
    for dim in dims:
        k_proj.weight[kv_head * HEAD_DIM + dim] *= factor


@pytest.fixture(scope="module")
def planted(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    _plant_key(model, LAYER, KV_HEAD, (PAIR, PAIR + HEAD_DIM // 2))  # one rotary pair: dims 7 and 15 turn together
    return wrap(model, tokenizer)


def test_bands_cut_the_pairs_into_thirds_by_frequency():
    # 8 pairs, fastest first: 3 high (rank 0-2: 3r < 8), 2 low (rank 6-7: 3r >= 16), the 3 between mid; order-free.
    assert bands(torch.tensor([1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.015, 0.007])) == ["high"] * 3 + ["mid"] * 3 + ["low"] * 2
    assert bands(torch.tensor([0.03, 1.0, 0.007])) == ["mid", "high", "low"]


def test_a_planted_key_is_found_at_its_head_pair_and_band_and_nowhere_else(planted, tokenizer):
    values, _ = measure(planted, _inputs(tokenizer))
    assert [b.kind for b in values.blocks] == ["RoPE"] * 4 and all(b.rotary_dims == HEAD_DIM for b in values.blocks)
    block = values.blocks[LAYER]
    assert block.keys.dims[KV_HEAD] == [PAIR, PAIR + 8] or block.keys.dims[KV_HEAD] == [PAIR + 8, PAIR]
    assert block.keys.pairs[KV_HEAD] == [PAIR, PAIR] and block.keys.bands[KV_HEAD] == ["low", "low"]  # inv_freq falls with the pair
    assert block.keys.share[KV_HEAD] > 0.95 and block.keys.ratio[KV_HEAD] > THRESHOLD
    others = [(b.layer, name, h) for b in values.blocks for name, heads in (("q", b.queries), ("k", b.keys), ("v", b.values))
              for h in range(len(heads.dims)) if heads.dims[h]]
    assert others == [(LAYER, "k", KV_HEAD)]
    # The unplanted heads hold about a uniform share (TOP of 16 dims: 12.5%), nowhere near the planted one.
    assert max(b.queries.share[h] for b in values.blocks for h in range(N_HEADS)) < 0.4
    assert max(b.values.ratio[h] for b in values.blocks for h in range(2)) < 2.5


@torch.no_grad()
def test_the_concentration_equals_keys_recomputed_from_the_block_input(planted, tokenizer):
    inputs = _inputs(tokenizer)
    values, _ = measure(planted, inputs)
    block = planted.model.model.layers[LAYER]
    kept = []
    keep = lambda module, args, kwargs: kept.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        squares = torch.zeros(2, HEAD_DIM, dtype=torch.float64)
        for ids in inputs.values():  # one text at a time: no padding to leave out
            kept.clear()
            planted.model(input_ids=ids)
            keys = F.linear(block.input_layernorm(kept[0]), block.self_attn.k_proj.weight)[0].double()  # [positions, 2 x 16]
            squares += (keys.view(-1, 2, HEAD_DIM) ** 2).sum(0)
    finally:
        handle.remove()
    norms = squares.sqrt()
    for head in range(2):
        share = float(squares[head].sort(descending=True).values[:TOP].sum() / squares[head].sum())
        ratio = float(norms[head].max() / norms[head].mean())
        assert math.isclose(values.blocks[LAYER].keys.share[head], share, rel_tol=1e-4)
        assert math.isclose(values.blocks[LAYER].keys.ratio[head], ratio, rel_tol=1e-4)
    assert values.tokens == sum(ids.shape[1] for ids in inputs.values())


def test_zeroing_the_planted_dims_costs_more_than_the_control_and_restores_the_model(planted, tokenizer):
    values, layouts = measure(planted, _inputs(tokenizer))
    before = weights_hash(planted.model)
    text = EvalText(text=default_eval_text(), source="the shipped sample")
    found = disruption(planted, values, layouts, text)
    assert weights_hash(planted.model) == before
    assert found.blocks == [LAYER] and found.zeroed == 2 and found.trials == 5
    base, massive, control = found.base, found.massive, found.control
    assert abs(math.log(massive.perplexity / base.perplexity)) > 3 * abs(math.log(control.perplexity / base.perplexity))
    assert abs(massive.passkey_logprob - base.passkey_logprob) > abs(control.passkey_logprob - base.passkey_logprob)
    again = disruption(planted, values, layouts, text)  # seeded: the same control, the same prompts
    assert again.control == control and again.base == base


def test_passkey_prompts_hide_the_number_and_end_with_it(planted):
    prompts = passkey_prompts(planted, default_eval_text(), trials=3, seed=1)
    for ids, n in prompts:
        text = planted.tokenizer.decode(ids[0])
        number = planted.tokenizer.decode(ids[0, -n:]).strip()
        assert len(number) == 5 and number.isdigit() and text.count(number) == 2  # in the needle, and as the answer
        assert ids.shape[1] <= planted.config.max_position_embeddings and text.rstrip().endswith(f"The pass key is {number}")
        assert f"The pass key is {number}. Remember it." in text
    assert passkey_prompts(planted, default_eval_text(), trials=3, seed=1)[0][0].equal(prompts[0][0])


def test_partial_rotary_latent_and_convolution_blocks_are_reported_as_what_they_are(tokenizer):
    phi = tiny_model("phi", len(tokenizer))  # partial_rotary_factor 0.5: the first 8 of 16 dims turn
    with torch.no_grad():
        phi.model.layers[1].self_attn.k_proj.weight[12] *= 80.0  # head 0's dim 12: past the turned dims
    values, _ = measure(wrap(phi, tokenizer), _inputs(tokenizer, 2))
    assert [(b.kind, b.rotary_dims, b.head_dim) for b in values.blocks] == [("partial RoPE", 8, 16)] * 4
    assert values.blocks[1].keys.dims[0] == [12] and values.blocks[1].keys.pairs[0] == [None] and values.blocks[1].keys.bands[0] == [""]
    lfm2, _ = measure(wrap(tiny_model("lfm2", len(tokenizer)), tokenizer), _inputs(tokenizer, 2))
    assert [b.kind for b in lfm2.blocks] == ["conv", "RoPE", "conv", "RoPE"]
    assert lfm2.blocks[0].queries is None and "convolution" in lfm2.blocks[0].note and lfm2.blocks[1].keys is not None
    mla, _ = measure(wrap(tiny_model("deepseek_v3", len(tokenizer)), tokenizer), _inputs(tokenizer, 2))
    assert {b.kind for b in mla.blocks} == {"latent"} and "8 decoupled rope dims" in mla.blocks[0].note
    smol, _ = measure(wrap(tiny_model("smollm3", len(tokenizer)), tokenizer), _inputs(tokenizer, 2))
    assert [b.kind for b in smol.blocks] == ["RoPE"] * 3 + ["NoPE"] and smol.blocks[3].keys.pairs == [[], []]


def test_the_section_round_trips_through_report_json_and_an_older_report_still_reads(planted, tokenizer):
    from massact.pipeline import scan

    report = scan(planted, list(DEFAULT_TEXTS[:4]), verify=False, max_length=48)
    assert report.qk is not None and report.qk.disruption is None
    assert report.qk.blocks[LAYER].keys.dims[KV_HEAD] != []
    data = json.loads(write_report(report))
    again = read_report(data)
    assert again.qk == report.qk
    text = to_text(again)
    assert "14. Massive values in the queries and keys" in text and "Disruption test: not run" in text
    assert any(line.startswith("Queries and keys: a massive dim") for line in report.conclusion)
    del data["qk"]
    assert read_report(data).qk is None and "Not measured" in to_text(read_report(data))
    full = qk_values(planted, _inputs(tokenizer, 2), EvalText(text=default_eval_text(), source="the shipped sample"))
    report.qk = full
    assert "Disruption test: 2 (head, dim) entries zeroed" in to_text(read_report(json.loads(write_report(report))))
