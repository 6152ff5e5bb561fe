"""Test-only ComfyUI nodes (never shipped): tiny random-weight models for the end-to-end server tests.

The e2e tests link this folder into a temporary ComfyUI base directory's custom_nodes and swap the shipped
workflows' real loaders (CheckpointLoaderSimple, ControlNetLoader, ...) for these nodes, so the workflows run
on a CPU in seconds with no weight files.
"""
import os
import sys

# tests/ (tiny_models), through the symlink
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import tiny_models  # noqa: E402

_CACHE = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


class DreamCacheTestTinyCheckpoint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd1", "sd2", "sdxl", "sd2_inpaint"],
                                        {"tooltip": "tiny model family (sd2_inpaint: 9-channel inpainting U-Net)"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "weight seed"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    DESCRIPTION = "Tiny random-weight checkpoint for tests."

    def load(self, family, seed):
        inpaint = family.endswith("_inpaint")
        family = family.removesuffix("_inpaint")
        return _cached(("ckpt", family, inpaint, seed), lambda: (tiny_models.make_model(family, seed=seed,
                                                                                         inpaint=inpaint),
                                                        tiny_models.make_clip(family, seed=seed + 1),
                                                        tiny_models.make_vae(seed=seed + 2)))


class DreamCacheTestTinyControlNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd1", "sd2"], {"tooltip": "tiny model family"})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    DESCRIPTION = "Tiny random-weight ControlNet for tests."

    def load(self, family):
        return (_cached(("cn", family), lambda: tiny_models.make_controlnet(family)),)


def _pack_module(name: str):
    """A submodule of the DreamCache pack as this server loaded it (so its types are the ones the nodes check)."""
    import importlib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and os.path.realpath(f) == os.path.join(root, "__init__.py") and hasattr(mod, "comfy_entrypoint"):
            return importlib.import_module(f"{mod.__name__}.{name}")
    raise RuntimeError("the DreamCache pack is not loaded in this server")


class DreamCacheTestTinySAM:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 123, "min": 0, "max": 1000, "tooltip": "weight seed"})}}

    RETURN_TYPES = ("DREAMCACHE_SAM",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    DESCRIPTION = "Tiny random-weight SAM for tests."

    def load(self, seed):
        import tiny_sam

        glue = _pack_module("dreamcache.comfy.sam")
        return (_cached(("sam", seed), lambda: glue.wrap_sam(tiny_sam.make_tiny_sam(seed=seed), "tiny", "tiny-sam")),)


NODE_CLASS_MAPPINGS = {
    "DreamCacheTestTinySAM": DreamCacheTestTinySAM,
    "DreamCacheTestTinyCheckpoint": DreamCacheTestTinyCheckpoint,
    "DreamCacheTestTinyControlNet": DreamCacheTestTinyControlNet,
}
