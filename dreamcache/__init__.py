"""DreamCache: finetuning-free personalised generation by feature caching (CVPR 2025).

Three layers, imports going one way only (``apps -> comfy -> core``), see docs/architecture.md:

* :mod:`dreamcache.core`: the method, tensors in and tensors out (torch, safetensors); no ComfyUI.
* :mod:`dreamcache.comfy`: the glue to ComfyUI's model patcher, samplers and model management.
* :mod:`dreamcache.apps`: applications built on both (command lines, headless runner, data synthesis, training).
"""
__version__ = "0.1.0"

from . import _aliases

_aliases.install(__name__)
