"""Passes that change nothing before block L run from block L on: the unmodified model's output of block L-1 on the
same inputs stands in for every block before it. An intervention at block L (an ablation, a zeroed weight, a
replaced output) then costs only the blocks from L on, and gives exactly what the full pass gives."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.loading import LoadedModel


def copy_output(output: Any) -> Any:
    """A block's output (a tensor, or a tuple led by one) with its tensor copied: a block may add into its input."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    return (output[0].detach().clone(), *output[1:])


@contextmanager
def keep_block_inputs(lm: LoadedModel, starts: Iterable[int]) -> Iterator[dict[int, Any]]:
    """Within the block, every forward pass fills the yielded dict: start block -> the output of the block before it
    (what ``run_from`` needs). Start 0 needs nothing and is left out."""
    kept: dict[int, Any] = {}
    blocks = lm.adapter.blocks(lm.model)
    handles = [blocks[start - 1].register_forward_hook(lambda m, args, output, start=start: kept.__setitem__(start, copy_output(output)))
               for start in sorted(set(starts)) if start > 0]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def run_from(lm: LoadedModel, start: int, block_input: Any) -> Iterator[None]:
    """Within the block, a forward pass skips blocks 0..start-1: each returns (a copy of) ``block_input``, the
    unmodified output of block start-1 on the very inputs the pass is given, so block ``start`` and everything after
    it compute what the full pass would. Hooks on the skipped blocks see nothing: only edit and read from ``start``."""
    if start == 0:
        yield
        return
    blocks = list(lm.adapter.blocks(lm.model))[:start]
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's device-map dispatch sets its own

    def skipped(*args: Any, **kwargs: Any) -> Any:
        return copy_output(block_input)

    try:
        for block in blocks:
            block.forward = skipped
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@contextmanager
def head_rows(lm: LoadedModel, rows: Callable[[torch.Tensor], torch.Tensor], out: Scratch | None = None) -> Iterator[None]:
    """Within the block, the output head (``get_output_embeddings``) is given ``rows(hidden)`` in place of its input
    [batch, positions, width]: only the positions that are scored pay for the vocabulary-wide product, and the
    logits come out already selected (a view of them would be copied later). A model that computes its logits some
    other way gives them whole, which the caller checks by shape.

    With ``out``, a plain linear head writes its logits into that scratch memory, the same pass after pass; the
    logits returned are then only good until the next pass."""
    head = lm.model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (rows(args[0]), *args[1:]) if args else None)
    plain = out is not None and type(head) is nn.Linear and "forward" not in head.__dict__
    if plain:
        head.forward = lambda hidden: out.linear(hidden, head.weight, head.bias)
    try:
        yield
    finally:
        handle.remove()
        if plain:
            del head.forward


class Scratch:
    """Named blocks of memory reused pass after pass, each grown when a pass needs more. A fresh tensor of hundreds of
    MB (the logits of a batch, their log-probabilities) is mapped and faulted in page by page every time: on the
    default model that took a fifth of the full report's time. What ``take`` gives is good until it is taken again."""

    def __init__(self) -> None:
        self.memory: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in the block called ``name``."""
        size = math.prod(shape)
        block = self.memory.get(name)
        if block is None or block.numel() < size or block.dtype != like.dtype or block.device != like.device:
            block = self.memory[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return block[:size].view(shape)

    def linear(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``nn.functional.linear(hidden, weight, bias)``, written into the block "logits"."""
        logits = self.take("logits", (*hidden.shape[:-1], weight.shape[0]), hidden)
        rows, flat = hidden.reshape(-1, hidden.shape[-1]), logits.view(-1, weight.shape[0])  # as linear folds a batch
        if bias is None:
            torch.mm(rows, weight.t(), out=flat)
        else:
            torch.addmm(bias, rows, weight.t(), out=flat)
        return logits
