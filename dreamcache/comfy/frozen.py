"""The frozen parts of training, in one place: what the VAE, the text encoder and the frozen U-Net compute for a
training sample (none of it depends on the adapters). The trainer (:mod:`dreamcache.apps.train.loop`) calls these
every step; ``python -m dreamcache.data precompute`` (:mod:`dreamcache.apps.data.precompute`) calls the same
functions once per item and stores the results, so a precomputed run sees the numbers a live run computes.

* :meth:`FrozenParts.encode_pixels`: pictures (B, H, W, 3) in 0..1 -> VAE latents with ``process_latent_in``;
* :meth:`FrozenParts.encode_text`: captions -> context (lengths over 77 tokens repeated to a common length) and
  pooled outputs; :meth:`FrozenParts.vector_cond`: SDXL's ``y`` from pooled + size / crop (None for SD1/SD2);
* :meth:`FrozenParts.build_cache`: the reference latents noised at DDPM t=1, empty prompt, adapters off, the
  inputs of the adapter layers' SpatialTransformers captured per image (the pass stops there).
"""
from __future__ import annotations

import hashlib
import math
import weakref
from contextlib import nullcontext

import torch

from ..core.cache import FeatureCache, from_captures
from ..core.capture import run_and_capture

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto``: bf16 on a CUDA GPU that has it, fp16 on older ones, fp32 on the CPU; other values as they are."""
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lcm_stack(conds: list[torch.Tensor]) -> torch.Tensor:
    """Contexts of different token lengths (captions over 77 tokens) repeated to a common length, as ComfyUI does."""
    lengths = [c.shape[1] for c in conds]
    if len(set(lengths)) == 1:
        return torch.cat(conds)
    m = lengths[0]
    for n in lengths[1:]:
        m = m * n // math.gcd(m, n)
    return torch.cat([c.repeat(1, m // c.shape[1], 1) for c in conds])


class FrozenParts:
    """The frozen VAE, text encoder and U-Net of a ComfyUI checkpoint (``model`` a ModelPatcher) as training uses
    them. ``autocast_dtype``: run the U-Net under autocast in that dtype (None: plain)."""

    def __init__(self, model, clip, vae, device, family: str, autocast_dtype=None):
        self.model, self.clip, self.vae = model, clip, vae
        self.device = torch.device(device)
        self.family = family
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.ms = model.get_model_object("model_sampling")
        self.autocast_dtype = autocast_dtype
        self.compute_dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        self._empty = None

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def ensure_loaded(self):
        import comfy.model_management as mm

        mm.load_models_gpu([self.model], force_full_load=True)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, list]:
        conds, pooled = [], []
        for c in captions:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(c), return_pooled=True)
            conds.append(cond.float())
            pooled.append(pool)
        return lcm_stack(conds), pooled

    def empty_prompt(self):
        if self._empty is None:
            self._empty = self.encode_text([""])
        return self._empty

    def vector_cond(self, pooled: list, geometry: list | None, size: int) -> torch.Tensor | None:
        """SDXL's ``y``: pooled text embedding + size / crop embeddings (None for SD1/SD2). ``geometry``: per
        sample an object with ``original_width``, ``original_height``, ``crop_left``, ``crop_top`` (None: the
        square ``size``, uncropped)."""
        if self.base.adm_channels == 0:
            return None
        ys = []
        for i, pool in enumerate(pooled):
            g = geometry[i] if geometry else None
            ow, oh = (g.original_width, g.original_height) if g is not None else (size, size)
            cl, ct = (g.crop_left, g.crop_top) if g is not None else (0, 0)
            ys.append(self.base.encode_adm(pooled_output=pool, width=ow, height=oh, crop_w=cl, crop_h=ct,
                                           target_width=size, target_height=size, device=self.device))
        return torch.cat(ys).to(self.device, torch.float32)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(self.vae.encode(pixels[..., :3]).float()).to(self.device)

    def unet_call(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y,
                  transformer_options: dict) -> torch.Tensor:
        """The raw U-Net output (eps or v) at ComfyUI sigma ``sigma`` for the noisy latent ``x``."""
        xc = self.ms.calculate_input(sigma, x).to(self.compute_dtype)
        ts = self.ms.timestep(sigma).float()
        kw = {} if y is None else {"y": y.to(self.compute_dtype)}
        return self.unet(xc, ts, context=context.to(self.compute_dtype), transformer_options=transformer_options, **kw)

    @torch.no_grad()
    def build_cache(self, ref_latents: torch.Tensor, ref_noise: torch.Tensor, layers, resolution: int
                    ) -> FeatureCache:
        """Per-image cache: the reference latents noised at t=1, empty prompt, adapters off, pass stopped early."""
        b = ref_latents.shape[0]
        sigma1 = self.ms.sigma(torch.ones(b, device=self.device))
        x = ref_latents + sigma1.view(-1, 1, 1, 1) * ref_noise
        ctx, pooled = self.empty_prompt()
        y = self.vector_cond(pooled * b, None, resolution)
        modules = {r.module: self.unet.get_submodule(r.module) for r in layers}
        with self.autocast():
            got = run_and_capture(modules, lambda: self.unet_call(x, sigma1, ctx.repeat(b, 1, 1).to(self.device), y,
                                                                  {}))
        return from_captures({r: got[r.module] for r in layers}, per_image=True, model_family=self.family,
                             sigma=float(sigma1[0]))


_FINGERPRINTS: dict = {}


def weights_fingerprint(*modules) -> str:
    """SHA-256 (hex) of the weights of ``modules`` (names, dtypes, shapes and bytes of every parameter and buffer, in
    name order): the same checkpoint gives the same value whatever its file is called or where it lies. It is not
    the checkpoint file's own SHA-256 (a checkpoint loads the same from .ckpt and .safetensors). Remembered per
    process while no tensor is replaced or changed in place (storage and torch's version counter are the key)."""
    tensors = [(i, name, t) for i, m in enumerate(modules) if m is not None
               for name, t in sorted(m.state_dict(keep_vars=True).items()) if isinstance(t, torch.Tensor)]
    key = tuple((i, name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for i, name, t in tensors)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    for i, name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    _FINGERPRINTS.clear()  # one checkpoint at a time is what a process trains or precomputes
    _FINGERPRINTS[key] = digest
    for m in modules:  # freed modules' memory may be reused by another model: forget the entry with them
        if m is not None:
            weakref.finalize(m, _FINGERPRINTS.pop, key, None)
    return digest


def checkpoint_fingerprint(model, clip, vae) -> str:
    """:func:`weights_fingerprint` of the U-Net, the text encoder and the VAE of a loaded checkpoint."""
    return weights_fingerprint(model.model.diffusion_model, getattr(clip, "cond_stage_model", None),
                               getattr(vae, "first_stage_model", None))
