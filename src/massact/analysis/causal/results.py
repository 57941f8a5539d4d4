"""What the causal stage finds: interventions and their verdicts, input dependence, output effects, the iterative super weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..function.results import AttentionSinks
from ..mechanism.results import ExpertPruning, SuperWeight


@dataclass(kw_only=True)
class Intervention:
    """One intervention's effect: the massive value at its birth block and at the last block it persisted in,
    and the perplexity of the evaluation text (ratio to the unmodified model)."""

    name: str
    target: str
    dim: int
    layer: int
    value_birth: float
    value_last: float
    still_massive: bool
    perplexity: float | None
    perplexity_ratio: float | None
    confirms: bool | None



@dataclass(kw_only=True)
class InputDependence:
    """The massive dim over many inputs at its birth block: its first-token value, and which tokens carry it."""

    dim: int
    layer: int
    inputs: int
    first_token_mean: float
    first_token_std: float
    first_token_massive: int
    carriers: list[list]  # [token, count] of positions where the dim is massive, most frequent first
    other_positions: int



@dataclass(kw_only=True)
class TokenShift:
    """A token's probability averaged over the evaluation positions, unmodified (``before``) and under an intervention."""

    token: str
    id: int
    before: float
    after: float



@dataclass(kw_only=True)
class OutputEffect:
    """What an intervention changes in the model's predictions over the evaluation positions (next tokens, or the
    masked tokens of an encoder): the mean KL(unmodified || intervened), the perplexity (exp of the masked-LM loss
    for an encoder) as a cross-check, the mean probability mass on stopwords and on punctuation before and after,
    and the tokens whose mean probability rises and falls most."""

    name: str
    target: str
    positions: int
    kl: float
    perplexity: float
    stopword_before: float
    stopword_after: float
    punctuation_before: float
    punctuation_after: float
    rises: list[TokenShift]
    falls: list[TokenShift]



@dataclass(kw_only=True)
class EmbeddingChange:
    """What an intervention does to a headless encoder's embeddings of the evaluation sentences (see
    ``massact.analysis.evaluation.embeddings``): the mean cosine of the mean-pooled and [CLS] final states to the
    unmodified model's, the Spearman correlation of the pairwise similarities, and the score 1 + (1 - mean_cosine)."""

    name: str
    target: str
    mean_cosine: float
    cls_cosine: float
    spearman: float
    perplexity: float


@dataclass(kw_only=True)
class Verification:
    """``metric``: "perplexity", or for an encoder "masked-LM" (the perplexity fields then hold exp of the masked-LM
    loss over a fixed, seeded 15% of the evaluation tokens; ``eval_tokens`` counts the masked ones), or for a headless
    encoder (no masked-LM head to score) "embeddings" (they hold 1 + (1 - the cosine of the sentence embeddings to the
    unmodified model's); ``eval_tokens`` counts the sentences' tokens; ``embedding_changes`` has every measure)."""

    baseline_perplexity: float
    eval_tokens: int
    eval_source: str
    interventions: list[Intervention]
    input_dependence: list[InputDependence]
    claims: list[str]
    metric: str = "perplexity"
    masked_lm_loss: float | None = None
    output_effects: list[OutputEffect] = field(default_factory=list)
    embedding_changes: list[EmbeddingChange] = field(default_factory=list)



@dataclass(kw_only=True)
class SuperWeightStep:
    """One step of Yu et al.'s iterative search for a dim's super weights: with every earlier step's weight still
    zeroed, the top contributor of what is left at the birth block (its ``neuron``, at the main carrier) gives the next
    super weight; it is zeroed too and the dim is measured again. ``value_birth`` / ``value_peak``: the massive value
    left at the birth and peak blocks; ``still_massive`` at either; the perplexity of the evaluation text with every
    weight so far zeroed. ``weight.rank`` is its rank by |w| in the unmodified matrix."""

    dim: int
    layer: int
    step: int
    neuron: int
    weight: SuperWeight
    value_birth: float
    value_peak: float
    still_massive: bool
    perplexity: float | None
    perplexity_ratio: float | None


@dataclass(kw_only=True, slots=True)
class Causal:
    """What intervening on the model shows (with ``--verify``; empty without): the interventions on each massive dim,
    the attention sinks on the massive tokens (measured on each text's first token where nothing is massive), the
    super weights zeroed one after another, and a mixture's super experts pruned against a random control."""

    verification: Verification | None = None
    attention: AttentionSinks | None = None
    super_weights: list[SuperWeightStep] = field(default_factory=list)
    expert_pruning: list[ExpertPruning] = field(default_factory=list)
    default: str | None = None  # why the scan verified, or did not, by default (None: --verify or --no-verify given)
