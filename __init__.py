"""ComfyUI-DreamCache: finetuning-free subject personalisation by feature caching (CVPR 2025).

ComfyUI imports this file and calls ``comfy_entrypoint``. Nothing ComfyUI-specific is imported at module level,
so the package can be imported (and its core tested) without ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DreamCacheExtension

    return DreamCacheExtension()
