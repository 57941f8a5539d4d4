"""What the tool writes, the tool reads: scan -> verify DIR -> quant DIR -> compare -> profile DIR, chained as README shows them, on
the planted sandwich-norm, post-LN, parallel and mixture-of-experts models, the newer dense and hybrid families (reordered
norms, hybrids, NoPE blocks, a multimodal Gemma-3), and on the default model."""

import json

import pytest

from conftest import FAMILIES, MOE_FAMILIES
from massact.analysis.deploy import quant
from massact.analysis.deploy.quant import Setting
from massact.cli import main
from massact.report.schema import load_profile, load_report
from test_families import DIM, LAYER, NEURON, planted, planted_moe

QUIET = ["--format", "json,txt", "--quiet"]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("The old house stood at the end of the lane. Its windows were dark, and the garden had grown wild "
                    "over many summers. People in the village said that nobody had lived there for years.\n", encoding="utf-8")
    return path


@pytest.fixture
def one_setting(monkeypatch):
    """The sweep cut to one 8-bit setting: the chain tests what is read and written, test_quant*.py the sweep itself."""
    monkeypatch.setattr(quant, "grid", lambda name="default", block=quant.DEFAULT_BLOCK: [Setting("rtn", 8, "tensor", "plain")])


def chain(model, out, eval_file, capsys, text: str = "Summer is warm. Winter is cold.") -> tuple[dict, dict]:
    """The five commands on ``model`` (None: the default model); each must exit 0 with nothing on stderr. Returns
    report.json as the scan wrote it and as the chain left it; the profile is beside it, in profile.json."""
    steps = [["scan", *([model] if model else []), "--text", text, "--no-verify", "--out", out, *QUIET],
             ["verify", out, "--eval-file", eval_file, *QUIET],
             ["quant", out, "--eval-file", eval_file, *QUIET],
             ["compare", out, out, "--out", out.parent / "compare"],
             ["profile", out, "--quiet"]]
    scanned = None
    capsys.readouterr()  # what the test printed itself (saving the model)
    for step in steps:
        code = main([str(part) for part in step])
        assert code == 0, (step[0], capsys.readouterr().err)
        assert capsys.readouterr().err == "", step[0]
        scanned = scanned or json.loads((out / "report.json").read_text(encoding="utf-8"))
    return scanned, json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", ["gemma2", "opt-postln", "neox", *MOE_FAMILIES, *FAMILIES[FAMILIES.index("olmo2"):]])
def test_the_chain_on_every_kind_of_block(family, tokenizer, tmp_path, eval_file, capsys, one_setting):
    model = planted_moe(family, tokenizer) if family in MOE_FAMILIES else planted(family, tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _, data = chain(tmp_path / "model", tmp_path / "report", eval_file, capsys)
    assert [d["dim"] for d in data["findings"]["dims"]] == [DIM] and data["findings"]["dims"][0]["born_at"] == LAYER
    assert data["causal"]["verification"] is not None and data["deploy"]["quantization"]["dim"] == DIM
    assert data["settings"]["verify"] is True and data["settings"]["quant"] is True
    report = load_report(tmp_path / "report")  # the final report reads back through the schema too
    assert len(report.deploy.quantization.rows) == 1 and report.causal.verification.interventions
    if family not in MOE_FAMILIES:
        assert report.mechanism.attribution[0].neurons[0].neuron == NEURON
    page = (tmp_path / "compare" / "compare.html").read_text(encoding="utf-8")
    assert f"{DIM} (block {LAYER}" in page
    profile = load_profile(tmp_path / "report" / "profile.json")  # the report's texts and criterion, read back checked
    born = profile.blocks[LAYER]
    assert DIM in born.dims and born.massive_tokens > 0 and "position 0" in born.carriers
    assert [b.layer for b in profile.massive_blocks()][0] == LAYER


def test_the_chain_on_the_default_model(tmp_path, eval_file, capsys, one_setting):
    """The default model's report holds every role the mechanism writes (precursor, erasure, removal...): the checked
    loader once refused it."""
    scanned, data = chain(None, tmp_path / "report", eval_file, capsys, text="The committee met on Tuesday.")
    assert {"precursor", "birth", "erasure"} <= {o["role"] for o in scanned["mechanism"]["origin"]}
    assert data["causal"]["verification"]["interventions"] and len(data["deploy"]["quantization"]["rows"]) == 1
    assert "SmolLM2-135M-Instruct" in (tmp_path / "compare" / "compare.html").read_text(encoding="utf-8")
