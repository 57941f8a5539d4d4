"""How this process was launched: its rank and the number of processes of a ``torchrun`` or ``accelerate launch``,
read from the environment in one place (the scan's shared corpus pass, the track's share of checkpoints and the
command line's progress bars all ask here). Importing this module does not load torch."""

from __future__ import annotations

import os

VARIABLES = ("WORLD_SIZE", "RANK")  # what a launcher sets for each process


def launch() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless launched by torchrun or accelerate launch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
