"""DreamCache: finetuning-free personalised generation by feature caching (CVPR 2025), as a library.

The framework-light core of the ComfyUI-DreamCache pack: tensors in, tensors out. ComfyUI-specific glue
lives in :mod:`dreamcache.comfy` (imported only inside ComfyUI) and in the pack's ``nodes/``.
"""
__version__ = "0.1.0"
