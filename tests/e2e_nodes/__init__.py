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


class DreamCacheTestBrokenCheckpoint:
    """A tiny checkpoint with one part NaN, as when part of a real checkpoint did not load (ComfyUI then runs
    uninitialised weights and logs 'clip missing:' / 'unet missing:' / 'Missing VAE keys')."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd1", "sd2"], {"tooltip": "tiny model family"}),
                             "broken": (["clip", "vae", "unet_out"], {"tooltip": "which part holds NaN weights"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    DESCRIPTION = "Tiny random-weight checkpoint with NaN weights in one part, for tests."

    def load(self, family, broken):
        def build():
            import torch

            model, clip, vae = (tiny_models.make_model(family, seed=0), tiny_models.make_clip(family, seed=1),
                                tiny_models.make_vae(seed=2))
            part = {"clip": clip.cond_stage_model, "vae": vae.first_stage_model,
                    "unet_out": model.model.diffusion_model.out}[broken]
            with torch.no_grad():
                for p in part.parameters():
                    p.fill_(float("nan"))
            return model, clip, vae

        return _cached(("broken", family, broken), build)


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


# ---- memory tests (issue 26): weak references to the pack's objects, read back over HTTP --------------------------

_TRACKED = []  # (tag, label, weakref)


def _track(tag, label, obj):
    import weakref

    try:
        _TRACKED.append((tag, label, weakref.ref(obj)))
    except TypeError:
        pass


class DreamCacheTestTrack:
    """Keeps weak references to what the pack holds for a patched MODEL (the patch, its adapters and their
    ModelPatchers, the K/V and folded-weight memos) and a SAM; GET /dreamcache_test/alive lists those still alive."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "Apply DreamCache's MODEL"}),
                             "latent": ("LATENT", {"tooltip": "the sampler's output (so this runs after it)"}),
                             "tag": ("STRING", {"default": "run", "tooltip": "a name for this prompt's objects"})},
                "optional": {"sam": ("DREAMCACHE_SAM", {"tooltip": "a SAM to track"})}}

    RETURN_TYPES = ()
    FUNCTION = "track"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"
    DESCRIPTION = "Weak references to the pack's objects, for the memory tests."

    def track(self, model, latent, tag, sam=None):
        patch = _pack_module("dreamcache.comfy.apply_patch").find_patch(model)
        _track(tag, "patch", patch)
        for i, e in enumerate(patch.entries):
            _track(tag, f"adapter{i}", e.adapter)
            for j, p in enumerate(e.adapter.parameters()):
                if j == 0:
                    _track(tag, f"adapter{i}.weight", p)
        for i, mp in enumerate(patch.models_list):
            _track(tag, f"adapter_patcher{i}", mp)
        for memo in ("_kv", "_folded"):
            for i, tensors in enumerate(getattr(patch, memo).values()):
                for j, t in enumerate(tensors):
                    _track(tag, f"{memo}{i}.{j}", t)
        if sam is not None:
            _track(tag, "sam", sam)
            _track(tag, "sam_module", sam.patcher.model.sam)
        counts = {memo: len(getattr(patch, memo)) for memo in ("_kv", "_folded")}
        return {"ui": {"tracked": [json_safe(counts)]}}


def json_safe(d):
    return {k: int(v) for k, v in d.items()}


class DreamCacheTestFreshSAM:
    """A tiny SAM built anew on each run (not kept by this test pack), so only ComfyUI's cache holds it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 123, "min": 0, "max": 1000, "tooltip": "weight seed"})}}

    RETURN_TYPES = ("DREAMCACHE_SAM",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    DESCRIPTION = "Tiny random-weight SAM for tests, not cached by the test pack."

    def load(self, seed):
        import tiny_sam

        return (_pack_module("dreamcache.comfy.sam").wrap_sam(tiny_sam.make_tiny_sam(seed=seed), "tiny", "tiny-sam"),)


def _register_routes():
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/dreamcache_test/alive")
    async def alive(request):
        import gc

        gc.collect()
        tag = request.rel_url.query.get("tag")
        out = [[t, label] for t, label, ref in _TRACKED if ref() is not None and (tag is None or t == tag)]
        return web.json_response({"alive": out, "tracked": len(_TRACKED)})


_register_routes()

NODE_CLASS_MAPPINGS["DreamCacheTestTrack"] = DreamCacheTestTrack
NODE_CLASS_MAPPINGS["DreamCacheTestBrokenCheckpoint"] = DreamCacheTestBrokenCheckpoint
NODE_CLASS_MAPPINGS["DreamCacheTestFreshSAM"] = DreamCacheTestFreshSAM
