"""The personalised sampling pipeline, written once: reference IMAGE -> BuildFeatureCache -> ApplyDreamCache
(:func:`personalise`) -> DreamCacheGuider -> ComfyUI's sampling (:func:`sample`) -> VAE decode.

Who uses what: DualGuidanceSampler runs :func:`sample_dual_guidance` (guide + sample); the evaluation
(:mod:`dreamcache.apps.eval.generate`) runs :func:`personalise` once per subject and :func:`render` per prompt;
the trainer's previews and ``benchmarks/eval_speed.py`` run the whole of it, :func:`personalised_images`.

The sampling plumbing is ComfyUI's own: the sigmas of ``comfy.samplers.KSampler`` (so denoise and each sampler's
rules apply as in KSampler), ``comfy.sample``'s noise and empty-latent channels, the guider's ``sample`` and
``latent_preview``'s callback.
"""
from __future__ import annotations

import torch

from ..core.adapter_io import AdapterFile
from .apply_patch import apply_dreamcache
from .cache_pass import build_feature_cache
from .guidance import make_guider


def personalise(model, vae, clip, image: torch.Tensor, adapter: AdapterFile, resolution: int, seed: int = 0,
                strength: float = 1.0):
    """BuildFeatureCache (the reference padded to ``resolution``, empty prompt) + ApplyDreamCache. Returns the
    patched clone of ``model`` and the reference IMAGE the cache pass saw."""
    cache, pixels = build_feature_cache(model, vae, image, adapter, clip=clip, seed=seed, resolution=resolution,
                                        fit="pad")
    return apply_dreamcache(model, adapter, cache, strength=strength), pixels


def sigmas_for(model, steps: int, sampler_name: str, scheduler: str, denoise: float = 1.0) -> torch.Tensor:
    """KSampler's noise levels for these settings (empty when ``denoise`` is 0)."""
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas


def empty_latent(model, size: int) -> torch.Tensor:
    """EmptyLatentImage of one ``size`` x ``size`` picture, with the model's latent channels."""
    import comfy.sample

    return comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, size // 8, size // 8]))


def seeded_noise(latent: torch.Tensor, seeds) -> torch.Tensor:
    """One picture's noise per seed, stacked: what a batch of single KSampler runs would draw."""
    import comfy.sample

    return torch.cat([comfy.sample.prepare_noise(latent, int(seed)) for seed in seeds])


def sample(guider, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, sampler_name: str, seed: int,
           noise_mask=None, previews: bool = False) -> torch.Tensor:
    """Run ``guider`` with ComfyUI's sampler ``sampler_name`` over ``sigmas``; the denoised latent on ComfyUI's
    intermediate device. ``previews``: the UI's step previews and progress bar (the nodes); off for the
    applications."""
    import comfy.model_management
    import comfy.samplers
    import comfy.utils

    callback = None
    if previews:
        import latent_preview

        callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas, denoise_mask=noise_mask,
                        callback=callback, disable_pbar=not (previews and comfy.utils.PROGRESS_BAR_ENABLED),
                        seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def sample_dual_guidance(model, positive, negative, latent: dict, seed: int, steps: int, sampler_name: str,
                         scheduler: str, denoise: float = 1.0, text_scale: float = 7.5, image_scale: float = 5.0,
                         mode: str = "combined") -> dict:
    """DualGuidanceSampler: a KSampler whose guider is :class:`~.guidance.DreamCacheGuider`. Returns the output
    LATENT dict (a copy of ``latent``)."""
    import comfy.sample

    guider = make_guider(model, positive, negative, text_scale, image_scale, mode)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = sigmas_for(model, steps, sampler_name, scheduler, denoise)
    out = latent.copy()
    if sigmas.shape[-1] == 0:
        return out
    out["samples"] = sample(guider, samples, noise, sigmas, sampler_name, seed, latent.get("noise_mask"),
                            previews=True)
    out.pop("downscale_ratio_spacial", None)
    return out


def render(guider, vae, size: int, seeds, steps: int, sampler_name: str, scheduler: str) -> torch.Tensor:
    """Text-to-image with any guider: one ``size``² picture per seed in one sampler call, VAE-decoded to an IMAGE
    ``[N, H, W, 3]``."""
    model = guider.model_patcher
    latent = empty_latent(model, size)
    noise = seeded_noise(latent, seeds)
    sigmas = sigmas_for(model, steps, sampler_name, scheduler)
    with torch.inference_mode():
        out = sample(guider, latent.repeat(len(seeds), 1, 1, 1), noise, sigmas, sampler_name, int(seeds[0]))
        pixels = vae.decode(out)
    return pixels.reshape(-1, *pixels.shape[-3:])


def personalised_images(model, clip, vae, reference: torch.Tensor, adapter: AdapterFile, prompt: str, size: int,
                        seeds=(0,), steps: int = 30, sampler_name: str = "ddim", scheduler: str = "ddim_uniform",
                        text_scale: float = 7.5, image_scale: float = 5.0, mode: str = "combined",
                        strength: float = 1.0, negative: str = "", cache_seed: int = 0) -> torch.Tensor:
    """The whole pipeline: the subject's reference IMAGE and a prompt in, one IMAGE per seed out (the nodes'
    BuildFeatureCache -> ApplyDreamCache -> CLIPTextEncode -> DualGuidanceSampler -> VAEDecode)."""
    with torch.inference_mode():
        patched, _ = personalise(model, vae, clip, reference, adapter, size, seed=cache_seed, strength=strength)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
        guider = make_guider(patched, pos, neg, text_scale, image_scale, mode)
    return render(guider, vae, size, seeds, steps, sampler_name, scheduler)
