"""``python -m dreamcache.train``: training DreamCache adapters, one module per concern:

* :mod:`.config`: the run configuration, checkpoint naming, the resumable state, the command line's parser;
* :mod:`.batch`: the global batch and each rank's batch size / accumulation;
* :mod:`.loop`: the :class:`~.loop.Trainer` (loss, optimizer step, checkpoints, previews, loss CSV);
* :mod:`.parallel`: data-parallel plumbing (torchrun setup, the step's all-reduce, each rank's DataLoader);
* :mod:`.evaluation`: DreamBench scores during training (``--eval-every``) through :mod:`dreamcache.apps.eval`;
* :mod:`.cli`: the command.

The configuration names this package held as one module (``from dreamcache.apps.train import TrainConfig``) still
resolve, with a DeprecationWarning (:mod:`dreamcache._aliases`).
"""
from ..._aliases import moved_attributes

__getattr__ = moved_attributes(__name__)
