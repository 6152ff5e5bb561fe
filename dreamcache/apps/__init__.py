"""Applications of the pack built on the core and the ComfyUI glue, one folder per application:

* :mod:`.run`: ``python -m dreamcache`` (convert, info, run) and the headless workflow runner;
* :mod:`.data`: training data (dataset layout, augmentations, loader, synthesis and its sharding);
* :mod:`.eval`: ``python -m dreamcache.eval``, DreamBench evaluation;
* :mod:`.train`: ``python -m dreamcache.train``, the trainer (with evaluation during training, through eval);

with what they share beside them: :mod:`.commands` (one-line errors of every command), :mod:`.launcher` (what
torchrun told this process), :mod:`.progress`. Imports between the folders go one way, ``train -> eval -> data``
(``run`` stands alone), and only to public names (tests/import_graph.py, docs/architecture.md).
"""
