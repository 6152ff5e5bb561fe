"""Loading a base checkpoint for scripts (trainer, dataset synthesis) with ComfyUI's own loader."""
from __future__ import annotations

import os

import torch

from ..core.errors import DreamCacheError
from ..core.layers import FAMILIES
from .model import FAMILY_NAMES, model_family


def check_supported(model, name: str = "the model") -> str:
    """The family of a loaded model, or one clear error if it is not an SD1.x / SD2.x / SDXL U-Net with an eps or
    v objective."""
    import comfy.model_base
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    family = model_family(model)
    base = getattr(model, "model", None)
    if family not in FAMILIES or not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        kind = type(getattr(base, "model_config", base)).__name__
        raise DreamCacheError(
            f"'{name}' is a {kind} model, not a supported U-Net (SD1.x, SD2.x or SDXL); train DreamCache adapters on "
            "one of those checkpoints.")
    extra_inputs = getattr(base.diffusion_model, "in_channels", 4) != base.latent_format.latent_channels
    if extra_inputs or getattr(base, "concat_keys", ()) or (family != "sdxl" and getattr(base, "adm_channels", 0)):
        raise DreamCacheError(
            f"'{name}' is an inpainting, instruct or unCLIP variant with extra inputs; train DreamCache adapters on a "
            "plain text-to-image checkpoint.")
    if base.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise DreamCacheError(f"'{name}' uses the {base.model_type.name} objective; the trainer supports eps and "
                              "v-prediction models.")
    return family


def load_checkpoint(path: str, dtype: torch.dtype | None = None):
    """``(model, clip, vae)`` of a full checkpoint through ``comfy.sd.load_checkpoint_guess_config``."""
    import comfy.sd

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DreamCacheError(f"Checkpoint '{path}' does not exist; pass a .safetensors or .ckpt SD1.x / SD2.x / SDXL "
                              "checkpoint.")
    model_options = {"dtype": dtype} if dtype is not None else {}
    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    model_options=model_options)
    except Exception as e:  # ComfyUI raises RuntimeError for undetectable files, others for damaged ones
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DreamCacheError(f"'{name}' could not be loaded as a Stable Diffusion checkpoint ({first}); pass an "
                              "SD1.x, SD2.x or SDXL checkpoint.") from None
    model, clip, vae = out[0], out[1], out[2]
    if model is None:
        raise DreamCacheError(f"'{name}' holds no diffusion model; pass a full SD1.x, SD2.x or SDXL checkpoint.")
    family = check_supported(model, name)
    if clip is None or vae is None or getattr(vae, "first_stage_model", None) is None:
        raise DreamCacheError(
            f"'{name}' is a bare {FAMILY_NAMES[family]} U-Net without text encoder or VAE; pass a full checkpoint "
            "(U-Net, CLIP and VAE in one file).")
    return model, clip, vae
