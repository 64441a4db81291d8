"""mpisplit: split learning (SplitNN) across MPI ranks."""

__version__ = "0.1.0"
