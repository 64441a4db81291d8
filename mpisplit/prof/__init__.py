"""Profiling of traced runs: ``mpisplit prof report RUN_DIR``.

``trace`` loads the per-rank Chrome traces and puts them on one clock, ``intervals`` is the
interval arithmetic every metric is built from, ``analysis`` computes the metrics, ``plots``
draws them and ``report`` writes ``profile.json``, ``trace-merged.json`` and the PNGs;
``measured`` takes per-client FLOPs and bytes from a run, to set beside ``mpisplit resources``.
"""
