"""The DreamCache method, framework-light: tensors in, tensors out.

Imports torch, safetensors, numpy and PIL only; never ComfyUI, :mod:`dreamcache.comfy` or :mod:`dreamcache.apps`.
"""
