"""The role code of each split-learning configuration (and baseline): what its ranks run.

Everything else about a scheme (layout, cuts, routes, options, checkpoints, runners) is
declared by its spec, ``mpisplit.specs.<name>``. The other modules here are the parts the
schemes share (turns, serving, relays, sending, evaluation, averaging, ...); the step loop
itself is ``mpisplit.driver``.
"""
