"""The role code of each split-learning configuration (and baseline): what its ranks run.

Everything else about a scheme (layout, cuts, routes, options, checkpoints, runners) is
declared by its spec, ``mpisplit.specs.<name>``; ``common.py`` holds the loops the schemes
share.
"""
