"""heretic's abliteration (heretic-llm, ``pip install 'massact[steering]'``) with the massive dims that massact's profile
finds left out of the refusal direction, on a tiny Llama whose planted neuron writes dim 20 on the first token.
heretic projects each direction out of every attention and MLP output matrix, W -= r rᵀ W, so a direction that is 0
at a dim leaves that dim's row of every matrix as it was, the super weight with it. The plain direction must move the
super weight, so that the check can fail."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from heretic.model import AbliterationParameters, Model

import massact
from conftest import D_MODEL, N_LAYERS, PLANTED, plant_mlp, tiny_model
from massact.texts import DEFAULT_TEXTS

LAYER, NEURON, DIM = PLANTED
GOOD = ["The river runs to the sea.", "We planted beans in April.", "The train left on time.", "Two foxes crossed the field."]
BAD = ["The committee agreed on nothing.", "He fixed the old bicycle.", "Lanterns hung along the street.", "The museum closed early."]


@torch.no_grad()
def refusal_directions(model, tokenizer) -> torch.Tensor:
    """heretic's refusal directions (its ``main.run``): per hidden state (the embeddings, then each block's output),
    the normalized difference of the mean residual at the last prompt token, [blocks + 1, d_model]."""
    def residuals(prompts: list[str]) -> torch.Tensor:
        states = [model(**tokenizer(p, return_tensors="pt"), output_hidden_states=True).hidden_states for p in prompts]
        return torch.stack([torch.stack([h[0, -1] for h in one]) for one in states])  # [prompt, hidden state, d_model]

    return F.normalize(residuals(BAD).mean(dim=0) - residuals(GOOD).mean(dim=0), p=2, dim=1)


def without_massive_dims(directions: torch.Tensor, profile) -> torch.Tensor:
    """The snippet of docs/profile.md: the profile's massive dims (of any block) set to 0 in every direction, which
    is normalized again."""
    dims = sorted({dim for block in profile.blocks for dim in block.dims})
    kept = directions.clone()
    kept[:, dims] = 0.0
    return F.normalize(kept, p=2, dim=1)


@torch.no_grad()
def abliterate(model, directions: torch.Tensor) -> Model:
    """heretic's ``Model.abliterate`` on an already loaded model (its loader reads a hub id, a chat template and the
    command line), each block along its own direction with weight 1."""
    heretic = Model.__new__(Model)
    heretic.model = model
    flat = AbliterationParameters(max_weight=1.0, max_weight_position=0.0, min_weight=1.0, min_weight_distance=float(N_LAYERS))
    heretic.abliterate(directions, None, {component: flat for component in heretic.get_abliterable_components()})
    return heretic


def planted(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    return model.eval()


def test_abliteration_leaves_the_massive_dims_alone(tokenizer):
    model = planted(tokenizer)
    profile = massact.profile(model, DEFAULT_TEXTS[:5], tokenizer=tokenizer)
    assert sorted({d for block in profile.blocks for d in block.dims}) == [DIM]
    directions = refusal_directions(model, tokenizer)
    protected = without_massive_dims(directions, profile)
    assert (protected[:, DIM] == 0).all() and directions[1:, DIM].abs().min() > 0

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    heretic = abliterate(model, protected)
    for layer in range(N_LAYERS):
        for component, matrices in heretic.get_layer_matrices(layer).items():
            name = {"attn.o_proj": f"model.layers.{layer}.self_attn.o_proj.weight",
                    "mlp.down_proj": f"model.layers.{layer}.mlp.down_proj.weight"}[component]
            (matrix,) = matrices
            assert torch.equal(matrix[DIM], before[name][DIM]), name  # the massive dim's row, exactly
            assert not torch.equal(matrix, before[name]), name  # the others abliterated
            # What abliteration is for: the block's direction no longer comes out of the matrix (rᵀ W = 0, to the
            # float32 rounding of a d_model-long dot product).
            assert (protected[layer + 1] @ matrix).abs().max() < 1e-5 * before[name].abs().max() * D_MODEL ** 0.5, name
    assert model.model.layers[LAYER].mlp.down_proj.weight[DIM, NEURON] == 100.0  # the super weight, as planted
    again = massact.profile(model, DEFAULT_TEXTS[:5], tokenizer=tokenizer)
    assert [b.dims for b in again.blocks] == [b.dims for b in profile.blocks]  # still massive, in the same blocks

    plain = planted(tokenizer)
    abliterate(plain, refusal_directions(plain, tokenizer))
    assert plain.model.layers[LAYER].mlp.down_proj.weight[DIM, NEURON] != 100.0  # the plain direction moves it
