"""mpisplit: split learning (SplitNN) across MPI ranks."""

import os

# Large CPU tensors (cut activations and gradients of 2 MiB and up) in transparent huge
# pages: MPI's shared-memory single copy (CMA) pins the pages it reads, and with 2 MiB pages
# it moves 16-64 MiB twice as fast (tools/bench_transport.py). Torch reads this when it
# first allocates, so it applies wherever mpisplit is imported before tensors are made; set
# THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``mpisplit.train`` (``mpisplit.api.train``), imported on first use: the CLI's light
    commands do not pay for torch and MPI."""
    if name == "train":
        from mpisplit.api import train

        return train
    raise AttributeError(f"module 'mpisplit' has no attribute {name!r}")
