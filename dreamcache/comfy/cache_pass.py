"""BuildFeatureCache's one model pass: the reference latent noised to DDPM timestep 1, the empty prompt,
adapters off, the inputs of the adapter's SpatialTransformers captured, the rest of the U-Net skipped.

The pass goes through ComfyUI's own sampling machinery (a guider and a one-step sampler), so model loading,
LoRA and hook patches, SDXL's ``y`` vector, v-prediction and wrappers behave exactly as when sampling; only
ComfyUI's torch.compile wrapper (TorchCompileModel) is left out: compiling for one partial pass costs more than the
pass, and the capture hooks and the early stop would break the graph.
"""
from __future__ import annotations

import torch

from ..core.adapter_io import AdapterFile
from ..core.cache import FeatureCache, from_captures
from ..core.capture import StopPass, run_and_capture
from ..core.errors import DreamCacheError
from ..core.finite import check_cache_inputs, check_cache_pass
from ..core.hooks import DISABLE_KEY
from ..core.image import fit_reference
from .model import check_adapter_fits, model_family

#: Keys stripped from the cache pass's conditioning: it must be one plain, full-frame, always-on prompt.
_STRIP = ("control", "gligen", "area", "mask", "mask_strength", "set_area_to_bounds", "start_percent", "end_percent",
          "timestep_start", "timestep_end", "hooks", "strength", "control_apply_to_uncond",
          "concat_latent_image", "concat_mask", "concat_image", "noise_concat")


def pass_sigma(model) -> float:
    """ComfyUI sigma of DDPM timestep 1 in this model's own schedule (≈0.0413 for SD1/2/XL)."""
    return float(model.get_model_object("model_sampling").sigma(torch.tensor(1.0)))


def plain_conditioning(conditioning) -> list:
    """First entry of a CONDITIONING, without area/mask/ControlNet/timestep-range extras."""
    if not conditioning:
        raise DreamCacheError("The cache pass got an empty CONDITIONING; connect a text encode node or leave the input "
                              "empty.")
    tensor, extras = conditioning[0][0], dict(conditioning[0][1])
    for k in _STRIP:
        extras.pop(k, None)
    return [[tensor, extras]]


#: The extra input channels of ComfyUI's inpainting models (SD 1.x / 2.x / XL inpainting checkpoints, 9 channels).
INPAINT_CONCAT_KEYS = ("mask", "masked_image")


def extra_channels_conditioning(model, vae, conditioning: list, pixels: torch.Tensor) -> list:
    """The cache pass's conditioning for a model with extra input channels (docs/how-it-works.md, "Inpainting
    checkpoints"): an inpainting model gets a mask over everything and the fully masked (grey) image, which is what
    InpaintModelConditioning gives for a full mask and the state its painted area is in while sampling. A regular
    model's conditioning is returned as it is; any other kind of extra channels is one clear error."""
    base = model.model
    keys = tuple(getattr(base, "concat_keys", ()) or ())
    extra = int(base.model_config.unet_config.get("in_channels", 4)) - int(base.latent_format.latent_channels)
    if not keys and extra <= 0:
        return conditioning
    if keys != INPAINT_CONCAT_KEYS:
        raise DreamCacheError(
            f"This model takes extra input channels ({', '.join(keys) or f'{extra} channels'}) that the cache pass "
            "cannot feed; DreamCache works with regular and inpainting checkpoints (SD 1.x, 2.x, SDXL).")
    grey = torch.full((1, pixels.shape[1], pixels.shape[2], 3), 0.5, dtype=pixels.dtype, device=pixels.device)
    masked_image = vae.encode(grey)
    full_mask = torch.ones((1, pixels.shape[1], pixels.shape[2]), dtype=torch.float32)
    return [[t, {**extras, "concat_latent_image": masked_image, "concat_mask": full_mask}]
            for t, extras in conditioning]


def encode_empty_prompt(clip) -> list:
    if clip is None:
        raise DreamCacheError("BuildFeatureCache needs a CLIP to encode the empty prompt; connect the checkpoint's "
                              "CLIP or a conditioning.")
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def _one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
    try:
        model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
    except StopPass:
        pass
    return x


def run_capture_pass(model, latent: torch.Tensor, noise: torch.Tensor, sigma: float, conditioning, layers,
                     seed: int = 0) -> dict:
    """Run the model once at ``sigma`` on ``latent + sigma * noise`` (ComfyUI's noise scaling) and capture the
    inputs of ``diffusion_model.<layer.module>``. ``latent`` is a raw VAE latent (``process_latent_in`` is applied
    by the sampler). Returns ``{LayerRef: (B, C, H, W)}`` on the intermediate device."""
    import comfy.model_management
    import comfy.samplers
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    from .guidance import PositiveOnlyGuider

    m = model.clone()
    m.model_options["transformer_options"][DISABLE_KEY] = True
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)  # eager: see the module docstring
    modules = {}
    for ref in {r.module: r for r in layers}.values():
        try:
            modules[ref.module] = m.get_model_object(f"diffusion_model.{ref.module}")
        except (AttributeError, IndexError, KeyError):
            raise DreamCacheError(
                f"This model has no SpatialTransformer at {ref.module}; the adapter does not fit it.") from None
    guider = PositiveOnlyGuider(m)
    guider.inner_set_conds({"positive": conditioning})
    sigmas = torch.tensor([float(sigma), 0.0])
    sampler = comfy.samplers.KSAMPLER(_one_step)

    def run():
        guider.sample(noise, latent, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=True, seed=seed)

    got = run_and_capture(modules, run)
    dev = comfy.model_management.intermediate_device()
    return {ref: got[ref.module].to(dev) for ref in layers}


def build_feature_cache(model, vae, images: torch.Tensor, adapter: AdapterFile, clip=None, conditioning=None,
                        seed: int = 0,
                        resolution: int = 512, fit: str = "pad", per_image: bool = False) -> tuple[FeatureCache,
                                                                                                   torch.Tensor]:
    """The whole BuildFeatureCache: prepare the reference, VAE-encode it, one capture pass, pack the cache.
    Returns the cache and the prepared reference IMAGE (what the model saw)."""
    import comfy.sample

    if model is None or vae is None:
        raise DreamCacheError("BuildFeatureCache needs a MODEL and a VAE; connect the checkpoint loader's outputs.")
    check_adapter_fits(model, adapter)
    pixels = fit_reference(images, resolution=resolution, fit=fit)
    check_cache_inputs(pixels)
    latent = vae.encode(pixels[:, :, :, :3])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = plain_conditioning(conditioning) if conditioning is not None else encode_empty_prompt(clip)
    cond = extra_channels_conditioning(model, vae, plain_conditioning(cond), pixels)
    sigma = pass_sigma(model)
    captured = run_capture_pass(model, latent, noise, sigma, cond, adapter.layers, seed=seed)
    check_cache_pass(captured, latent, cond[0][0])  # a non-finite cache is never returned
    cache = from_captures(
        captured,
        per_image=per_image and pixels.shape[0] > 1,
        model_family=model_family(model),
        sigma=sigma,
        seed=int(seed),
        resolution=(int(pixels.shape[1]), int(pixels.shape[2])),
        conditioning="custom conditioning" if conditioning is not None else "empty prompt",
        adapter=adapter.name,
    )
    return cache, pixels
