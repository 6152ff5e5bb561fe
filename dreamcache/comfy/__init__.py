"""Glue between the DreamCache core and ComfyUI's internals (model patcher, samplers, model management).

Imported only inside a ComfyUI process (the nodes, the applications); it imports :mod:`dreamcache.core` only.
"""
