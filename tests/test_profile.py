"""The profile (massact.profile, profile.json) and the masks (massact.masks): rules against the live mask, the live
mask against a hand computation from hidden_states, padding, the outlier severity by hand, the schema, the CLI, and
the one-line reprs a REPL shows."""

import json
import math
import subprocess
import sys

import pytest
import torch

import massact
from conftest import TINY, TRIGGER, one_line_error, plant_mlp, run_massact, tiny_model
from massact.analysis.profile.results import Profile
from massact.errors import UsageError
from massact.masks import Criterion, Hook, live
from massact.report.schema import load_profile, write_profile
from massact.texts import DEFAULT_TEXTS

HELD_OUT = ["Rivers carry sand to the sea over thousands of years.", "Please pass the salt, and the pepper too.",
            "The committee met on Tuesday; nobody agreed on anything.", "Seven swans swam slowly south.",
            "In 1969, two astronauts walked on the Moon.", "def add(a, b):\n    return a + b"]

DEFAULT = Criterion()  # the scan's criterion: |a| >= 100 and >= 1000x the median


@pytest.fixture(scope="module")
def smol():
    return massact.load(None, device="cpu", log=lambda message: None)


@pytest.fixture(scope="module")
def smol_profile(smol):
    return massact.profile(smol, list(DEFAULT_TEXTS))


def block_outputs(lm, texts, padding_side="right"):
    """Every block's output but the last (hidden_states[l + 1]; the last is taken after the final norm) for a padded
    batch of ``texts``, with its ids and attention mask."""
    lm.tokenizer.padding_side = padding_side
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = lm.model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    return batch.input_ids, batch.attention_mask, hidden[1:-1]


def hand_mask(hidden, real, criterion=DEFAULT):
    """The criterion written out: the median |a| over the real tokens' every dim, then any dim over the threshold."""
    values = sorted(hidden[real.bool()].abs().flatten().tolist())
    median = values[(len(values) - 1) // 2]  # torch's median: the lower middle
    threshold = max(criterion.min_abs, criterion.min_ratio * median)
    return (hidden.abs() >= threshold).any(-1) & real.bool()


def test_default_profile_names_position_zero_from_block_11(smol_profile):
    p = smol_profile
    found = p.massive_blocks()
    assert found[0].layer == 11 and 507 in found[0].dims and all(507 in b.dims for b in found)
    for block in found:
        assert block.carriers == "position 0" and block.massive_tokens == len(DEFAULT_TEXTS)
        assert [(r.kind, r.position) for r in block.rules] == [("position", 0)]
        assert block.precision == block.recall == 1.0
        assert block.threshold == max(100.0, 1000.0 * block.median)
    assert all(b.carriers == "none" and b.rules == [] and math.isnan(b.recall) for b in p.blocks if b not in found)


def test_rules_agree_with_the_live_mask_on_held_out_texts(smol, smol_profile):
    ids, real, hidden = block_outputs(smol, HELD_OUT)
    total = {"tp": 0, "fp": 0, "fn": 0}
    for block in smol_profile.massive_blocks():
        if block.layer >= len(hidden):
            continue
        predicted = smol_profile.mask(ids, layer=block.layer, attention_mask=real)
        exact = live(hidden[block.layer], attention_mask=real)
        total["tp"] += int((predicted & exact).sum())
        total["fp"] += int((predicted & ~exact).sum())
        total["fn"] += int((~predicted & exact).sum())
    precision = total["tp"] / (total["tp"] + total["fp"])
    recall = total["tp"] / (total["tp"] + total["fn"])
    # On this model the first token carries dim 507 from block 11 to 27, whatever the token: the rule is exact.
    assert total["tp"] == len(HELD_OUT) * 17 and precision == 1.0 and recall == 1.0


def test_live_equals_a_hand_computation_and_the_hook_records_it(smol):
    ids, real, hidden = block_outputs(smol, HELD_OUT[:3])
    for layer in (5, 11, 20):
        assert torch.equal(live(hidden[layer], attention_mask=real), hand_mask(hidden[layer], real))
    assert live(hidden[11], attention_mask=real)[:, 0].all() and not live(hidden[5], attention_mask=real).any()
    before = (len(smol.model._forward_pre_hooks), len(smol.model.model.layers[11]._forward_hooks))
    with Hook(smol, layers=[11, 20]) as hook:
        with torch.no_grad():
            smol.model(input_ids=ids, attention_mask=real, use_cache=False)
    assert sorted(hook.masks) == [11, 20]
    assert torch.equal(hook.masks[11], hand_mask(hidden[11], real)) and torch.equal(hook.masks[20], hand_mask(hidden[20], real))
    assert (len(smol.model._forward_pre_hooks), len(smol.model.model.layers[11]._forward_hooks)) == before  # gone when closed
    # A criterion with a lower ratio flags more, exactly as the hand computation does.
    loose = Criterion(min_abs=5.0, min_ratio=20.0)
    assert torch.equal(live(hidden[5], loose, real), hand_mask(hidden[5], real, loose))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_never_flagged(smol, smol_profile, side):
    ids, real, hidden = block_outputs(smol, ["Hi.", HELD_OUT[2]], side)
    pads = ~real.bool()
    assert pads.any()
    exact = live(hidden[15], attention_mask=real)
    predicted = smol_profile.mask(ids, attention_mask=real)
    assert not exact[pads].any() and not predicted[pads].any()
    first = real.argmax(1)  # each sequence's first real token, after any left padding
    assert predicted[torch.arange(2), first].all() and int(predicted.sum()) == 2
    assert torch.equal(exact, predicted)
    with Hook(smol, layers=[15]) as hook, torch.no_grad():
        smol.model(input_ids=ids, attention_mask=real, use_cache=False)
    assert torch.equal(hook.masks[15], exact)
    # Without the attention mask the padding is read from the stored pad id (SmolLM2's is its own token, not BOS).
    assert torch.equal(smol_profile.mask(ids), predicted)


def test_gamma_equals_a_hand_computation(smol, smol_profile):
    ids, real, hidden = block_outputs(smol, list(DEFAULT_TEXTS))
    for block in (smol_profile.blocks[5], smol_profile.blocks[15]):
        h = hidden[block.layer][real.bool()].double()
        massive = (h.abs() >= block.threshold).any(-1)

        def gamma(x):
            return float(x.mean(0).norm() / x.std(0, unbiased=False).norm())

        assert math.isclose(block.gamma, gamma(h), rel_tol=1e-6)
        assert math.isclose(block.gamma_without, gamma(h[~massive]), rel_tol=1e-6)
        assert block.tokens == h.shape[0] and block.massive_tokens == int(massive.sum())
    assert smol_profile.blocks[15].gamma < smol_profile.blocks[15].gamma_without  # one token's 24,000 is most of the std


def test_token_rules_and_their_precision_and_recall_by_hand(tokenizer):
    """A planted Llama whose spike fires on <s> (always first) and on every "." as well: position 0 and a token rule."""
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, 1, 37, 20)
    dot = tokenizer.convert_tokens_to_ids(".")
    with torch.no_grad():
        model.get_input_embeddings().weight[dot, TRIGGER] = 10.0
    lm = massact.wrap(model, tokenizer)
    texts = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold.", "A short one"]
    p = massact.profile(lm, texts)
    ids = [tokenizer(t).input_ids for t in texts]
    dots = sum(row[1:].count(dot) for row in ids)
    block = p.blocks[1]
    rules = {r.kind: r for r in block.rules}
    assert block.carriers == "position 0 + token ids" and block.massive_tokens == len(texts) + dots
    assert rules["token"].token_id == dot and rules["token"].token == "." and rules["token"].carriers == rules["token"].predicted == dots
    assert rules["position"].carriers == len(texts) and rules["token"].recall == dots / block.massive_tokens
    assert block.precision == block.recall == 1.0
    flagged = p.mask([ids[1]], layer=1)[0].tolist()
    assert flagged == [i == 0 or t == dot for i, t in enumerate(ids[1])]


def test_profile_json_round_trips_and_an_edited_one_is_refused(smol_profile, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(write_profile(smol_profile), encoding="utf-8")
    back = load_profile(path)
    assert write_profile(back) == write_profile(smol_profile) and isinstance(back, Profile)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "massact-profile" and data["version"] == 1 and data["blocks"][11]["rules"][0]["kind"] == "position"
    for edit, message in ((lambda d: d.update(version=2), "version 2"),
                          (lambda d: d["blocks"][11].update(carriers="magic"), "blocks[11].carriers"),
                          (lambda d: d["blocks"][11]["rules"][0].update(recall=1.5), "rules[0].recall"),
                          (lambda d: d.pop("blocks"), "blocks"), (lambda d: d.update(format="massact-report"), "not a massact profile")):
        broken = json.loads(json.dumps(data))
        edit(broken)
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_profile(path)


def test_profile_json_is_read_without_torch(smol_profile, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(write_profile(smol_profile), encoding="utf-8")
    code = ("import sys; from massact.report.schema import load_profile; p = load_profile(sys.argv[1]); "
            "print(p.massive_blocks()[0].layer, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["11", "False"], result.stderr


def test_cli_profile_of_a_report_and_of_a_model(model_dir, tmp_path):
    report_dir = tmp_path / "report"
    assert run_massact("scan", model_dir, "--out", report_dir, *TINY).returncode == 0
    result = run_massact("profile", report_dir)
    assert result.returncode == 0 and result.stdout.strip().endswith(f"wrote {report_dir / 'profile.json'}"), result.stderr
    assert "Profile(" in result.stdout
    saved = load_profile(report_dir / "profile.json")
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert [b.median for b in saved.blocks] == [layer["median"] for layer in report["findings"]["layers"]]
    assert saved.blocks[1].dims == [20] and saved.blocks[1].carriers == "position 0" and saved.windows == report["corpus"]["windows"]
    # The same model and texts given directly give the same profile.
    out = tmp_path / "direct"
    texts = [arg for text in report["corpus"]["spec"]["texts"] for arg in ("--text", text)]
    direct = run_massact("profile", model_dir, "--out", out, "--quiet", *texts)
    assert direct.returncode == 0 and direct.stdout.strip() == f"wrote {out / 'profile.json'}"
    assert load_profile(out / "profile.json").blocks == saved.blocks
    one_line_error(run_massact("profile", report_dir, "--min-abs", "5"), "--min-abs")
    one_line_error(run_massact("profile", report_dir, "--out", tmp_path / "x"), "--out")
    one_line_error(run_massact("profile", model_dir, "--max-texts", "0"), "--max-texts")


def test_reprs_are_short(smol, smol_profile):
    report = massact.scan(smol, list(DEFAULT_TEXTS[:2]), verify=False)
    line = repr(report)
    assert "\n" not in line and len(line) < 300 and "SmolLM2-135M-Instruct" in line and "507 (born at block 11)" in line
    assert '<section id="summary"' in report._repr_html_() and "507" in report._repr_html_()
    assert "\n" not in repr(smol) and "30 blocks" in repr(smol) and len(repr(smol)) < 200
    lines = repr(smol_profile).splitlines()
    assert lines[0].startswith("Profile(SmolLM2-135M-Instruct: 17 of 30 blocks") and len(lines) == 2 + 17
