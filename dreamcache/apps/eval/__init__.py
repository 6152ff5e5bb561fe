"""``python -m dreamcache.eval``: DreamBench evaluation (protocol, metrics, generation through the nodes' functions,
tables and grids). :mod:`.protocol` and :mod:`.report` need neither ComfyUI nor the metric models."""
