"""What the trigger stage finds: each writing neuron's pre-activation split into sources, the chain back to the token,
the carriers, the patching."""

from __future__ import annotations

from dataclasses import dataclass, field

# Token or position: which of the two probes keeps the dim massive (the position alone, the token alone, either, neither).
VERDICTS = ("position", "token", "both", "context")


@dataclass(kw_only=True)
class SourcePart:
    """One upstream source's part of a pre-activation: at the massive position (``here``) and at the text's other
    positions (their mean and their largest value). ``difference`` = here - others_mean: how much of why the neuron
    is different here this source explains."""

    source: str
    layer: int | None
    site: str
    here: float
    others_mean: float
    others_max: float
    difference: float



@dataclass(kw_only=True)
class PreActivationSplit:
    """A neuron's pre-activation (``site``: mlp_gate or mlp_up) at the massive position split into its sources, which
    sum to ``value`` exactly given ``scale``, the MLP input norm's factor (1/rms or 1/std) at the position (``scale_others``:
    its mean elsewhere). ``error``: largest gap of the sum to the model's value, relative to its largest |value|.
    ``sources``: largest |difference| first."""

    site: str
    value: float
    others_mean: float
    others_max: float
    scale: float
    scale_others: float
    sources: list[SourcePart]
    error: float



@dataclass(kw_only=True)
class NeuronTrigger:
    """Why a top neuron of a writing block fires at the massive position: each of its pre-activations split.
    ``expert``: the expert the neuron is in, where the block is a mixture of experts (its pre-activations are split as
    they read the block's input; Llama-4's router weight then scales them)."""

    layer: int
    neuron: int
    role: str
    splits: list[PreActivationSplit]
    expert: int | None = None
    shared: bool = False  # the neuron is the shared expert's


@dataclass(kw_only=True)
class RouterTrigger:
    """Why the router sends the massive token to the writing expert: the expert's router logit at the massive token
    (``logit``) against the other tokens of the text (mean, largest), its rank among every expert's logit there (1 =
    the highest), and the share of the other tokens the router also sends to it. A logit far above the others says
    the choice is the token's (or its position's) own, as the trigger's carriers then tell."""

    layer: int
    expert: int
    logit: float
    others_mean: float
    others_max: float
    rank: int
    others_routed: float



@dataclass(kw_only=True)
class ChainLink:
    """One step back from the massive value: a neuron (its pre-activation ``site`` at the position, ``value``, and its
    mean over the other positions), a head (``attends``: [position, token, probability] of its strongest keys), or the
    embedding that ends the chain. ``source`` is the source it belongs to and ``feeds`` its part of the next link's
    pre-activation at the position (``source_here`` / ``source_others``: the whole source's part here and elsewhere);
    ``expert``: the expert a neuron is in, in a mixture of experts."""

    depth: int
    kind: str
    layer: int | None
    index: int | None
    site: str | None
    value: float | None
    value_others: float | None
    source: str | None
    feeds: float | None
    source_here: float | None
    source_others: float | None
    attends: list[list] | None = None
    expert: int | None = None  # the neuron's expert, in a mixture of experts
    shared: bool = False  # the neuron is the shared expert's



@dataclass(kw_only=True)
class Carriers:
    """Token or position? Where the scan saw the dim massive (first positions: texts and their distinct tokens; other
    positions: their tokens), and two probes on the carrier's text at the peak block: another token put at the carrier's
    position (``swapped``: the value there) and the carrier token moved one position later (``moved``: its value there)."""

    texts: int
    first_position_texts: int
    first_tokens: list[list]
    other_positions: list[list]
    probe_layer: int
    swapped_token: str
    swapped: float
    swapped_massive: bool
    moved: float
    moved_massive: bool
    verdict: str  # one of VERDICTS



@dataclass(kw_only=True)
class Patch:
    """A top source of the writing neuron's pre-activation replaced at the massive position (by its mean over the
    text's other positions, or by zero), the rest of the model left to run. ``direct``: the change of the pre-activation
    through that source alone, with every norm factor held (its direct contribution); ``total``: the change the model
    really shows, through every later block too. The massive value at the birth and peak blocks under the patch, and
    whether it is still massive at either."""

    source: str
    layer: int | None
    site: str
    replacement: str
    direct: float
    total: float
    pre_activation: float
    value_birth: float
    value_peak: float
    still_massive: bool



@dataclass(kw_only=True)
class Trigger:
    """Why a massive dim is written at its carrier and nowhere else: the writing neurons' pre-activations split into
    sources, the chain from the token to the value (depth-limited), and the token-or-position evidence."""

    dim: int
    text: int
    position: int
    token: str
    neurons: list[NeuronTrigger]
    chain: list[ChainLink]
    carriers: Carriers | None
    warnings: list[str] = field(default_factory=list)
    patching: list[Patch] = field(default_factory=list)
    router: RouterTrigger | None = None
