"""What a report says of the model it scanned (``ModelInfo``), read from a loaded model (``model_info``).

Importing this module does not load torch: the report's schema reads ``ModelInfo`` without a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loading import LoadedModel


# A token mixer's kind (models.adapters.base.MIXERS) as the report names a block.
MIXER_KINDS = {"attention": "attention", "linear": "linear attention", "conv": "convolution", "ssm": "state-space scan"}


@dataclass(kw_only=True)
class ModelInfo:
    name: str
    architecture: str
    family: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    gated: bool
    dtype: str
    device: str
    source: str | None = None  # what was loaded: a hub id, a path, or None for the embedded default
    stream: str = "resid_out"  # the site massive activations are detected in (resid_sum for post-LN blocks)
    notes: str = ""  # what the family's blocks do differently (parallel, sandwich norms, post-LN)
    weights_sha256: str | None = None  # models.identity's digest of the weights scanned (in ``dtype``)
    # Per block, what it is where the blocks differ (a hybrid's mixers, sliding or full attention, blocks without
    # positions): e.g. "convolution", "attention (sliding)", "attention (full, no positions)"; empty where they do not.
    blocks: list[str] = field(default_factory=list)
    # Where no adapter is written for the model type: the equations its inferred adapter held on a padded probe batch
    # before anything was measured, each with its largest relative error (models.inference); empty for a hand-written
    # adapter. Reports written before this field lack it: read as empty.
    inferred: list[str] = field(default_factory=list)
    # Whether the scan read the weights block by block (``massact.scan_streamed``): the stages that run the model
    # again are then not in the report. Reports written before this field lack it: read as False.
    streamed: bool = False


def model_info(lm: LoadedModel) -> ModelInfo:
    """The model as a report describes it: its shape, family, dtype and device, detection stream, the weights'
    digest and each block's kind where they differ."""
    from .identity import weights_sha256

    config = lm.config
    n_layers = len(lm.adapter.blocks(lm.model))
    sparse = next((layer for layer in range(n_layers) if lm.at(layer).moe is not None), None)
    if sparse is not None:  # one expert's width
        moe = lm.at(sparse).moe
        down = lm.adapter.module(lm.model, sparse, moe.part(moe.experts.path)).down_proj
        d_mlp = down.shape[-2] if moe.experts.transposed else down.shape[-1]
    else:  # the first dense MLP's width (a block may have no MLP)
        dense = next(layer for layer in range(n_layers) if lm.at(layer).mlp is not None)
        d_mlp = lm.adapter.weight_out_in(lm.adapter.module(lm.model, dense, lm.at(dense).mlp_down)).shape[1]
    return ModelInfo(
        name=lm.name,
        architecture=type(lm.model).__name__,
        family=lm.adapter.family,
        n_layers=n_layers,
        d_model=config.hidden_size,
        d_mlp=d_mlp,
        n_heads=config.num_attention_heads,
        gated=lm.adapter.gated or (sparse is not None and lm.at(sparse).moe.experts.gated),
        dtype=str(lm.dtype).removeprefix("torch."),
        device=str(lm.device),
        source=lm.source,
        stream=lm.adapter.stream,
        notes=lm.adapter.notes,
        weights_sha256=weights_sha256(lm.model),
        blocks=block_kinds(lm),
        inferred=list(lm.inferred),
    )


def block_kinds(lm: LoadedModel) -> list[str]:
    """Per block, its mixer, its kind of attention (the config's layer types, where they vary), whether it sees
    positions, and whether it has an MLP ("MLP alone": a block without a token mixer); [] where every block is the
    same."""
    from .adapters.base import layer_types

    kinds = []
    for layer in range(len(lm.adapter.blocks(lm.model))):
        here = lm.at(layer)
        if here.mixer is None:
            kinds.append("MLP alone")
            continue
        detail = [layer_types(lm.config, layer).replace("_attention", "")] if here.mixer == "attention" else []
        detail += ([] if here.positions else ["no positions"]) + ([] if here.has_mlp else ["no MLP"])
        detail = [d for d in detail if d]
        kinds.append(MIXER_KINDS[here.mixer] + (f" ({', '.join(detail)})" if detail else ""))
    return kinds if len(set(kinds)) > 1 else []
