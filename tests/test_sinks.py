"""What massive activations do: planted sink and no-op heads, a sink that needs the massive value, the output effects
against a second computation of the distributions, and the masked-LM loss of encoders against transformers' own."""

import math

import pytest
import torch

import massact
from conftest import D_MODEL, N_HEADS, N_LAYERS, make_tokenizer, plant_mlp, run_massact, tiny_model
from massact.analysis.causal.output_effects import STOPWORDS, Edit, output_effects
from massact.analysis.causal.verification import replacement_values
from massact.analysis.evaluation.mlm import masked_windows, next_token_windows
from massact.analysis.evaluation.perplexity import eval_windows
from massact.analysis.evaluation.windows import Evaluation
from massact.analysis.function.sinks import head_metrics, sink_analysis, sink_tokens
from massact.capture.attention import attention_pass
from massact.capture.edits import set_weight
from massact.capture.hooks import tap_module_input

LAYER, NEURON, DIM = 1, 37, 20  # the planted massive activation: block 1's MLP writes dim 20 on BOS
SINK_LAYER, SINK_HEAD = 2, 1
HEAD_DIM = D_MODEL // N_HEADS
TEXTS = ["The library opens at nine in the morning and closes late in the evening.",
         "Summer is warm and bright, winter is cold and dark, and spring is wet."]
EVAL = "She poured the tea, opened the window, and watched the rain fall on the garden. " * 3


@torch.no_grad()
def plant_sink_head(model, layer: int, head: int) -> None:
    """GPT-2 head ``head`` of block ``layer``: a constant query, a key that reads dim DIM (massive on BOS only), so it
    attends to BOS alone; its value ignores DIM, so BOS's value vector (almost all DIM after the LayerNorm) is tiny."""
    c_attn = model.transformer.h[layer].attn.c_attn  # Conv1D [in, 3 x d]: q | k | v
    q, k, v = (slice(part * D_MODEL + head * HEAD_DIM, part * D_MODEL + (head + 1) * HEAD_DIM) for part in range(3))
    c_attn.weight[:, q] = 0.0
    c_attn.bias[q] = 0.0
    c_attn.bias[q.start] = 10.0
    c_attn.weight[:, k] = 0.0
    c_attn.bias[k] = 0.0
    c_attn.weight[DIM, k.start] = 5.0
    c_attn.weight[DIM, v] = 0.0
    c_attn.bias[v] = 0.0


def planted(tokenizer, heads: list[int]):
    model = tiny_model("gpt2", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    for head in heads:
        plant_sink_head(model, SINK_LAYER, head)
    return massact.wrap(model, tokenizer)


def test_head_metrics_of_hand_made_attention():
    n = 5
    onto_first = torch.zeros(2, n, n)
    onto_first[:, :, 0] = 1.0
    uniform = (torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)).expand(2, n, n)
    values = torch.randn(n, 2, 4)
    values[0] *= 0.01  # the sink's value vector is small
    found = head_metrics(onto_first, values, [0], causal=True)
    assert found["share"].tolist() == [1.0, 1.0]
    # queries 1..4 see 2..5 keys: the uniform share on one sink is the mean of 1/2, 1/3, 1/4, 1/5
    assert found["uniform"].tolist() == pytest.approx([(1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4] * 2)
    norms = values.norm(dim=-1)  # [positions, heads]
    assert found["value_ratio"].tolist() == pytest.approx((norms[0] / norms[1:].median(dim=0).values).tolist(), rel=1e-5)
    assert found["output_share"].tolist() == pytest.approx([1.0, 1.0])  # all of the output comes from the sink
    both = head_metrics(uniform, values, [0], causal=False)  # bidirectional: every query, n keys each
    assert both["uniform"].tolist() == pytest.approx([1 / n] * 2)


def test_planted_sink_head_is_a_sink_and_a_noop_head(tokenizer):
    lm = planted(tokenizer, [SINK_HEAD])
    report = massact.scan(lm, TEXTS)
    tokens, _ = sink_tokens(report.findings.massive, report.findings.tokens)
    assert [(t.text, t.position, t.token) for t in tokens] == [(0, 0, "<s>"), (1, 0, "<s>")]
    implementation = lm.model.config._attn_implementation
    sinks = sink_analysis(lm, {i: lm.tokenizer(t, return_tensors="pt").input_ids for i, t in enumerate(TEXTS)}, report.findings)
    assert lm.model.config._attn_implementation == implementation  # eager only for that pass
    share = sinks.share[SINK_LAYER]
    assert share[SINK_HEAD] > 0.99 and sinks.value_ratio[SINK_LAYER][SINK_HEAD] < 0.25
    ordinary = [h for h in range(N_HEADS) if h != SINK_HEAD]
    assert all(share[h] < sinks.epsilon for h in ordinary)  # random heads spread their attention
    assert sinks.rate[SINK_LAYER] == pytest.approx(1 / N_HEADS)  # one head of four, in both texts
    assert sinks.noop_heads[SINK_LAYER] == 1 and sum(sinks.noop_heads) == 1


def test_sink_that_reads_the_massive_value_vanishes_when_it_is_zeroed(tokenizer):
    lm = planted(tokenizer, list(range(N_HEADS)))
    report = massact.scan(lm, TEXTS)
    inputs = {i: lm.tokenizer(t, return_tensors="pt").input_ids for i, t in enumerate(TEXTS)}
    sinks = sink_analysis(lm, inputs, report.findings,
                          replacements=replacement_values(report.findings.dims, report.findings.massive))
    assert sinks.sink_layers == [SINK_LAYER] and sinks.rate[SINK_LAYER] == 1.0
    zero, mean = (next(c for c in sinks.interventions if c.label == label) for label in ("zero", "mean"))
    assert zero.survives[SINK_LAYER] is False and zero.rate[SINK_LAYER] == 0.0
    assert mean.survives[SINK_LAYER] is True and mean.rate[SINK_LAYER] == 1.0
    assert zero.survives[0] is None  # no sink there to lose
    assert sinks.dependence.startswith("the sink depends on the massive activation")


def _distributions(lm, ids):
    with torch.no_grad():
        return torch.softmax(lm.model(ids).logits[0, :-1].double(), dim=-1)


def test_output_effects_match_the_distributions(tokenizer):
    lm = planted(tokenizer, [])
    matrix = lm.adapter.param_name(lm.model, LAYER, lm.adapter.mlp_down)
    index = (NEURON, DIM)  # GPT-2's Conv1D stores [in, out]
    windows = eval_windows(lm, EVAL, window=30)
    assert len(windows) > 1
    [effect] = output_effects(lm, Evaluation(lm, next_token_windows(windows)), [Edit("zero", "w", lambda: set_weight(lm, matrix, index))])
    before = torch.cat([_distributions(lm, w) for w in windows])
    with set_weight(lm, matrix, index):
        after = torch.cat([_distributions(lm, w) for w in windows])
    targets = torch.cat([w[0, 1:] for w in windows])
    assert effect.positions == len(targets)
    kl = (before * (before.log() - after.log())).sum(-1).mean()
    assert effect.kl == pytest.approx(float(kl), rel=1e-3) and effect.kl > 1e-4
    nll = -after.log().gather(1, targets.unsqueeze(1)).mean()
    assert effect.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    change = after.mean(0) - before.mean(0)
    top = int(change.argmax())
    assert effect.rises[0].id == top and effect.rises[0].after == pytest.approx(float(after.mean(0)[top]), rel=1e-5)
    assert effect.falls[0].id == int(change.argmin())
    stop = torch.tensor([tokenizer.decode([i]).strip().lower() in STOPWORDS for i in range(before.shape[1])])
    assert stop.any() and effect.stopword_before == pytest.approx(float(before[:, stop].sum(-1).mean()), rel=1e-5)
    assert effect.stopword_after == pytest.approx(float(after[:, stop].sum(-1).mean()), rel=1e-5)


@pytest.fixture(scope="module")
def masked_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    return tokenizer


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_loss_matches_transformers(family, masked_tokenizer):
    lm = massact.wrap(tiny_model(family, len(masked_tokenizer), seed=3), masked_tokenizer)
    windows = masked_windows(lm, EVAL)
    again = masked_windows(lm, EVAL)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(windows, again))  # seeded: the same masks every time
    total, count = 0.0, 0
    for ids, labels in windows:
        n = int((labels != -100).sum())
        real = ids.shape[1] - 1  # all but the leading <s>
        assert n == max(1, round(0.15 * real)) and (ids[labels != -100] == masked_tokenizer.mask_token_id).all()
        with torch.no_grad():
            total += lm.model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    evaluation = Evaluation(lm, windows)  # the windows in padded batches
    assert evaluation.positions == count and evaluation.baseline_nll / count == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "phi3", "bert"])
def test_value_vectors_recompose_the_heads_output(family, tokenizer):
    """sum_k attention[q, k] v_k per head is what the attention's output projection reads: the values are read
    right, and grouped-query heads map to their key/value heads."""
    lm = massact.wrap(tiny_model(family, len(tokenizer), seed=4), tokenizer)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    projection = lm.adapter.module(lm.model, 1, lm.adapter.attn_proj)
    kept = {}
    with tap_module_input(projection, lambda t: kept.update(z=t[0].detach().clone())):
        found = attention_pass(lm, ids)
    heads = torch.einsum("hqk,khd->qhd", found.maps[1][0], found.values[1][0])
    assert torch.allclose(heads.flatten(1), kept["z"], atol=1e-5)


def test_tiny_bert_scan_writes_a_verified_report(tmp_path, masked_tokenizer):
    model = tiny_model("bert", len(masked_tokenizer))
    plant_mlp(model, masked_tokenizer.bos_token_id, LAYER, NEURON, DIM)
    model.save_pretrained(tmp_path / "model")
    masked_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "eval.txt").write_text(EVAL, encoding="utf-8")  # short: the shipped text takes minutes on a busy CPU
    result = run_massact("scan", tmp_path / "model", "--out", tmp_path / "out", "--quiet", "--verify", "--sink-epsilon", "0.4",
                         "--eval-file", tmp_path / "eval.txt", *sum((["--text", t] for t in TEXTS), []))
    assert result.returncode == 0, result.stderr
    import json

    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    v = saved["causal"]["verification"]
    assert v["metric"] == "masked-LM" and v["masked_lm_loss"] > 0
    assert v["baseline_perplexity"] == pytest.approx(math.exp(v["masked_lm_loss"]), rel=1e-6)
    names = [r["name"] for r in v["interventions"]]
    assert f"ablate top 1 neuron(s) [{NEURON}]" in names and any(n.startswith("zero super weight") for n in names)
    assert {e["target"].split()[0] for e in v["output_effects"]} == {"weight", "zero", "mean"}
    a = saved["causal"]["attention"]
    assert a["causal"] is False and a["epsilon"] == 0.4 and len(a["rate"]) == 4
    assert [c["label"] for c in a["interventions"]] == ["zero", "mean"]
    text = (tmp_path / "out" / "report.txt").read_text(encoding="utf-8")
    assert "Masked-LM loss on" in text and "What the output loses" in text and "every query (bidirectional)" in text


def test_sink_epsilon_out_of_range_is_a_usage_error():
    result = run_massact("scan", "--sink-epsilon", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "massact: error: --sink-epsilon must be between 0 and 1 (an attention probability)"


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_texts_batched_in_a_sink_pass_measure_as_one_at_a_time(family, tokenizer, monkeypatch):
    """Texts of different lengths in one padded pass give each text's metrics as alone, with and without the
    massive values replaced: the replacement judges each text by the median of its own positions, not the pads."""
    from massact.analysis.function import sinks as module
    from massact.capture.edits import replace_massive
    from massact.settings import Criterion

    model = tiny_model(family, len(tokenizer), seed=3)
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    lm = massact.wrap(model, tokenizer)
    texts = [*TEXTS, "Rain.", "A cat sat on the mat and looked at the door for a long while."]
    inputs = {i: tokenizer(t, return_tensors="pt").input_ids for i, t in enumerate(texts)}
    assert len({ids.shape[1] for ids in inputs.values()}) == len(texts)  # every length differs: real padding
    sinks = {i: [0] if i % 2 else [0, 2] for i in inputs}
    criterion = Criterion(min_abs=5.0, min_ratio=20.0)
    replaced = lambda valid: replace_massive(lm, LAYER, {DIM: 0.0}, criterion, valid)
    found = {}
    for size in (1, 8):
        monkeypatch.setattr(module, "SINK_BATCH", size)
        found[size] = [module.sink_pass(lm, inputs, sinks, 0.3), module.sink_pass(lm, inputs, sinks, 0.3, replaced)]
    for alone, batched in zip(found[1], found[8]):
        assert batched.texts == alone.texts == len(texts)
        for key in ("share", "uniform", "rate", "value_ratio", "output_share"):
            torch.testing.assert_close(getattr(batched, key), getattr(alone, key), rtol=1e-4, atol=1e-5, equal_nan=True)
    assert not torch.allclose(found[1][0].share, found[1][1].share)  # the replacement changed the attention


def test_the_massive_mask_of_a_padded_batch_is_each_texts_own():
    """With the attention mask, each row's median |a| is over its real positions: large pads neither hide a massive
    value nor count as massive; without it, they raise the median and hide it."""
    from massact.capture.edits import massive_mask
    from massact.settings import Criterion

    generator = torch.Generator().manual_seed(0)
    long, short = torch.randn(1, 5, 8, generator=generator), torch.randn(1, 2, 8, generator=generator)
    long[0, 0, 3], short[0, 1, 3] = 40.0, -40.0
    batch = torch.full((2, 5, 8), 1000.0)
    batch[0], batch[1, :2] = long[0], short[0]
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    criterion = Criterion(min_abs=10.0, min_ratio=20.0)
    mask = massive_mask(batch, 3, criterion, valid)
    assert mask[0].tolist() == massive_mask(long, 3, criterion)[0].tolist() == [True, False, False, False, False]
    assert mask[1].tolist() == [False, True, False, False, False] and massive_mask(short, 3, criterion)[0].tolist() == [False, True]
    assert not massive_mask(batch, 3, criterion)[1].any()  # the pads' median hides it


def _forced(picks):
    """A forward hook that replaces an indexer's top-k key positions by ``picks(queries)`` [queries, k], for every
    text of the batch."""
    def hook(module, args, output):
        chosen = picks(output.shape[1]).to(output.dtype)
        return chosen.unsqueeze(0).expand(output.shape[0], -1, -1).contiguous()
    return hook


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_the_indexer_picks_of_the_sink_token_are_reported(family, tokenizer):
    """DeepSeek sparse attention: forced to pick only key 0 for every query, the indexer picks the sink token (the first
    token, no activation being massive) for 100% of the queries that see it, and the heads, which see no other key, put
    all their attention there; forced to pick each query's own position only, 0% and no attention on it. GLM-5's
    block 2 reuses block 1's picks ("shared" indexer): its attention follows them, but it has no picks of its own."""
    from massact.analysis.detect.results import Findings
    from massact.report.tables import Style, plain_text
    from massact.report.text import _mixing_tables
    from massact.settings import Criterion

    lm = massact.wrap(tiny_model(family, len(tokenizer)), tokenizer)
    inputs = {i: tokenizer(t, return_tensors="pt").input_ids for i, t in enumerate(TEXTS)}
    findings = Findings(texts=dict(enumerate(TEXTS)), tokens={i: tokenizer.convert_ids_to_tokens(ids[0]) for i, ids in inputs.items()},
                        criterion=Criterion(min_abs=100.0, min_ratio=1000.0), layers=[], massive=[], dims=[])
    own = [layer for layer in range(N_LAYERS) if lm.at(layer).indexer is not None]
    assert own == ([0, 1, 3] if family == "glm_moe_dsa" else [0, 1, 2, 3])
    indexers = [lm.adapter.module(lm.model, layer, lm.at(layer).indexer) for layer in own]
    found = {}
    for name, picks in (("sink", lambda n: torch.zeros(n, 1, dtype=torch.long)), ("self", lambda n: torch.arange(n).unsqueeze(1))):
        handles = [indexer.register_forward_hook(_forced(picks)) for indexer in indexers]
        try:
            found[name] = sink_analysis(lm, inputs, findings)
        finally:
            for handle in handles:
                handle.remove()
    sink, self_only = found["sink"], found["self"]
    assert [t.position for t in sink.tokens] == [0, 0]
    for layer in range(N_LAYERS):
        if layer in own:
            assert sink.indexer_selected[layer] == 1.0 and self_only.indexer_selected[layer] == 0.0
        else:
            assert math.isnan(sink.indexer_selected[layer]) and math.isnan(self_only.indexer_selected[layer])
        assert sink.share[layer] == pytest.approx([1.0] * N_HEADS) and self_only.share[layer] == pytest.approx([0.0] * N_HEADS, abs=1e-6)
    assert "the indexer picks the sink tokens for 100.0% of the queries" in sink.mixing
    assert "; " not in sink.mixing  # one clause: the summary shows each clause of the mixing words as its own line
    table = plain_text(_mixing_tables(Style(plain=True), self_only))
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("|")]
    assert "whose indexer" in table and [row for row in cells if row[0].isdigit()] == [[str(layer), "0.0%"] for layer in own]


def test_the_indexer_picks_read_back_and_a_report_without_them_reads_as_none():
    """``indexer_selected`` came after version 2's first files: one written before it reads back with None; one with it
    reads back its values (null: a block without an indexer), and a share above 1 is refused in one line."""
    import json

    from massact.analysis.function.results import AttentionSinks
    from massact.errors import UsageError
    from massact.report.schema import read, to_data

    sinks = AttentionSinks(texts=1, share=[[0.5]] * 2, uniform=[[0.5]] * 2, sink_layers=[], first_sink_layer=None, birth_layer=None,
                           summary="", indexer_selected=[float("nan"), 0.25])
    data = json.loads(json.dumps(to_data(sinks)))
    assert data["indexer_selected"] == [None, 0.25]
    back = read(AttentionSinks, data, "report.json")
    assert math.isnan(back.indexer_selected[0]) and back.indexer_selected[1] == 0.25
    assert read(AttentionSinks, {k: v for k, v in data.items() if k != "indexer_selected"}, "report.json").indexer_selected is None
    with pytest.raises(UsageError, match=r"^report.json: field indexer_selected\[1\] must be a number from 0 to 1, or null"):
        read(AttentionSinks, {**data, "indexer_selected": [None, 1.5]}, "report.json")
