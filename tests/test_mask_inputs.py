"""What the masks take and what they refuse: a Hook opened twice, the attention mask in every call form, Profile.mask
on padding it has to infer and on shapes and layers it cannot use, damaged profile.json files, and the arguments of
Hook, Criterion and massact.profile. On a planted Llama whose spike (dim 20, from block 1) fires on <s> only."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import massact
from conftest import plant_mlp, tiny_model
from massact.errors import UsageError
from massact.masks import Criterion, Hook, live
from massact.report.schema import load_profile, write_profile
from massact.settings import ScanSettings

TEXTS = ["The library opens at nine in the morning.", "Summer is warm.", "A short one", "Rivers carry sand to the sea."]
LAYER = 1  # the planted neuron's block: <s> is massive at its output


@pytest.fixture(scope="module")
def lm(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, 37, 20)
    return massact.wrap(model, tokenizer)


@pytest.fixture(scope="module")
def planted_profile(lm):
    return massact.profile(lm, TEXTS)


@pytest.fixture(scope="module")
def pad_is_bos(lm, tokenizer):
    """A right-padded batch of two texts whose padding is the <s> id (a tokenizer whose pad token is its BOS): every
    pad is then as massive as the real <s>, unless the attention mask says it is padding."""
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True, padding_side="right")
    real = batch.attention_mask
    ids = batch.input_ids.masked_fill(real == 0, tokenizer.bos_token_id)
    return ids, real


def hooks_left(module: nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in ``module``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_a_hook_entered_twice_is_refused_and_leaves_no_hook(lm, pad_is_bos):
    ids, real = pad_is_bos
    assert hooks_left(lm.model) == 0
    hook = Hook(lm, layers=[LAYER])
    with pytest.raises(RuntimeError, match="already open"):
        with hook:
            with hook:
                pass
    assert hooks_left(lm.model) == 0
    with pytest.raises(KeyError):  # an error inside the block closes it too
        with hook:
            raise KeyError("inside")
    assert hooks_left(lm.model) == 0
    # Closed, the same Hook opens again and records.
    with hook, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=real, use_cache=False)
    assert hooks_left(lm.model) == 0 and hook.masks[LAYER].shape == ids.shape


CALLS = {
    "keyword, causal LM": lambda lm, ids, real: lm.model(input_ids=ids, attention_mask=real, use_cache=False),
    "positional, causal LM": lambda lm, ids, real: lm.model(ids, real, use_cache=False),
    "keyword, base model": lambda lm, ids, real: lm.model.model(input_ids=ids, attention_mask=real, use_cache=False),
    "positional, base model": lambda lm, ids, real: lm.model.model(ids, real, use_cache=False),
}


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_the_hook_reads_the_attention_mask_in_every_call_form(lm, pad_is_bos, call):
    ids, real = pad_is_bos
    pads = real == 0
    assert int(pads.sum()) > 0
    with Hook(lm, layers=[LAYER]) as hook, torch.no_grad():
        CALLS[call](lm, ids, real)
    flagged = hook.masks[LAYER]
    assert int(flagged[pads].sum()) == 0
    assert flagged[:, 0].all() and int(flagged.sum()) == 2  # each text's real <s>, and nothing else
    # A pass without a mask does not reuse the last pass's: every position is real, and the <s> pads are massive.
    with Hook(lm, layers=[LAYER]) as hook, torch.no_grad():
        CALLS[call](lm, ids, real)
        lm.model(ids, use_cache=False)
    assert int(hook.masks[LAYER][pads].sum()) == int(pads.sum())


def test_the_hook_uses_the_last_columns_of_a_cached_passs_mask(lm, tokenizer):
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids])
    real = torch.ones_like(ids)
    with Hook(lm, layers=[LAYER]) as hook, torch.no_grad():
        cache = lm.model(ids[:, :-2], attention_mask=real[:, :-2], use_cache=True).cache
        lm.model(ids[:, -2:], attention_mask=real, cache=cache, use_cache=True)
    assert hook.masks[LAYER].shape == (1, 2) and not hook.masks[LAYER].any()  # the two last tokens: no <s> among them


def test_profile_mask_infers_padding_from_the_pad_id(planted_profile, tokenizer):
    p = planted_profile
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    assert (p.pad_token_id, p.bos_token_id) == (pad, bos) and pad != bos
    assert [(r.kind, r.position) for r in p.blocks[LAYER].rules] == [("position", 0)]
    left = torch.tensor([[pad, pad, bos, 5, 6]])
    assert p.mask(left, LAYER).tolist() == [[False, False, True, False, False]]  # the first real token, not the pad
    batch = torch.tensor([[pad, pad, bos, 5, 6], [bos, 5, 6, pad, pad], [bos, 5, 6, 7, 8]])
    inferred = p.mask(batch, LAYER)
    assert torch.equal(inferred, p.mask(batch, LAYER, attention_mask=batch != pad))
    assert inferred.sum(1).tolist() == [1, 1, 1] and inferred[0, 2] and inferred[1, 0] and inferred[2, 0]
    assert p.mask([bos, 5, 6], LAYER).tolist() == [[True, False, False]]  # one sequence is one row
    assert not p.mask(torch.full((1, 4), pad), LAYER).any()  # all padding


def test_profile_mask_refuses_padding_it_cannot_infer(planted_profile, tokenizer):
    bos = tokenizer.bos_token_id
    # A pad that is also the BOS: the run of <s> in front holds the text's own <s>.
    pad_bos = dataclasses.replace(planted_profile, pad_token_id=bos)
    left = torch.tensor([[bos, bos, bos, 5, 6]])
    with pytest.raises(ValueError, match="BOS.*attention_mask"):
        pad_bos.mask(left, LAYER)
    assert pad_bos.mask(left, LAYER, attention_mask=[[0, 0, 1, 1, 1]]).tolist() == [[False, False, True, False, False]]
    assert pad_bos.mask([[5, 6, 7]], LAYER).tolist() == [[True, False, False]]  # no pad id at an edge: nothing to infer
    # A rule that flags the pad id itself: trailing pad ids could be padding or carriers.
    pad = tokenizer.pad_token_id
    block = planted_profile.blocks[LAYER]
    rule = dataclasses.replace(block.rules[0], kind="token", position=None, token_id=pad, token="<pad>")
    flags_pad = dataclasses.replace(planted_profile, blocks=[dataclasses.replace(block, rules=[rule])])
    with pytest.raises(ValueError, match="pad id.*attention_mask"):
        flags_pad.mask([[bos, 5, pad, pad]], LAYER)


@pytest.mark.parametrize("call, error, words", [
    (lambda p, ids: p.mask(ids, LAYER, ids.new_ones(2, 3)), ValueError, r"attention_mask must have the shape of input_ids, \[2, 5\]"),
    (lambda p, ids: p.mask(ids, LAYER, ids.new_full((2, 5), 2)), ValueError, "attention_mask must hold 1"),
    (lambda p, ids: p.mask(ids.unsqueeze(0), LAYER), ValueError, r"input_ids must be \[batch, positions\]"),
    (lambda p, ids: p.mask(ids.float(), LAYER), TypeError, "input_ids must hold integer token ids"),
    (lambda p, ids: p.mask(ids, 99), ValueError, "layer must be a block index from 0 to 3"),
    (lambda p, ids: p.mask(ids, -1), ValueError, "layer must be a block index from 0 to 3"),
    (lambda p, ids: p.mask(ids, 1.0), TypeError, "layer must be a block index"),
    (lambda p, ids: p.mask(ids, True), TypeError, "layer must be a block index"),
], ids=["mask of another shape", "mask of 2s", "3-D ids", "float ids", "layer 99", "layer -1", "layer 1.0", "layer True"])
def test_profile_mask_refuses_shapes_and_layers_it_cannot_use(planted_profile, call, error, words):
    assert len(planted_profile.blocks) == 4
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 2, 2]])
    with pytest.raises(error, match=words):
        call(planted_profile, ids)


def _block(data, layer):
    return next(b for b in data["blocks"] if b["layer"] == layer)


DAMAGE = {
    "blocks reversed": (lambda d: d["blocks"].reverse(), "field blocks must hold one block per layer, in order"),
    "block 0 missing": (lambda d: d["blocks"].pop(0), "field blocks must hold one block per layer, in order"),
    "layer 1 twice": (lambda d: d["blocks"][2].update(layer=1), "field blocks must hold one block per layer, in order"),
    "position null": (lambda d: _block(d, LAYER)["rules"][0].update(position=None), r"blocks\[1\]\.rules\[0\]\.position must hold"),
    "token rule without an id": (lambda d: _block(d, LAYER)["rules"][0].update(kind="token", position=None, token_id=None),
                                 r"blocks\[1\]\.rules\[0\]\.token_id must hold"),
    "position 10**30": (lambda d: _block(d, LAYER)["rules"][0].update(position=10**30),
                        r"blocks\[1\]\.rules\[0\]\.position must be an integer from 0 to 2147483647"),
    "position 1e30": (lambda d: _block(d, LAYER)["rules"][0].update(position=1e30),
                      r"blocks\[1\]\.rules\[0\]\.position must be an integer"),
    "massive_tokens > tokens": (lambda d: _block(d, LAYER).update(massive_tokens=_block(d, LAYER)["tokens"] + 1),
                                r"blocks\[1\]\.massive_tokens must hold a count of at most tokens"),
    "carriers > predicted": (lambda d: _block(d, LAYER)["rules"][0].update(carriers=_block(d, LAYER)["rules"][0]["predicted"] + 1),
                             r"blocks\[1\]\.rules\[0\]\.carriers must hold"),
    "pad id -1": (lambda d: d.update(pad_token_id=-1), "field pad_token_id must be an integer from 0"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_profile_json_is_one_usage_error(planted_profile, tmp_path, damage):
    edit, words = DAMAGE[damage]
    data = json.loads(write_profile(planted_profile))
    assert [b["layer"] for b in data["blocks"]] == [0, 1, 2, 3] and _block(data, LAYER)["rules"][0]["position"] == 0
    edit(data)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError, match=words) as refused:
        load_profile(path)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{path}: not a massact profile")


def test_a_sound_profile_json_reads_back_and_one_without_the_bos_id_is_one_line(planted_profile, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(write_profile(planted_profile), encoding="utf-8")
    assert write_profile(load_profile(path)) == write_profile(planted_profile)  # text, since nan != nan
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["bos_token_id"]  # every field is written, so a file without one is not a profile this massact wrote
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError, match="not a massact profile \\(no field bos_token_id\\)"):
        load_profile(path)


@pytest.mark.parametrize("layers, error, words", [
    ("12", TypeError, "layers must be a list of block indices"),
    (1, TypeError, "layers must be a list of block indices"),
    ([1.7], TypeError, "layers must hold integer block indices, not 1.7"),
    ([True], TypeError, "layers must hold integer block indices, not True"),
    ([4], ValueError, "layers must be block indices from 0 to 3"),
    ([], ValueError, "layers must be block indices from 0 to 3"),
], ids=["a string", "an int", "a float", "a bool", "past the last block", "none"])
def test_the_hook_refuses_layers_that_are_not_block_indices(lm, layers, error, words):
    with pytest.raises(error, match=words):
        Hook(lm, layers=layers)
    assert Hook(lm, layers=[np.int64(2), 1, 2]).layers == [2, 1]  # numpy integers are integers; a repeat is one block


@pytest.mark.parametrize("field", ["min_abs", "min_ratio"])
@pytest.mark.parametrize("value", [-5.0, math.nan, math.inf])
def test_a_criterion_refuses_negative_nan_or_infinite_bounds(field, value):
    with pytest.raises(ValueError, match=f"Criterion {field} must be a finite number >= 0"):
        Criterion(**{field: value})


def test_a_criterion_of_zero_and_the_scans_own_still_work(lm, pad_is_bos):
    ids, real = pad_is_bos
    assert ScanSettings().criterion == Criterion(min_abs=100.0, min_ratio=1000.0)
    with pytest.raises(TypeError, match="Criterion min_abs must be a number"):
        Criterion(min_abs="100")
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=real, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]
    everything = live(hidden, Criterion(min_abs=0.0, min_ratio=0.0), real)  # bounds of 0 flag every real token
    assert torch.equal(everything, real.bool())
    with pytest.raises(TypeError, match="criterion must be a massact.masks.Criterion"):
        Hook(lm, criterion={"min_abs": 5})


def test_hook_and_profile_name_an_argument_of_the_wrong_kind(lm):
    with pytest.raises(TypeError, match="model must be a LoadedModel .* or a transformers model massact can map, not Linear"):
        Hook(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"report must be a Report \(e.g. massact.report.schema.load_report\(folder\)\), not str"):
        massact.profile(lm, report="dir")
