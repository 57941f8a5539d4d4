"""Headless encoders (how sentence-embedding checkpoints ship: the encoder without its masked-LM head) load, are
scanned, and are verified by their embeddings; a checkpoint missing anything else stays refused."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import massact
from conftest import plant_mlp, tiny_config, tiny_model
from massact.analysis.evaluation.embeddings import headless, sentences, spearman
from massact.errors import UsageError
from massact.models.loading import load

LAYER, NEURON, DIM = 1, 37, 20
EVAL = ("The library opens at nine in the morning. Summer is warm and winter is cold. The committee met on Tuesday "
        "afternoon. A river runs through the old town. The children played in the garden until dark. Prices rose "
        "again this year. She wrote a letter to her brother.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """The same planted encoder saved twice: as a base model (BertModel.save_pretrained, the sentence-embedding
    layout: no prefix, no head) and as a masked LM whose head tensors were then removed from the file."""
    import transformers as t

    root = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    config = tiny_config("bert", len(tokenizer))
    config._attn_implementation = "eager"
    base = t.BertModel(config, add_pooling_layer=True).eval()
    plant_mlp(base, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=1000.0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    masked = tiny_model("bert", len(tokenizer))
    plant_mlp(masked, tokenizer.bos_token_id, LAYER, NEURON, DIM, out_weight=1000.0)
    masked.save_pretrained(root / "stripped")
    tokenizer.save_pretrained(root / "stripped")
    weights = root / "stripped" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("cls.")}, weights, metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("layout", ["base", "stripped"])
def test_a_headless_encoder_is_scanned_and_verified_by_its_embeddings(layout, checkpoints):
    lm = load(str(checkpoints / layout), device="cpu", log=lambda message: None)
    assert headless(lm) and type(lm.model).__name__ == "BertModel"
    report = massact.scan(lm, ["Summer is warm. Winter is cold.", "The library opens at nine."], verify=True, eval_text=EVAL)
    assert [d.dim for d in report.findings.dims] == [DIM] and report.mechanism.attribution[0].neurons[0].neuron == NEURON
    v = report.causal.verification
    assert v.metric == "embeddings" and v.baseline_perplexity == 1.0 and v.output_effects == []
    assert any(c.startswith("headless encoder") for c in v.claims)
    zero = next(r for r in v.interventions if r.name.startswith("zero super weight"))
    assert not zero.still_massive
    effect = next(c for c in v.embedding_changes if "super weight" in c.name)
    assert effect.perplexity == pytest.approx(2.0 - effect.mean_cosine) and zero.perplexity == pytest.approx(effect.perplexity)
    assert -1.0 <= effect.spearman <= 1.0 and effect.mean_cosine < 1.0 - 1e-6
    control = next(r for r in v.interventions if r.name.startswith("control"))
    assert control.still_massive and zero.perplexity_ratio > 1.0


def test_an_encoder_missing_more_than_its_head_is_refused(checkpoints, tmp_path):
    shutil.copytree(checkpoints / "stripped", tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    tensors = load_file(weights)
    del tensors[f"bert.encoder.layer.{LAYER}.output.dense.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UsageError, match=rf"missing from the weights, first bert.encoder.layer.{LAYER}.output.dense.weight"):
        load(str(tmp_path / "broken"), device="cpu", log=lambda message: None)


def test_the_embedding_measures_on_numbers_a_reader_can_check():
    assert sentences("One two three. Too short. Four five six seven!") == ["One two three.", "Four five six seven!"]
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([0.2, 0.1, 0.3, 0.4])) == pytest.approx(0.4)  # ranks 1 3 2 4 vs 2 1 3 4: 1 - 6*6/60
