"""An adapter inferred from a model's own modules, for a model type no adapter is written for, and checked before
anything is measured.

``infer`` runs the model once on a small padded probe batch with hooks on every module of its first block,
recording the order modules are called in and what each reads and returns, and reads the component tree from that:

- the blocks: the ModuleList of ``num_hidden_layers`` modules whose first element is called with the hidden states;
- the token mixer and the MLP: the block's children with projections that read and return the hidden states, told
  apart by perturbing one position of their input (the mixer's later positions change, the MLP changes that
  position only);
- the norms: the norm-like child (no projection in it) whose output is a branch's input (``mlp_norm``), or whose
  input is a branch's output (a branch norm, Gemma-2's sandwich);
- the MLP's projections: down is the last one called that writes d_model; up (and gate) read the MLP's input; of
  two, the gate is the one whose activation times the other is the down projection's input; one twice as wide as
  down's input holds both (gate first);
- the layout: a projection that is no ``nn.Linear`` and stores its weight [in, out] is declared ``in_out``;
- parallel or sequential: whether the MLP's input moves when the mixer's output is perturbed.

``check`` then runs the probe batch again through the inferred sites of every block and asks that the pieces add
up: the residual sums, the norm in front of the MLP, the MLP's projections and activation, and each block's input
being transformers' hidden state. A failed equation is one UsageError line naming it and by how much it missed. Mixtures
of experts, hybrids (blocks that differ), MLPs without their own module and post-LN blocks are not inferred: they
are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .adapters.base import Adapter, Mlp, Summed, text_config

PROBE_LENGTH = 8  # tokens per probe text; the second text is padded after its 5th token
POSITION = 2  # the probe position perturbed to tell a token mixer from a position-wise MLP
# Relative tolerance of an equation between two computation orders, by number format (float32: about 100 ulps).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True, kw_only=True)
class Inferred:
    """An inferred adapter and the equations that held for it on the probe batch, each "equation (relative error
    x)": its largest error over every block, relative to the scale of its terms."""

    adapter: Adapter
    checks: tuple[str, ...]


@dataclass(kw_only=True)
class _Call:
    """One call of a module of the probed block: its path in the block, its arguments, first input and output."""

    path: str
    args: tuple
    kwargs: dict
    input: torch.Tensor | None
    output: torch.Tensor | None = None


def infer_and_check(model: nn.Module) -> Inferred:
    """The adapter of ``model``'s blocks, inferred from its modules and checked on a padded probe batch.

    Raises:
        UsageError: What the inference cannot map ("architecture ... is not supported: <why>"), or the equation
            that did not hold, by how much.
    """
    try:
        adapter = infer(model)
        checks = check(model, adapter)
    except UsageError:
        raise
    except Exception as error:  # the model's own code, run on perturbed inputs, raises its own kinds of errors
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise cannot(model, f"probing its blocks failed: {text}") from None
    return Inferred(adapter=adapter, checks=checks)


def refuse(model: nn.Module, why: str) -> UsageError:
    """The refusal of a model no adapter is written for, saying ``why`` inference gives it none."""
    model_type = getattr(text_config(model), "model_type", type(model).__name__)
    return UsageError(f"architecture {model_type!r} is not supported: no adapter is written for it, and {why}")


def cannot(model: nn.Module, why: str) -> UsageError:
    return refuse(model, f"inference cannot map its blocks: {why}")


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two texts of random tokens, the second padded (attention mask 0) after its 5th token."""
    config = text_config(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    # Stay clear of the low ids, where the special tokens (padding among them) usually are.
    ids = torch.randint(min(8, config.vocab_size - 1), config.vocab_size, (2, PROBE_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _first(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _with_input(call: _Call, value: torch.Tensor) -> tuple[tuple, dict]:
    """The call's arguments with its first input replaced by ``value``."""
    if call.args and call.args[0] is call.input:
        return (value, *call.args[1:]), call.kwargs
    key = next(k for k, v in call.kwargs.items() if v is call.input)
    return call.args, {**call.kwargs, key: value}


def _run(model: nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs, use_cache=False)


def _blocks(model: nn.Module, width: int) -> tuple[str, nn.ModuleList]:
    """(path in the base model, list) of the block list: ``num_hidden_layers`` modules, the first called with the
    [batch, positions, d_model] hidden states."""
    config = text_config(model)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == config.num_hidden_layers and len(module)]
    seen: dict[str, torch.Tensor | None] = {}

    def note(name: str, args: tuple, kwargs: dict) -> None:
        seen.setdefault(name, _input(args, kwargs))

    handles = [blocks[0].register_forward_pre_hook(lambda m, args, kwargs, name=name: note(name, args, kwargs), with_kwargs=True)
               for name, blocks in lists]
    try:
        _run(model, probe_inputs(model))
    finally:
        for handle in handles:
            handle.remove()
    found = [(name, blocks) for name, blocks in lists
             if seen.get(name) is not None and seen[name].dim() == 3 and seen[name].shape[-1] == width]
    if len(found) != 1:
        raise cannot(model, f"{len(found)} module lists of {config.num_hidden_layers} blocks read the hidden states (one expected)")
    name, blocks = found[0]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module) and name.startswith(prefix + "."):
        name = name.removeprefix(prefix + ".")
    return name, blocks


def _record(model: nn.Module, block: nn.Module) -> list[_Call]:
    """Every call of the block's modules (the block itself first, path "") on the probe batch, in call order."""
    calls: list[_Call] = []
    handles = []
    for path, module in block.named_modules():
        def before(m, args, kwargs, path=path):
            calls.append(_Call(path=path, args=args, kwargs=kwargs, input=_input(args, kwargs)))

        def after(m, args, kwargs, output, path=path):
            call = next(c for c in reversed(calls) if c.path == path and c.output is None)
            out = _first(output)
            call.output = out.detach().clone() if out is not None else None  # a copy: some blocks add in place

        handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                    module.register_forward_hook(after, with_kwargs=True)]
    try:
        _run(model, probe_inputs(model))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two tensors hold the same rows, [batch, positions, width] or flattened [batch x positions, width]."""
    if a is None or b is None or a.shape[-1:] != b.shape[-1:] or a.numel() != b.numel():
        return False
    return torch.equal(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))


def _leaf_weight(module: nn.Module) -> torch.Tensor | None:
    """The 2-D weight of a leaf module that has one (a projection), else None."""
    weight = getattr(module, "weight", None)
    if next(module.children(), None) is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    return None


def _has_projection(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def _changed_positions(call: _Call, module: nn.Module) -> set[int]:
    """Which positions of text 0 the module's output moves at when its input moves at ``POSITION`` only."""
    nudged = call.input.clone()
    nudged[0, POSITION] += torch.randn(nudged.shape[-1], generator=torch.Generator().manual_seed(1)).to(nudged)
    with torch.no_grad():
        base = _first(module(*call.args, **call.kwargs))
        args, kwargs = _with_input(call, nudged)
        moved = _first(module(*args, **kwargs))
    delta = (moved - base)[0].abs().amax(dim=-1)
    return {int(p) for p in torch.nonzero(delta > 1e-6 * (1 + base.abs().amax())).flatten()}


def _in_out(model: nn.Module, module: nn.Module, call: _Call) -> bool:
    """Whether the projection stores its weight [in, out] (x @ W), tested against its own output; refused where
    neither layout makes it."""
    weight = _leaf_weight(module)
    bias = getattr(module, "bias", None)
    x = call.input
    for in_out in ((False, True) if not isinstance(module, nn.Linear) else (False,)):
        w = weight if in_out else weight.T
        if w.shape[0] != x.shape[-1]:
            continue
        with torch.no_grad():
            y = x @ w + (bias if bias is not None else 0)
        if torch.allclose(y, call.output, rtol=1e-4, atol=1e-5):
            if not in_out and not isinstance(module, nn.Linear):
                raise cannot(model, f"projection {call.path} ({type(module).__name__}) stores its weight [out, in] but is no "
                                    "nn.Linear")
            return in_out
    raise cannot(model, f"projection {call.path} ({type(module).__name__}) is not x @ W + b in either weight layout")


def _children(block: nn.Module, calls: list[_Call]) -> list[_Call]:
    """The first call of each direct child of the block, in call order."""
    seen, first = set(), []
    for call in calls:
        if call.path and "." not in call.path and call.path not in seen:
            seen.add(call.path)
            first.append(call)
    return first


# Activations an MLP may call as a function rather than a module, tried after the config's ``hidden_act``.
COMMON_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


def _activations(model: nn.Module, block: nn.Module, prefix: str, inside: list[_Call],
                 pre: torch.Tensor) -> list[tuple[str | Callable, Callable]]:
    """Candidates for the activation applied to ``pre``, each (how the adapter names it, the function): a module of
    the MLP called on it, then the config's ``hidden_act`` and common activations as functions (the MLP calls one)."""
    from transformers.activations import ACT2FN

    found = [(c.path.removeprefix(prefix), block.get_submodule(c.path)) for c in inside
             if _same(c.input, pre) and _leaf_weight(block.get_submodule(c.path)) is None]
    config = text_config(model)
    named = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    names = ([named] if isinstance(named, str) else []) + [n for n in COMMON_ACTIVATIONS if n != named]
    return found + [(ACT2FN[name], ACT2FN[name]) for name in names if name in ACT2FN]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _mlp(model: nn.Module, block: nn.Module, inside: list[_Call], mlp: _Call, width: int) -> tuple[Mlp, tuple[type, ...]]:
    """The MLP's component tree and the projection classes stored [in, out], from the calls ``inside`` it."""
    projections = [c for c in inside if _leaf_weight(block.get_submodule(c.path)) is not None and c.output is not None]
    in_out = {type(block.get_submodule(c.path)) for c in projections if _in_out(model, block.get_submodule(c.path), c)}
    down = next((c for c in reversed(projections) if c.output.shape[-1] == width), None)
    if down is None:
        raise cannot(model, f"no projection in {mlp.path} writes d_model {width}")
    reading = [c for c in projections if c is not down and _same(c.input, mlp.input)]
    prefix = mlp.path + "." if mlp.path else ""
    relative = lambda call: call.path.removeprefix(prefix)
    ff = down.input.shape[-1]
    found = lambda pre: _activations(model, block, prefix, inside, pre)
    if len(reading) == 1 and reading[0].output.shape[-1] == ff:
        for name, act in found(reading[0].output):
            if _close(act(reading[0].output), down.input):
                return Mlp(path=mlp.path, up=relative(reading[0]), gate=None, down=relative(down), act=name), tuple(in_out)
    elif len(reading) == 1 and reading[0].output.shape[-1] == 2 * ff:
        gate, up = reading[0].output.chunk(2, dim=-1)
        for name, act in found(gate):
            if _close(act(gate) * up, down.input):
                return Mlp(path=mlp.path, up=relative(reading[0]), gate=None, fused=True, down=relative(down), act=name), tuple(in_out)
    elif len(reading) == 2:
        for gate, up in (reading, reading[::-1]):
            if not gate.output.shape[-1] == up.output.shape[-1] == ff:
                continue
            for name, act in found(gate.output):
                if _close(act(gate.output) * up.output, down.input):
                    return Mlp(path=mlp.path, up=relative(up), gate=relative(gate), down=relative(down), act=name), tuple(in_out)
    raise cannot(model, f"the down projection's input in {mlp.path} is not act(up) or act(gate) x up of the "
                        f"{len(reading)} projection(s) reading the MLP's input")


def infer(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s blocks, read from its modules and their calls on the probe batch (unchecked: see
    ``check``)."""
    config = text_config(model)
    width = config.hidden_size
    layers, blocks = _blocks(model, width)
    block = blocks[0]
    return _infer_block(model, block, _record(model, block), layers, width)


def _infer_block(model: nn.Module, block: nn.Module, calls: list[_Call], layers: str, width: int) -> Adapter:
    convolutions = {id(p) for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters()}
    if any(p.dim() == 3 and id(p) not in convolutions for p in block.parameters()):
        raise cannot(model, "its blocks hold 3-D expert weights (a mixture of experts), whose routing inference does not map")
    # Hidden states as [batch, positions, d_model], or flattened to rows (OPT flattens them before its MLP's norm).
    hidden = lambda t: t is not None and t.dim() in (2, 3) and t.shape[-1] == width
    children = [c for c in _children(block, calls) if hidden(c.input) and hidden(c.output) and not _same(c.input, c.output)]
    branches = [c for c in children if _has_projection(block.get_submodule(c.path)) and c.input.dim() == 3]
    norms = [c for c in children if not _has_projection(block.get_submodule(c.path))]
    kinds = {c.path: _changed_positions(c, block.get_submodule(c.path)) for c in branches}
    mixers = [c for c in branches if any(p > POSITION for p in kinds[c.path])]
    mlps = [c for c in branches if kinds[c.path] == {POSITION}]
    if len(mixers) != 1 or len(mlps) > 1:
        raise cannot(model, f"block 0 has {len(mixers)} token mixer(s) and {len(mlps)} position-wise MLP module(s) among its "
                            "children (one of each expected)")
    mixer = mixers[0]
    order = {id(c): i for i, c in enumerate(calls)}
    if mlps:
        mlp_call = reader = mlps[0]
        inside = [c for c in calls if c.path.startswith(mlp_call.path + ".")]
    else:
        mlp_call, reader, inside = _block_mlp(model, block, calls, mixer, order, width)
    in_mixer = [c for c in calls if c.path.startswith(mixer.path + ".") and c.output is not None]
    writes = lambda c: _leaf_weight(block.get_submodule(c.path)) is not None and c.output.shape[-1] == width
    out = next((c for c in reversed(in_mixer) if writes(c)), None)
    if out is None:
        raise cannot(model, f"no projection in {mixer.path} writes d_model {width}")
    mlp, in_out = _mlp(model, block, inside, mlp_call, width)
    in_out = tuple({*in_out, *(() if not _in_out(model, block.get_submodule(out.path), out) else (type(block.get_submodule(out.path)),))})
    # The norm called last before the MLP whose output the MLP reads (two norms of one input give equal outputs while
    # their gains are equal, as at initialisation); a branch norm: the first called after its branch, on its output.
    mlp_norm = tuple(c.path for c in norms if _same(c.output, mlp_call.input) and order[id(c)] < order[id(reader)])[-1:]
    after = lambda branch, at: [c for c in norms if _same(c.input, branch.output) and order[id(c)] > order[id(at)]]
    branch_norms = {site: after(branch, at)[0].path for site, branch, at in (("attn_out", mixer, mixer), ("mlp_out", mlp_call, reader))
                    if after(branch, at)}
    if not mlp_norm and not _same(mlp_call.input, mixer.input) and not _reads_stream(model, block, calls, mixer, mlp_call, branch_norms):
        raise cannot(model, f"the input of {mlp_call.path} is neither a norm's output nor the residual stream")
    parallel = not _mixer_feeds_mlp(block, calls, mixer, reader)
    kind = _mixer_kind(model, block.get_submodule(mixer.path))
    return Adapter(
        family=f"{getattr(text_config(model), 'model_type', type(model).__name__)} (inferred)",
        model_types=(),
        layers=layers,
        attention=mixer.path,
        attention_out=out.path.removeprefix(mixer.path + "."),
        mlp=mlp,
        mlp_norm=mlp_norm,
        branch_norms=branch_norms,
        parallel=parallel,
        in_out=in_out,
        flat_rows=mlp_call.input.dim() == 2,
        mixer=kind,
        values=None,
        notes=_notes(parallel, mlp_norm, branch_norms),
    )


def _notes(parallel: bool, mlp_norm: tuple[str, ...], branch_norms: dict[str, str]) -> str:
    """What the report says of the inferred block where it is no plain pre-norm sequential block."""
    notes = ["parallel block: attention and MLP both read the block input"] if parallel else []
    notes += [] if mlp_norm else ["no norm in front of the MLP"]
    if branch_norms:
        notes.append(f"each branch is normed ({', '.join(branch_norms.values())}) before it lands")
    return "; ".join(notes)


def _mixer_kind(model: nn.Module, mixer: nn.Module) -> str:
    """"attention" where every block returns attention probabilities in an eager pass, else "conv" where the mixer
    holds a convolution and "linear" (a recurrence) where not; a model where only some blocks return them (a hybrid)
    is refused."""
    n = text_config(model).num_hidden_layers
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**probe_inputs(model), use_cache=False, output_attentions=True).attentions or ()
    finally:
        model.set_attn_implementation(before)
    if len(maps) == n:
        return "attention"
    if maps:
        raise cannot(model, f"{len(maps)} of its {n} blocks return attention probabilities (a hybrid, whose blocks differ)")
    return "conv" if any(isinstance(m, nn.modules.conv._ConvNd) for m in mixer.modules()) else "linear"


def _reads_stream(model, block, calls, mixer: _Call, mlp: _Call, branch_norms: dict) -> bool:
    """Whether the MLP reads the residual stream itself: resid_in + the (normed) mixer output."""
    landed = next((c.output for c in calls if c.path == branch_norms.get("attn_out")), mixer.output)
    return _close(calls[0].input + landed, mlp.input)


def _block_mlp(model: nn.Module, block: nn.Module, calls: list[_Call], mixer: _Call, order: dict[int, int],
               width: int) -> tuple[_Call, _Call, list[_Call]]:
    """An MLP whose projections sit on the block itself (no module of its own): (the MLP as one call, path "": the
    first projection's input, the last d_model-wide projection's output; that first projection, which reads the
    MLP's input; the block's own calls after the mixer)."""
    inside = [c for c in calls if c.path and "." not in c.path and order[id(c)] > order[id(mixer)]]
    projections = [c for c in inside if _leaf_weight(block.get_submodule(c.path)) is not None and c.output is not None]
    down = next((c for c in reversed(projections) if c.output.shape[-1] == width), None)
    if not projections or down is projections[0]:
        raise cannot(model, "block 0 has a token mixer but no MLP: no position-wise child module, and no projections of "
                            "its own after the mixer")
    first = projections[0]
    return _Call(path="", args=(), kwargs={}, input=first.input, output=down.output), first, inside


def _mixer_feeds_mlp(block: nn.Module, calls: list[_Call], mixer: _Call, mlp: _Call) -> bool:
    """Whether the MLP's input (``mlp``: the call that reads it) moves when the mixer's output is perturbed
    (sequential block) or not (parallel)."""
    seen: list[torch.Tensor] = []

    def nudge(module, args, output):
        first = _first(output)
        changed = first + 1.0
        return changed if isinstance(output, torch.Tensor) else (changed, *output[1:])

    def read_input(module, args, kwargs) -> None:
        seen.append(_input(args, kwargs).clone())

    read = block.get_submodule(mlp.path).register_forward_pre_hook(read_input, with_kwargs=True)
    push = block.get_submodule(mixer.path).register_forward_hook(nudge)
    try:
        with torch.no_grad():
            block(*calls[0].args, **calls[0].kwargs)
    finally:
        read.remove()
        push.remove()
    return not _same(seen[0], mlp.input)


def check(model: nn.Module, adapter: Adapter) -> tuple[str, ...]:
    """Run the probe batch through the adapter's sites in every block and check that the pieces add up; returns the
    equations that held, each with its largest error relative to the scale of its terms.

    Raises:
        UsageError: An equation that did not hold, with its max abs and relative error; a block without a module
            the first block has.
    """
    config = text_config(model)
    n = config.num_hidden_layers
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, 1e-5)
    try:
        trace, hidden = _trace(model, adapter)
    except AttributeError as error:
        raise cannot(model, f"a later block differs from block 0 ({error})") from None
    worst: dict[str, tuple[float, float]] = {}

    def equation(name: str, got: torch.Tensor, expected: torch.Tensor, layer: int) -> None:
        got, expected = got.float(), expected.float()
        if got.shape != expected.shape:
            raise refuse(model, f"its inferred adapter does not hold: {name} at block {layer}: shapes {list(got.shape)} and "
                                f"{list(expected.shape)}")
        error = (got - expected).abs().amax().item()
        scale = max(expected.abs().amax().item(), got.abs().amax().item(), 1.0)
        if not error <= tolerance * scale:  # not <=: a NaN fails too
            raise refuse(model, f"its inferred adapter does not hold: {name} at block {layer}: max abs error {error:.3g}, "
                                f"relative {error / scale:.3g} (tolerance {tolerance:g})")
        worst[name] = max(worst.get(name, (0.0, 0.0)), (error / scale, error))

    for layer in range(n):
        t = lambda site, layer=layer: trace[layer, site]
        part = lambda path, layer=layer: adapter.module(model, layer, path)
        with torch.no_grad():
            equation("resid_in = hidden state", t("resid_in"), hidden[layer], layer)
            if adapter.parallel:
                equation("resid_out = resid_in + attn_out + mlp_out", t("resid_out"), t("resid_in") + t("attn_out") + t("mlp_out"), layer)
            else:
                equation("resid_mid = resid_in + attn_out", t("resid_mid"), t("resid_in") + t("attn_out"), layer)
                equation("resid_out = resid_mid + mlp_out", t("resid_out"), t("resid_mid") + t("mlp_out"), layer)
            for site, norm in adapter.branch_norms.items():
                equation(f"{site} = {norm}({adapter.raw(site)})", t(site), part(norm)(t(adapter.raw(site))), layer)
            stream = t("resid_in") if adapter.parallel else t("resid_mid")
            found = adapter.mlp_norm_module(model, layer)
            equation(f"mlp_in = {found[0] if found else ''}({'resid_in' if adapter.parallel else 'resid_mid'})", t("mlp_in"),
                     found[1](stream) if found else stream, layer)
            for site in ("mlp_up", "mlp_gate") if adapter.gated else ("mlp_up",):
                weight, bias = adapter.input_rows(model, layer, site)
                equation(f"{site} = mlp_in @ W^T + b", t(site), t("mlp_in") @ weight.T + (bias if bias is not None else 0), layer)
            act = adapter.activation(model, layer)
            equation("mlp_act = act(mlp_gate) x mlp_up" if adapter.gated else "mlp_act = act(mlp_up)", t("mlp_act"),
                     act(t("mlp_gate")) * t("mlp_up") if adapter.gated else act(t("mlp_up")), layer)
            down = part(adapter.mlp_down)
            bias = getattr(down, "bias", None)
            projected = t("mlp_act") @ adapter.weight_out_in(down).T + (bias if bias is not None else 0)
            if "mlp_out" in adapter.branch_norms:  # the down projection makes the raw output, which the norm lands
                equation("mlp_out = down(mlp_act)", t(adapter.raw("mlp_out")), projected, layer)
            else:  # times a branch scale or the MLP's own down scale, where it has one
                landing = adapter.landing(config, "mlp_out")
                name = "mlp_out = down(mlp_act)" + (f" x {landing:g}" if landing != 1.0 else "")
                equation(name, t("mlp_out"), projected * landing, layer)
    return tuple(f"{name} (relative error {rel:.1e})" for name, (rel, _) in worst.items())


def _trace(model: nn.Module, adapter: Adapter) -> tuple[dict[tuple[int, str], torch.Tensor], tuple[torch.Tensor, ...]]:
    """Every site of every block on the probe batch, by (layer, site), and transformers' hidden states. A site read
    at a module that the block scales before it lands is times that scale (``Adapter.landing``), a summed site the sum
    of its parts (``Summed.watch``), as every stage reads them."""
    config = text_config(model)
    values: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(layer: int, site: str, tensor, chunk) -> None:
        tensor = _first(tensor).detach().clone()  # a copy: some blocks add in place
        tensor = tensor.view(2, PROBE_LENGTH, -1) if tensor.dim() == 2 else tensor  # flat MLP rows put back in shape
        tensor = tensor.chunk(chunk[1], dim=-1)[chunk[0]] if chunk else tensor
        factor = adapter.landing(config, site)
        values[layer, site] = tensor * factor if factor != 1.0 else tensor

    try:
        for layer in range(config.num_hidden_layers):
            for site, spec in adapter.sites.items():
                if isinstance(spec, Summed):
                    handles += spec.watch(adapter.module(model, layer, ""), config,
                                          lambda tensor, layer=layer, site=site: keep(layer, site, tensor, None))
                    continue
                path, direction, *chunk = spec
                module = adapter.module(model, layer, path)
                chunk = chunk[0] if chunk else None
                if direction == "in":
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, kwargs, layer=layer, site=site, chunk=chunk: keep(layer, site, _input(args, kwargs), chunk),
                        with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(
                        lambda m, args, output, layer=layer, site=site, chunk=chunk: keep(layer, site, output, chunk)))
        with torch.no_grad():
            hidden = model(**probe_inputs(model), use_cache=False, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return values, hidden
