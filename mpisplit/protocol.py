"""What roles say to each other: message kinds (also the MPI tags) and flags.

Pure Python, no torch or MPI, so scheme specs can declare their routes in these words where
config validation and ``mpisplit topology`` run (no torch, no MPI). ``mpisplit.transport``
puts them on the wire.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Kind(IntEnum):
    """What a message carries; also its MPI tag. The privacy policy is written in kinds."""

    ACTIVATION = 1
    GRADIENT = 2
    LABELS = 3
    WEIGHTS = 4
    CONTROL = 5


class Flag(IntFlag):
    NONE = 0
    EVAL = 1
    """Evaluation traffic: forward only, no gradient comes back."""
    LAST = 2
    """Marks the end of an evaluation pass (empty tensor)."""
    DONE = 4
    """The sender has finished all its steps (empty tensor)."""
    MORE = 8
    """More microbatches of the same step follow; the receiver accumulates before stepping."""
    TUPLE = 16
    """Another tensor of the same cut value follows (a cut that carries several tensors)."""
    RAW = 32
    """Sent as is, not through the compressor (a non-float cut tensor: an int mask)."""


Route = tuple[str, str, Kind]
"""(sender role, receiver role, kind): one kind of message a scheme lets one role send
another."""
