"""massact track on a checkpoint series made from the default model: its birth block's writing neurons scaled step by
step, so the massive dim emerges at a known step. The expectation comes from plain forward passes (each block's
output by a hook: HF's hidden_states[-1] is after the final norm), not from massact."""

from __future__ import annotations

import json

import pytest
import torch

import massact
from massact.cli import main
from massact.settings import Criterion
from massact.texts import DEFAULT_TEXTS

FACTORS = (0.0, 1.0)  # the writing neurons' weights into the dim, at steps 1 and 2 (the model as shipped)


@torch.no_grad()
def block_outputs(lm) -> list[torch.Tensor]:
    """Per block, its output at every token of every default text: [tokens, d_model]."""
    layers = lm.adapter.blocks(lm.model)
    found: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: found[i].append((out[0] if isinstance(out, tuple) else out)[0]))
             for i, layer in enumerate(layers)]
    try:
        for text in DEFAULT_TEXTS:
            lm.model(input_ids=lm.tokenizer(text, return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in found]


def emergence(outputs: list[torch.Tensor], criterion: Criterion) -> tuple[int, int] | None:
    """(block, dim) of the largest massive entry in the first block that has one, or None."""
    for layer, out in enumerate(outputs):
        median = float(out.abs().flatten().median())
        if criterion.is_massive(float(out.abs().max()), median):
            return layer, int(out.abs().max(dim=0).values.argmax())
    return None


def state(outputs: list[torch.Tensor], dim: int, criterion: Criterion) -> tuple[float, bool]:
    """The dim's largest |a| over every block, and whether it is massive in some block."""
    values = [float(out[:, dim].abs().max()) for out in outputs]
    massive = any(criterion.is_massive(v, float(out.abs().flatten().median())) for v, out in zip(values, outputs))
    return max(values), massive


@torch.no_grad()
def writing_neurons(lm, layer: int, dim: int) -> list[int]:
    """The fewest neurons of block ``layer``'s MLP that write 90% of the dim's output where it is largest."""
    down = lm.model.model.layers[layer].mlp.down_proj
    seen = []
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    try:
        for text in DEFAULT_TEXTS:
            lm.model(input_ids=lm.tokenizer(text, return_tensors="pt").input_ids)
    finally:
        hook.remove()
    contributions = torch.cat(seen) * down.weight[dim]  # [tokens, d_mlp]
    row = contributions[contributions.sum(-1).abs().argmax()]
    order = (row * row.sum().sign()).argsort(descending=True)
    share = (row[order] * row.sum().sign()).cumsum(0) / row.sum().abs()
    return order[: int((share < 0.9).sum()) + 1].tolist()


@pytest.fixture(scope="module")
def default_series(tmp_path_factory):
    lm = massact.load(None, device="cpu", log=lambda message: None)
    criterion = Criterion()
    layer, dim = emergence(block_outputs(lm), criterion)
    neurons = writing_neurons(lm, layer, dim)
    weight = lm.model.model.layers[layer].mlp.down_proj.weight
    original = weight[dim, neurons].detach().clone()
    root = tmp_path_factory.mktemp("default-series")
    expected = []
    for step, factor in enumerate(FACTORS, 1):
        with torch.no_grad():
            weight[dim, neurons] = original * factor
        expected.append(state(block_outputs(lm), dim, criterion))
        lm.model.save_pretrained(root / f"checkpoint-{step}")
        lm.tokenizer.save_pretrained(root / f"checkpoint-{step}")
    return root, layer, dim, neurons, expected, original, weight.numel()


def test_track_names_the_emergence_step_and_the_value_at_each_checkpoint(default_series, tmp_path, capsys):
    root, layer, dim, neurons, expected, original, entries = default_series
    emerged = next(step for step, (_, massive) in enumerate(expected, 1) if massive)
    assert emerged > 1 and expected[-1][1]  # the series is a real test: not massive at first, massive at the end
    assert main(["track", str(root), "--out", str(tmp_path / "out"), "--format", "json,txt"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))
    track = next(d for d in data["dims"] if d["dim"] == dim)
    assert track["emerged_at"] == emerged
    assert f"dim {dim} becomes massive at step {emerged}" in printed
    for (value, massive), found, born in zip(expected, track["values"], track["born_at"]):
        assert (born is not None) == massive
        if massive:
            assert found == pytest.approx(value, rel=1e-3)
            assert born == layer
        elif found is not None:  # listed among a block's largest entries, though not massive
            assert found == pytest.approx(value, rel=1e-3)
    last = next(d for d in data["checkpoints"][-1]["dims"] if d["dim"] == dim)
    assert last["super_weight"]["col"] in neurons and last["neurons"][0] in neurons
    # Two checkpoints are a diff: the super weight went from 0 to its shipped value, and only the scaled entries moved.
    change = next(w for w in data["diff"]["weights"] if w["row"] == dim)
    column = neurons.index(change["col"])
    assert (change["before"], change["after"]) == (0.0, pytest.approx(float(original[column])))
    assert change["matrix_mean_change"] == pytest.approx(float(original.abs().sum()) / entries, rel=1e-4)
    assert dim in data["diff"]["appear"]


@pytest.fixture(scope="module")
def intermediate(tmp_path_factory):
    """The default model part way to its massive value: block 11's up_proj rows of its two writing neurons scaled by
    0.15. Dim 507 is then born at block 11 with a few thousand, and block 28's eraser, tuned for the full value,
    takes it through zero to a larger value of the other sign that is not massive there."""
    lm = massact.load(None, device="cpu", log=lambda message: None)
    with torch.no_grad():
        lm.model.model.layers[11].mlp.up_proj.weight[[1229, 1487]] *= 0.15
    outputs = block_outputs(lm)
    path = tmp_path_factory.mktemp("intermediate") / "checkpoint-150"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, outputs


def test_an_eraser_overshooting_through_zero_keeps_the_birth_writer(intermediate, tmp_path):
    path, outputs = intermediate
    # The setting as the hidden states have it: born positive at block 11, and larger, negative, after block 28.
    carrier = max(range(len(outputs[11])), key=lambda row: float(outputs[11][row, 507]))
    birth, erased = float(outputs[11][carrier, 507]), float(outputs[28][carrier, 507])
    assert birth > 1000 and erased < -birth  # the overshoot is larger than the birth value: the old sign came from it
    assert main(["track", str(path), "--out", str(tmp_path / "out"), "--format", "json", "--quiet"]) == 0
    data = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))
    dim = next(d for d in data["checkpoints"][0]["dims"] if d["dim"] == 507)
    assert (dim["born_at"], dim["writer"]) == (11, "mlp")
    assert dim["neurons"][0] == 1229
    weight = dim["super_weight"]
    assert (weight["matrix"], weight["row"], weight["col"]) == ("model.layers.11.mlp.down_proj.weight", 507, 1229)
    assert not any(p.startswith("growth") for p in dim["phases"]) and "erasure 28-28" in dim["phases"]
    report = json.loads((tmp_path / "out" / "step-00000150" / "report.json").read_text(encoding="utf-8"))
    line = next(x for x in report["mechanism"]["lifelines"] if x["dim"] == 507)
    assert line["sign"] == 1 and line["peak"] == pytest.approx(birth, rel=1e-3) and line["steps"][28]["phase"] == "erasure"
    assert line["steps"][28]["value"] == pytest.approx(erased, rel=1e-3)
    origins = {(o["layer"], o["role"]): o["writer"] for o in report["mechanism"]["origin"] if o["dim"] == 507}
    assert origins[11, "birth"] == "mlp" and origins[28, "erasure"] == "mlp"
    for (layer, role), who in origins.items():  # the lifeline and the origin agree at every event
        if role != "removal":
            assert line["steps"][layer]["writer"] == who, (layer, role)
    assert any("Block 28 overshoots" in c for c in report["conclusion"])
