"""A neuron's pre-activation split exactly into what wrote the stream it reads: the embedding, every earlier block's
attention and MLP output (and per-layer input, where one writes) as it landed, and (in sequential blocks) this block's
attention. A block's output scale (Gemma-4's layer scalar) multiplies every source that crossed that block's output.

Given each norm's per-position normalisation factor (1/rms, or 1/std), a norm is linear in its input, so the
pre-activation w . norm(x) + b is a sum over the sources that add up to x. The walk goes back from the neuron's input
row through the norms between it and each source: the MLP's input norm in pre-LN blocks, and in post-LN blocks every
LayerNorm on the way (each source's contribution is then multiplied by the factors of all the norms it crossed).
Each norm's bias and the projection's bias give constant terms. The sum is checked against the model's own value.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ...capture.hooks import forward_until, tap, tap_module_input
from ...capture.probe import ATTN_Z
from ...capture.routing import MoeBlock, expert_input_row
from ...models.adapters.base import bias_of
from ...models.loading import LoadedModel
from ..mechanism.norms import centers, gain_and_bias, scale

NormKey = tuple[int, str]  # (block, module path) of a norm whose per-position factor multiplies a term
MIXER_NAMES = {"attention": "attention", "linear": "linear attention", "conv": "convolution", "ssm": "state-space scan"}  # a source's name


@dataclass
class Target:
    """A pre-activation to split: ``site`` (mlp_gate or mlp_up) of ``neuron`` in block ``layer``; in a mixture of
    experts, of that neuron in ``expert`` (read from the fused expert weights, as the expert reads the block's input),
    or with ``shared`` in the shared expert (read from its projection's rows)."""

    layer: int
    neuron: int
    site: str
    expert: int | None = None
    shared: bool = False

    @property
    def computed(self) -> bool:
        """Whether its values are computed from the block's input (an expert's neuron), not read at a site."""
        return self.expert is not None or self.shared

    @property
    def key(self) -> tuple:
        """Where its values are kept: the site's (a module computes them), or the expert's (computed from the input)."""
        if not self.computed:
            return (self.layer, self.site)
        return (self.layer, self.site, "shared" if self.shared else self.expert, self.neuron)


@dataclass
class Term:
    """One source seen from the target: contribution[t] = prod of the factors of ``norms`` at t x (reader . source[t]).
    ``site`` is the site that holds the source (attn_out, mlp_out; embed and pos_embed for the embedding's parts)."""

    label: str
    layer: int | None
    site: str
    reader: torch.Tensor  # [d_model] float64
    norms: tuple[NormKey, ...]


@dataclass
class Split:
    """A target's pre-activation at every position of the text, and each source's part of it ([positions] each)."""

    target: Target
    value: torch.Tensor
    parts: dict[str, torch.Tensor]
    terms: dict[str, Term]
    factors: dict[str, torch.Tensor]  # per source: the product of the norms' factors it crossed, per position
    scale: torch.Tensor  # the input norm's factor per position (ones where the MLP reads its stream unnormed)
    error: float  # largest relative gap of the parts' sum to the model's value, over positions


class Walk:
    """Goes back from a reader vector through the stream of a block, collecting terms and constant parts."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._gains: dict[NormKey, tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def norm(self, key: NormKey) -> nn.Module:
        return self.lm.adapter.module(self.lm.model, *key)

    def _gain(self, key: NormKey) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if key not in self._gains:
            module = self.norm(key)
            gain, bias = gain_and_bias(module, self.lm.config.hidden_size)
            self._gains[key] = (gain, bias, centers(module))
        return self._gains[key]

    def through(self, key: NormKey, reader: torch.Tensor, norms: tuple, constants: list) -> tuple[torch.Tensor, tuple]:
        """Carry ``reader`` back through a norm: r . (s g C(x) + beta) = s (C(g r)) . x + r . beta (C: centering)."""
        gain, bias, centering = self._gain(key)
        constants.append((norms, float(reader @ bias)))
        reader = gain * reader
        return (reader - reader.mean() if centering else reader), norms + (key,)

    def terms(self, layer: int, row: torch.Tensor, bias: float,
              expert: bool = False) -> tuple[list[Term], list[tuple[tuple, float]], NormKey | None]:
        """Every source feeding block ``layer``'s MLP input (its routed experts' where ``expert``) along ``row``, the
        constant parts (norms the constant crossed, value), and the MLP's own input norm (None in post-LN blocks;
        beside a dense MLP, the experts have their own)."""
        adapter = self.lm.adapter
        reader, norms, constants = row, (), [((), bias)]
        beside = self.lm.at(layer).beside
        found = (beside.norm,) if expert and beside is not None else adapter.mlp_norm_module(self.lm.model, layer)
        input_norm = (layer, found[0]) if found else None
        if input_norm:
            reader, norms = self.through(input_norm, reader, norms, constants)
        terms: list[Term] = []

        def source(block: int, site: str) -> None:
            here = self.lm.at(block)
            if site not in here.sites:  # a block of one sublayer writes the stream once
                return
            name = {"attn_out": MIXER_NAMES[here.mixer] if here.mixer else "", "mlp_out": "MLP", "ple_out": "per-layer input"}[site]
            terms.append(Term(f"block {block} {name}", block, site, reader, norms))

        if adapter.post_ln:  # the MLP reads resid_mid = LN1(resid_in + attn); resid_in = LN2(resid_sum of the block before)
            first, last = adapter.sites["attn_sum"][0], adapter.sites["resid_sum"][0]
            reader, norms = self.through((layer, first), reader, norms, constants)
            source(layer, "attn_out")
            for block in range(layer - 1, -1, -1):
                reader, norms = self.through((block, last), reader, norms, constants)
                source(block, "mlp_out")
                reader, norms = self.through((block, first), reader, norms, constants)
                source(block, "attn_out")
        else:
            if not adapter.parallel:  # sequential: the MLP also reads this block's attention
                source(layer, "attn_out")
            for block in range(layer - 1, -1, -1):
                # The block's output scale multiplies everything that reached its output, its own branches included.
                reader = reader * adapter.scale_of(self.lm.model, block)
                for site in reversed(adapter.writers(self.lm.config, block)):
                    source(block, site)
        terms.append(Term("embedding", None, "embed", reader, norms))
        return terms, constants, input_norm


def input_row(lm: LoadedModel, target: Target) -> tuple[torch.Tensor, float]:
    """The target neuron's row of the projection that makes its pre-activation (float64 on CPU) and its bias (0
    without): a dense MLP's projection, or the expert's rows of the fused expert weights."""
    if target.expert is not None:
        return expert_input_row(MoeBlock.at(lm, target.layer), target.expert, target.neuron, target.site)
    if target.shared:
        moe = MoeBlock.at(lm, target.layer)
        parts = moe.spec.shared
        module = moe.shared.get_submodule(parts.gate if target.site == "mlp_gate" and not parts.fused else parts.up)
        # A fused gate-and-up projection holds the gate's rows first, then up's.
        row = target.neuron + (moe.shared.get_submodule(parts.down).in_features
                               if parts.fused and target.site == "mlp_up" else 0)
        bias = bias_of(module)
        return (lm.adapter.weight_out_in(module)[row].detach().double().cpu(),
                float(bias[row]) if bias is not None else 0.0)
    weight, bias = lm.adapter.input_rows(lm.model, target.layer, target.site)
    return weight[target.neuron].detach().double().cpu(), float(bias[target.neuron]) if bias is not None else 0.0


def embedding_parts(lm: LoadedModel, input_ids: torch.Tensor, embedded: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """{site: (label, [positions, d] float64)}: the block-0 input as the token embedding and, where the model adds an
    absolute position embedding, the rest. Encoders (embedding LayerNorm) and projected embeddings stay whole."""
    tokens = lm.model.get_input_embeddings()(input_ids.to(lm.device))[0].detach().double().cpu()
    tokens = tokens * lm.adapter.embedding_factor(lm.config)  # as the base model scales them before block 0
    if lm.adapter.encoder or tokens.shape != embedded.shape:
        return {"embed": ("embedding", embedded)}
    rest = embedded - tokens
    if rest.abs().max() <= 1e-6 * embedded.abs().max():
        return {"embed": ("token embedding", embedded)}
    return {"embed": ("token embedding", tokens), "pos_embed": ("position embedding", rest)}


def _site_of(term: Term) -> tuple[int, str]:
    """The (block, site) a term's source is read at: the embedding is block 0's input."""
    return (0, "resid_in") if term.site == "embed" else (term.layer, term.site)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[positions, width] of a one-text batch, whether a module sees [1, positions, width] or flat rows (an adapter's
    ``flat_rows``)."""
    return tensor.detach().reshape(-1, tensor.shape[-1])


@dataclass
class AtPosition:
    """What the next step of a chain needs at the massive position, for every block: the MLP's activations, the
    heads' outputs (``attn_z``), and the raw branch outputs behind sandwich norms (to get those norms' factors)."""

    vectors: dict[tuple[int, str], torch.Tensor]


@torch.no_grad()
def split(lm: LoadedModel, input_ids: torch.Tensor, targets: list[Target], position: int) -> tuple[list[Split], AtPosition]:
    """Split each target's pre-activation over the text's positions, in one forward pass; hooks reduce every source
    to its dot products with the readers that want it (no stream is kept whole), and keep the massive position's
    MLP activations and head outputs for the next step of a chain."""
    walk = Walk(lm)
    plan = plan_reads(lm, walk, targets)
    seen = record(lm, walk, plan, input_ids, targets, position)
    pieces = embedding_parts(lm, input_ids, seen.embedded)
    splits = [assemble(target, terms, constants, input_norm, plan, seen, pieces, input_ids.shape[1])
              for target, terms, constants, input_norm in plan.planned]
    return splits, AtPosition(seen.at)


@dataclass
class ReadPlan:
    """What one forward pass must read: each target's terms and constants (``planned``), the terms by the site whose
    output they read, each term's column there (``column``, by id), the readers stacked per site ([d, n] float64),
    and every norm whose per-position factor some term needs."""

    planned: list[tuple[Target, list[Term], list, NormKey | None]]
    column: dict[int, tuple[tuple[int, str], int]]
    readers: dict[tuple[int, str], torch.Tensor]
    norm_keys: set[NormKey]


def plan_reads(lm: LoadedModel, walk: Walk, targets: list[Target]) -> ReadPlan:
    planned = [(target, *walk.terms(target.layer, *input_row(lm, target), expert=target.expert is not None)) for target in targets]
    wanted: dict[tuple[int, str], list[Term]] = {}
    column: dict[int, tuple[tuple[int, str], int]] = {}
    norm_keys: set[NormKey] = set()
    for _, terms, constants, _ in planned:
        for term in terms:
            key = _site_of(term)
            wanted.setdefault(key, []).append(term)
            column[id(term)] = (key, len(wanted[key]) - 1)
            norm_keys.update(term.norms)
        for norms, _ in constants:
            norm_keys.update(norms)
    readers = {key: torch.stack([t.reader for t in terms], dim=1) for key, terms in wanted.items()}
    return ReadPlan(planned=planned, column=column, readers=readers, norm_keys=norm_keys)


@dataclass
class Recorded:
    """What the forward pass kept: each read site's dot products with its readers [n, k], each norm's per-position
    factor, the gate/up values [n, d_mlp], the massive position's activations and head outputs (``at``), and the
    embedding output [n, d]."""

    dots: dict[tuple[int, str], torch.Tensor]
    scales: dict[NormKey, torch.Tensor]
    values: dict[tuple[int, str], torch.Tensor]
    at: dict[tuple[int, str], torch.Tensor]
    embedded: torch.Tensor | None = None


def record(lm: LoadedModel, walk: Walk, plan: ReadPlan, input_ids: torch.Tensor, targets: list[Target],
           position: int) -> Recorded:
    """One forward pass whose hooks reduce every read site to its dot products (no stream kept whole)."""
    seen = Recorded(dots={}, scales={}, values={}, at={})
    n_layers = len(lm.adapter.blocks(lm.model))
    last = max(t.layer for t in targets)

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        hidden = hidden[0].detach()
        if (layer, site) in plan.readers:
            seen.dots[layer, site] = hidden.double() @ plan.readers[layer, site].to(hidden.device)
        if site == "resid_in" and layer == 0:
            seen.embedded = hidden.double().cpu()
        if site in ("mlp_gate", "mlp_up"):
            seen.values[layer, site] = hidden.double()
        if site == lm.at(layer).expert_site:  # an expert's neurons read the block's input: their values are computed from it
            for target in (t for t in targets if t.layer == layer and t.computed):
                row, bias = input_row(lm, target)
                seen.values[target.key] = (hidden.double() @ row.to(hidden.device) + bias).unsqueeze(1)
        if site in ("mlp_act", "attn_raw", "mlp_raw"):
            seen.at[layer, site] = hidden[position].double().cpu()

    sites = set(plan.readers) | {(t.layer, lm.at(t.layer).expert_site) if t.computed else (t.layer, t.site) for t in targets}
    sites |= {(0, "resid_in")}
    sites |= {(layer, site) for layer in range(min(last + 1, n_layers)) for site in ("mlp_act", "attn_raw", "mlp_raw")
              if site in lm.at(layer).sites}
    with ExitStack() as stack:
        stack.enter_context(tap(lm.model, lm.adapter, sorted(sites), keep))
        for key in plan.norm_keys:
            stack.enter_context(tap_module_input(walk.norm(key),
                                                 lambda x, key=key: seen.scales.__setitem__(key, scale(walk.norm(key), _rows(x)))))
        for layer in (layer for layer in range(last + 1) if lm.at(layer).attn_proj is not None):
            o_proj = lm.adapter.module(lm.model, layer, lm.at(layer).attn_proj)
            stack.enter_context(tap_module_input(o_proj,
                                                 lambda z, layer=layer: seen.at.__setitem__((layer, ATTN_Z),
                                                                                            _rows(z)[position].double().cpu())))
        forward_until(lm.model, lm.adapter, min(last, n_layers - 1), input_ids=input_ids.to(lm.device), use_cache=False)
    return seen


def assemble(target: Target, terms: list[Term], constants: list, input_norm: NormKey | None, plan: ReadPlan,
             seen: Recorded, pieces: dict, n_positions: int) -> Split:
    """One target's split: each term's dot products times its norms' factors, the embedding split into its pieces,
    the biases as one constant, and the relative error of their sum against the value the model computed."""

    def factor(norms: tuple) -> torch.Tensor:
        out = torch.ones(n_positions, dtype=torch.float64)
        for key in norms:
            out = out * seen.scales[key].cpu()
        return out

    parts: dict[str, torch.Tensor] = {}
    named: dict[str, Term] = {}
    factors: dict[str, torch.Tensor] = {}
    for term in terms:
        key, index = plan.column[id(term)]
        if term.site == "embed":
            for site, (label, tensor) in pieces.items():
                factors[label] = factor(term.norms)
                parts[label] = factors[label] * (tensor @ term.reader)
                named[label] = Term(label, None, site, term.reader, term.norms)
        else:
            factors[term.label] = factor(term.norms)
            parts[term.label] = factors[term.label] * seen.dots[key][:, index].cpu()
            named[term.label] = term
    constant = sum(factor(norms) * value for norms, value in constants)
    if bool((constant != 0).any()):  # the projection's bias and the norms' biases, as far as they reach the neuron
        parts["biases"] = constant
    value = seen.values[target.key][:, 0 if target.computed else target.neuron].cpu()
    error = float((sum(parts.values()) - value).abs().max() / max(float(value.abs().max()), 1e-12))
    input_scale = factor((input_norm,)) if input_norm else torch.ones(n_positions, dtype=torch.float64)
    return Split(target, value, parts, named, factors, input_scale, error)


def _others(values: torch.Tensor, position: int) -> torch.Tensor:
    return torch.cat([values[:position], values[position + 1 :]])


def mean_max(values: torch.Tensor, position: int) -> tuple[float, float]:
    """Mean and largest value over the positions other than ``position`` (nan for a one-token text)."""
    rest = _others(values, position)
    return (float(rest.mean()), float(rest.max())) if len(rest) else (float("nan"), float("nan"))


def ranked_sources(piece: Split, position: int) -> list[str]:
    """Sources by how much they explain why the pre-activation differs here from the other positions (toward the
    direction it differs in), most first; with no other position, by their part toward its sign."""
    mean, _ = mean_max(piece.value, position)
    direction = float(piece.value[position] - mean) if mean == mean else float(piece.value[position])
    direction = 1.0 if direction >= 0 else -1.0

    def pull(label: str) -> float:
        here, (others, _) = float(piece.parts[label][position]), mean_max(piece.parts[label], position)
        return (here - others if others == others else here) * direction

    return sorted((label for label in piece.parts if label in piece.terms), key=pull, reverse=True)


@dataclass
class Unit:
    """A neuron or a head of a source block, and its part of a term at the massive position."""

    kind: str
    index: int
    contribution: float


def units(lm: LoadedModel, term: Term, factor: float, at: AtPosition) -> tuple[list[Unit], float]:
    """A term's part at the massive position split over its block's neurons (an MLP source) or heads (attention):
    the units, largest |contribution| first, and the sum of every unit and bias (equal to the term's part, or where
    the branch is a sum of mixers to the attention's part of it). A source behind a sandwich norm is carried back
    through that norm first, one times a branch scale by that scale.
    Mixture-of-experts MLPs, convolutions and linear attentions (no heads that sum like softmax heads) and an
    attention whose output projection does not read the heads side by side are not split: []."""
    model = lm.model
    if term.site not in ("mlp_out", "attn_out"):
        return [], float("nan")
    adapter = lm.at(term.layer)
    if (term.site == "mlp_out" and adapter.moe) or (term.site == "attn_out" and (adapter.mixer != "attention" or not adapter.heads_at_out)):
        return [], float("nan")
    reader, constant = term.reader, 0.0
    if term.site in adapter.branch_norms:  # what landed is the branch norm of the raw output
        norm = adapter.module(model, term.layer, adapter.branch_norms[term.site])
        gain, beta = gain_and_bias(norm, lm.config.hidden_size)
        constant += factor * float(reader @ beta)
        factor = factor * float(scale(norm, at.vectors[term.layer, adapter.raw(term.site)]))
        reader = gain * reader
        reader = reader - reader.mean() if centers(norm) else reader
    factor = factor * adapter.landing(lm.config, term.site)  # what landed is the raw output times a branch scale
    if term.site == "attn_out":  # where the branch is a sum of mixers, the heads write the attention's part of it
        factor = factor * adapter.part_factor(lm.config, term.site, adapter.attention)
    path = adapter.mlp_down if term.site == "mlp_out" else adapter.attn_proj
    projection = adapter.module(model, term.layer, path)
    weight = adapter.weight_out_in(projection).detach().double().cpu()  # [d_model, inputs]
    through = factor * (weight.T @ reader)  # what one unit of each input adds to the term
    if term.site == "mlp_out":
        kind, per_unit = "neuron", through * at.vectors[term.layer, "mlp_act"]
    else:  # heads: the projection's input is every head's output, concatenated
        kind = "head"
        per_unit = (through * at.vectors[term.layer, ATTN_Z]).view(lm.config.num_attention_heads, -1).sum(dim=1)
    bias = bias_of(projection)
    if bias is not None:
        constant += factor * float(bias.detach().double().cpu() @ reader)
    order = per_unit.abs().argsort(descending=True).tolist()
    return [Unit(kind, i, float(per_unit[i])) for i in order], float(per_unit.sum()) + constant
