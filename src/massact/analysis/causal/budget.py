"""Whether a scan verifies by default: the interventions' time estimated from the model's measured speed.

Every scored intervention runs the evaluation text's tokens from its birth block to the last block (the rows of each
born dim: the ablated top neurons, the super weight and its control, the super weights zeroed together; the zero and
mean replacements at each birth block), and the unmodified model runs them, the carriers and the sink texts through
every block once. At the model's seconds per token and block (measured on one evaluation batch in memory; from the
streamed corpus pass's compute, without its reads), that is the estimate; a scan verifies by default when it is at
most the corpus pass's own time, or under a floor that small models are below."""

from __future__ import annotations

LANES_PER_DIM = 7  # scored interventions per born dim: top neurons, super weight, its control, 4 more super weights
LANES_PER_BIRTH = 2  # the zero and the mean replacement at each birth block
FLOOR_SECONDS = 600.0  # verified by default below this estimate, whatever the corpus pass took


def verification_seconds(*, rate: float, n_layers: int, eval_tokens: int, births: list[int], other_tokens: int = 0) -> float:
    """The interventions' estimated seconds: ``births`` the birth block of each massive dim, ``eval_tokens`` the
    evaluation text's tokens, ``other_tokens`` what the unmodified model also carries (carriers, sink and dependence
    texts), at ``rate`` seconds per token and block of ``n_layers``."""
    token_blocks = (eval_tokens + other_tokens) * n_layers
    token_blocks += sum(LANES_PER_DIM * eval_tokens * (n_layers - birth) for birth in births)
    token_blocks += sum(LANES_PER_BIRTH * eval_tokens * (n_layers - birth) for birth in set(births))
    return rate * token_blocks


def verify_by_default(estimate: float, corpus_seconds: float) -> tuple[bool, str]:
    """Whether to verify, and the report's sentence saying why either way."""
    budget = max(corpus_seconds, FLOOR_SECONDS)
    if estimate <= budget:
        return True, (f"verified by default: the interventions were estimated at {estimate:.0f} s, within the "
                      f"{budget:.0f} s allowed (the corpus pass's {corpus_seconds:.0f} s, or at least {FLOOR_SECONDS:.0f} s)")
    return False, (f"not verified: the interventions were estimated at {estimate:.0f} s, more than the {budget:.0f} s allowed "
                   f"by default (the corpus pass's {corpus_seconds:.0f} s, or at least {FLOOR_SECONDS:.0f} s); pass --verify "
                   "to run them, or run massact verify on the report")
