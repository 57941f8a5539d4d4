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
