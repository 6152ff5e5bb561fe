"""Glue between the DreamCache core and ComfyUI's internals (model patcher, samplers, model management).

Imported only inside a ComfyUI process (the nodes, the trainer, the run command); the core never imports it.
"""
