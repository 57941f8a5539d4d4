"""The trigger of a streamed model (``models.checkpoint``), in the pass that explains the mechanism's events, with no
block read again.

Every forward pass the trigger makes stops at or before one block, known once the lifelines are: the deepest of each
lifeline's ``last_block`` (its birth, writing and peak blocks and the carriers' probe block). In the events' pass the
blocks up to it stay loaded as the pass goes through them; once that block is done and the mechanism explained up to
it, the in-memory ``triggers`` runs on the model as it is then, blocks 0..L loaded and the later ones not (a pass
beyond L would fail on their empty weights), and the blocks are released. The numbers are the in-memory ones: the
same functions on the same weights.

The kept blocks must fit the pass's memory allowance where they are loaded: ``StreamPlace.device_bytes`` for a model
on an accelerator, ``host_bytes`` on the CPU (beyond the two blocks a pass always holds). With verification they
share it with the lanes' hidden states, which go to their files first: the blocks are counted in the lanes' pool
while they are kept. Where they do not fit the trigger is not measured and the report's warnings say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models.checkpoint import StreamedModel
from ...models.loading import LoadedModel
from ...numbers import size as in_bytes
from ...settings import ScanSettings
from ..detect.stream import StreamPlace
from ..mechanism.stream import EventPass
from .results import Trigger
from .trigger import last_block, triggers


@dataclass(kw_only=True)
class StreamedTrigger:
    """The trigger of an events' pass: ``last``, the deepest block its passes reach (-1: nothing to trigger);
    ``bytes``, what blocks 0..last hold loaded; ``allowance``, what the pass may hold there; ``found``, the triggers
    once block ``last`` is done. ``windows``: the number of windows scanned (the carriers' probes report it)."""

    lm: LoadedModel
    events: EventPass
    settings: ScanSettings
    windows: int
    last: int
    bytes: int
    allowance: int
    found: list[Trigger] = field(default_factory=list)
    pool: dict[str, int] | None = None  # the lanes' memory pool, where the kept blocks are counted
    where: str = "host"  # where the blocks are loaded, in the pool's terms: "device" or "host"

    @property
    def fits(self) -> bool:
        return self.last >= 0 and self.bytes <= self.allowance

    @property
    def keep(self) -> int:
        """The last block the pass keeps loaded for the trigger (-1: none)."""
        return self.last if self.fits else -1

    def hold(self, pool: dict[str, int]) -> None:
        """Count the kept blocks in ``pool`` (a lane pass's hidden states' memory) until the trigger has run."""
        if self.fits:
            self.pool = pool
            pool[self.where] += self.bytes

    def finished(self, layer: int) -> None:
        """After block ``layer``'s events are explained: at block ``last``, the triggers, on blocks 0..last."""
        if layer != self.keep:
            return
        self.found = triggers(self.lm, self.events.inputs, self.events.findings, self.events.mechanism(whole=False),
                              self.settings, self.windows)
        if self.pool is not None:  # the blocks go once this block is done
            self.pool[self.where] -= self.bytes
            self.pool = None

    def warnings(self) -> list[str]:
        if self.last < 0 or self.fits:
            return []
        return [f"trigger not measured: blocks 0..{self.last} ({in_bytes(self.bytes)}) exceed the memory allowance "
                f"({in_bytes(self.allowance)})"]


def block_bytes(lm: LoadedModel, layers: range) -> int:
    """What the blocks ``layers`` hold once loaded: their parameters, in the shapes and dtypes the model is built
    with (the loaded ones, a quantized checkpoint dequantized)."""
    blocks = lm.adapter.blocks(lm.model)
    return sum(p.numel() * p.element_size() for layer in layers for p in blocks[layer].parameters())


def streamed_trigger(streamed: StreamedModel, events: EventPass, settings: ScanSettings, windows: int,
                     place: StreamPlace) -> StreamedTrigger:
    """The trigger of ``events``'s lifelines, run in their pass where blocks 0..L fit ``place``'s allowance on the
    model's device (its device bytes on an accelerator, its host bytes on the CPU)."""
    lm, findings = streamed.lm, events.findings
    last = max((last_block(line, events.inputs[line.text], findings.stream_medians(line.stream), findings.criterion)
                for line in events.lines), default=-1)
    on_device = lm.device.type != "cpu"
    return StreamedTrigger(lm=lm, events=events, settings=settings, windows=windows, last=last,
                           bytes=block_bytes(lm, range(last + 1)),
                           allowance=place.device_bytes if on_device else place.host_bytes,
                           where="device" if on_device else "host")
