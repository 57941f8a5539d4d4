"""Which positions carry a massive activation, read from the activations themselves, for tools that train on them
(sparse autoencoders, probes, steering vectors). Public as ``massact.masks``.

``live`` is the exact mask of one hidden state; ``Hook`` records it at chosen blocks during any forward pass. Both
never flag padding. Without a forward pass, ``Profile.mask`` predicts the same positions from rules."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ..models.adapters import adapter_for
from ..models.loading import LoadedModel
from ..settings import Criterion
from .hooks import tap


def live(hidden: torch.Tensor, criterion: Criterion | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [batch, positions]: True where some dim of ``hidden`` [batch, positions, width] has |a| >= min_abs and
    |a| >= min_ratio x the median |a| of the batch's hidden state, over its real tokens and every dim (as the scan's
    criterion takes the median over every token at a block). ``attention_mask`` (1 = real token): padding is never
    flagged and never enters the median.

    Args:
        hidden: A hidden state [batch, positions, width], e.g. one of a transformers model's ``hidden_states``.
        criterion: The massive test (default: ``Criterion()``, |a| >= 100 and >= 1000 x the median).
        attention_mask: [batch, positions], 1 for a real token and 0 for padding (default: every position real).

    Returns:
        bool [batch, positions], on ``hidden``'s device: True where some dim is massive.

    Raises:
        TypeError: ``criterion`` is not a ``Criterion``.
    """
    if criterion is not None and not isinstance(criterion, Criterion):
        raise TypeError(f"criterion must be a massact.masks.Criterion, not {type(criterion).__name__}")
    criterion = criterion or Criterion()
    real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden.device).bool()
    magnitude = hidden.detach().abs()
    values = magnitude[real].float()
    if values.numel() == 0:
        return real.clone()
    median = values.flatten().median()
    return criterion.is_massive(magnitude.float(), median).any(-1) & real


def _block_indices(layers, count: int) -> list[int]:
    """``layers`` as a list of block indices in [0, count), or the error naming ``layers``: a string would be read one
    character at a time, and a float would be cut to an integer."""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of block indices (e.g. [12]), not {type(layers).__name__}")
    layers = list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layers must hold integer block indices, not {layer!r} ({type(layer).__name__})")
    if not layers or any(not 0 <= layer < count for layer in layers):
        raise ValueError(f"layers must be block indices from 0 to {count - 1}; got {layers!r}")
    return list(dict.fromkeys(int(layer) for layer in layers))


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature Python can read
        return False


class Hook:
    """While open, each forward pass of ``model`` (a ``LoadedModel`` or a transformers model) records
    ``masks[layer]``: ``live`` at the output of each block in ``layers`` (default every block), with the attention
    mask the model was called with. The masks are of the latest pass.

    The attention mask is read wherever the pass hands it over: by keyword or by position, to the model itself or to
    any module between it and its blocks (the base model under a causal-LM head, ``model.model(...)``). In a pass
    with a cache, only the mask's last columns (the positions computed) are used. A Hook is open once at a time:
    entering it again while open is a RuntimeError, and its hooks are gone when the block that opened it closes.

        with massact.masks.Hook(model, layers=[12]) as hook:
            model(**batch)
        keep = ~hook.masks[12]

    Args:
        model: A ``LoadedModel`` (``massact.load`` or ``massact.wrap``) or a transformers model massact can map.
        layers: The blocks to record, 0-based integers (default: every block).
        criterion: The massive test (default: ``Criterion()``).

    Raises:
        TypeError: ``model`` is neither, ``layers`` is not a list of integers, or ``criterion`` is not a
            ``Criterion``.
        ValueError: A block index in ``layers`` is out of range (or ``layers`` is empty); at a forward pass, an
            attention mask whose shape does not match the blocks' output.
        UsageError: ``model``'s architecture is not supported.
        RuntimeError: The Hook is entered while it is open.
    """

    def __init__(self, model: LoadedModel | nn.Module, layers: Iterable[int] | None = None, criterion: Criterion | None = None):
        if not (isinstance(model, LoadedModel) or isinstance(model, nn.Module) and hasattr(model, "config")):
            raise TypeError("model must be a LoadedModel (massact.load or massact.wrap) or a transformers model massact can map, "
                            f"not {type(model).__name__}")
        if criterion is not None and not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a massact.masks.Criterion, not {type(criterion).__name__}")
        self.model = model.model if isinstance(model, LoadedModel) else model
        self.adapter = model.adapter if isinstance(model, LoadedModel) else adapter_for(self.model.config)
        count = len(self.adapter.blocks(self.model))
        self.layers = _block_indices(layers, count)
        self.criterion = criterion or Criterion()
        self.masks: dict[int, torch.Tensor] = {}
        self._attention: torch.Tensor | None = None
        self._depth = 0  # how many of the callers below are running now: 0 = between passes
        self._handles: list = []
        self._opened = None
        # The model and every module between it and its blocks that takes an attention mask: a pass may start at any.
        path = self.adapter.layers_path(self.model).split(".")
        ancestors = [self.model.get_submodule(".".join(path[:end])) for end in range(len(path))]
        self._callers = [module for module in ancestors if _takes_attention_mask(module)] or [self.model]

    def _inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._depth == 0:  # a new pass: forget the last pass's mask
            self._attention = None
        self._depth += 1
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            try:
                mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:  # arguments the signature does not take: the model's own forward will say so
                mask = None
        # The outermost 2-D mask holds: an inner module may get the extended 4-D mask, or a dict of masks, built from it.
        if self._attention is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._attention = mask

    def _done(self, module: nn.Module, args: tuple, output) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:  # the pass is over: a block called on its own later has no mask of this pass
            self._attention = None

    def _record(self, layer: int, _site: str, hidden: torch.Tensor) -> None:
        mask = self._attention
        if mask is not None:
            if mask.shape[0] != hidden.shape[0] or mask.shape[1] < hidden.shape[1]:
                raise ValueError(f"the attention mask is {list(mask.shape)} but block {layer}'s output is "
                                 f"{list(hidden.shape[:2])} [batch, positions]")
            mask = mask[:, mask.shape[1] - hidden.shape[1]:]  # with a cache: the positions this pass computes
        self.masks[layer] = live(hidden, self.criterion, mask)

    def __enter__(self) -> Hook:
        if self._opened is not None:
            raise RuntimeError("this Hook is already open; a Hook is entered once at a time (use a second Hook for nested blocks)")
        self.masks.clear()
        self._attention, self._depth = None, 0
        handles = []
        try:
            for module in self._callers:
                handles.append(module.register_forward_pre_hook(self._inputs, with_kwargs=True))
                handles.append(module.register_forward_hook(self._done, always_call=True))
            opened = tap(self.model, self.adapter, [(layer, self.adapter.stream) for layer in self.layers], self._record)
            opened.__enter__()
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles, self._opened = handles, opened
        return self

    def __exit__(self, *exc) -> None:
        handles, opened = self._handles, self._opened
        self._handles, self._opened = [], None
        try:
            for handle in handles:
                handle.remove()
        finally:
            if opened is not None:
                opened.__exit__(*exc)
