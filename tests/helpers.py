"""Helpers for the ComfyUI integration tests."""
from __future__ import annotations

import os

import pytest

#: Where ComfyUI computes in the integration tests: "cpu" (default, ComfyUI started with --cpu) or "cuda"
#: (DREAMCACHE_TEST_DEVICE=cuda: ComfyUI picks the GPU as for a user, with TF32 off so parity holds at 1e-5).
TEST_DEVICE = os.environ.get("DREAMCACHE_TEST_DEVICE", "cpu").strip().lower() or "cpu"
ON_GPU = TEST_DEVICE != "cpu"


def cpu_only(why: str):
    """Marks a test that asserts behaviour of ComfyUI on a CPU; on a GPU run it is skipped with the reason."""
    return pytest.mark.skipif(ON_GPU, reason=f"asserts CPU-only behaviour ({why}); this run computes on {TEST_DEVICE}")


def node(node_id: str):
    """A registered node class by id (ComfyUI's NODE_CLASS_MAPPINGS, plus core extras loaded on demand)."""
    import nodes

    if node_id not in nodes.NODE_CLASS_MAPPINGS:
        load_core_extras()
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def load_core_extras(names=("nodes_custom_sampler.py", "nodes_hypertile.py", "nodes_model_advanced.py",
                            "nodes_mask.py", "nodes_differential_diffusion.py")):
    """Register a few of ComfyUI's comfy_extras node modules (the ones the tests combine with ours)."""
    import asyncio
    import os

    import nodes

    extras = os.path.join(os.path.dirname(nodes.__file__), "comfy_extras")
    for n in names:
        asyncio.run(nodes.load_custom_node(os.path.join(extras, n), module_parent="comfy_extras"))


def run_node(node_id: str, **kwargs):
    """Execute a node as ComfyUI does (class clone, inference mode) and return its outputs tuple."""
    import torch

    cls = node(node_id)
    with torch.inference_mode():
        if hasattr(cls, "PREPARE_CLASS_CLONE"):  # V3 node
            out = cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**kwargs)
            return out.args
        return getattr(cls(), cls.FUNCTION)(**kwargs)  # V1 node


def denoise_once(model, x, sigma, positive, negative=None, switch=None, extra_model_options=None):
    """One model evaluation through ComfyUI's sampling path (guider -> calc_cond_batch -> wrappers -> patches).

    ``x`` is the noisy latent in ComfyUI's sigma space, ``sigma`` a float or a per-sample tensor. Returns the
    denoised prediction of the positive cond (and of the negative if given, evaluated in the same call).
    """
    import comfy.samplers
    import torch

    from dreamcache.comfy.guidance import PositiveOnlyGuider

    conds = {"positive": positive}
    if negative is not None:
        conds["negative"] = negative
    sig = torch.as_tensor(sigma, dtype=torch.float32)
    if sig.dim() == 0:
        sig = sig.repeat(x.shape[0])

    class OneCall(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_wrap(noise, sig.to(noise.device), **extra_args)
            return noise

    to = dict((extra_model_options or {}).get("transformer_options", {}))
    if switch is not None:
        to["dreamcache_image"] = tuple(switch)
    g = PositiveOnlyGuider(model, keys=["positive"] + (["negative"] if negative is not None else []),
                           transformer_options=to)
    g.inner_set_conds(conds)
    with torch.inference_mode():
        g.sample(x, torch.zeros_like(x), OneCall(), torch.tensor([float(sig.max()), 0.0]), disable_pbar=True, seed=0)
    out = [o.cpu() for o in g.last]
    return out if negative is not None else out[0]


def eps_from_denoised(x, denoised, sigma):
    import torch

    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return (x - denoised) / s


def cond(tensor, **extra):
    """A CONDITIONING list with one entry."""
    return [[tensor, dict(extra)]]


def random_adapter(core, model, seed: int = 0, layers=None, family=None, scale: float = 1.0):
    """An AdapterFile with seeded random weights that fits ``model`` (default: the family's layer set)."""
    import torch

    fam = family or core.comfy.model.model_family(model)
    layers = layers or core.core.layers.default_layers(fam)
    channels = {ref: core.comfy.model.model_channels_at(model, ref) for ref in layers}
    module = core.core.adapter.DreamCacheAdapter(channels)
    module.reset_reference_init(seed)
    if scale != 1.0:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale)
    return core.core.adapter_io.adapter_file_of(module, fam, name=f"random-{fam}-{seed}")


def prompt_executor(server):
    """ComfyUI's execution.PromptExecutor with the classic cache, on 0.3.x (cache_size) and 0.33+ (cache_args, whose
    execute reads cache_args["ram"] and ["ram_inactive"]; 0 = no RAM-pressure headroom, as main.py passes for the
    classic cache)."""
    import inspect

    import execution

    params = inspect.signature(execution.PromptExecutor).parameters
    if "cache_args" in params:
        return execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server)


def is_picture(path) -> bool:
    """A saved image that shows something: not one flat colour (a NaN latent decodes to NaN pixels, which SaveImage
    writes as a flat black image) and not nearly so."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    return bool(np.isfinite(pixels).all() and pixels.std() > 2.0)
