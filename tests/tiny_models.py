"""Tiny random-weight SD1 / SD2 / SDXL models built from ComfyUI's own classes (no weight files).

Real block layout and real code paths (model patcher, samplers, VAE, CLIP tokenizer), ~10M parameters at 32
channels, deterministic weights from a seeded generator. Used by the integration tests and by the e2e test's
test-only loader node. Needs ComfyUI importable.
"""
from __future__ import annotations

import json
import logging

import torch

_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                                1][::-1],
    "transformer_depth_middle": 1, "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONTEXT_DIM = {"sd1": 32, "sd2": 48, "sdxl": 64}
SDXL_POOLED = 32  # clip_g projection; SDXL adds 6 x 256 size embeddings to it for the y vector


def unet_config(family: str) -> dict:
    cfg = dict(_COMMON)
    if family == "sd1":
        cfg.update(context_dim=32, use_linear_in_transformer=False, adm_in_channels=None, num_heads=8,
                   num_head_channels=-1)
    elif family == "sd2":
        cfg.update(context_dim=48, use_linear_in_transformer=True, adm_in_channels=None, num_heads=-1,
                   num_head_channels=16)
    elif family == "sdxl":
        cfg.update(context_dim=64, use_linear_in_transformer=True, adm_in_channels=SDXL_POOLED + 1536,
                   num_classes="sequential", num_heads=-1, num_head_channels=16,
                   channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                   transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2)
    else:
        raise ValueError(family)
    return cfg


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, scale: float = 1.0):
    """Deterministic weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for matrices, small values for vectors,
    norms near 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * scale / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def model_config(family: str, unet: dict | None = None, dtype=torch.float32):
    import comfy.supported_models as sm

    cls = {"sd1": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family]
    cfg = cls(unet or unet_config(family))
    # no extra config (SD2's 64-channel heads would not fit 32 channels)
    cfg.unet_config = dict(unet or unet_config(family))
    cfg.set_inference_dtype(dtype, None)
    return cfg


def make_model(family: str = "sd1", seed: int = 0, dtype=torch.float32, unet: dict | None = None,
               v_prediction: bool = False, inpaint: bool = False):
    """A ModelPatcher around a tiny BaseModel / SDXL of the family (weights seeded). ``inpaint``: the 9-channel
    inpainting variant, set up as ComfyUI's loader does (``set_inpaint``: concat keys "mask", "masked_image")."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    if inpaint:
        unet = {**(unet or unet_config(family)), "in_channels": 9}
    cfg = model_config(family, unet, dtype)
    mtype = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    if family == "sdxl":
        model = comfy.model_base.SDXL(cfg, model_type=mtype, device=torch.device("cpu"))
    else:
        model = comfy.model_base.BaseModel(cfg, model_type=mtype, device=torch.device("cpu"))
    if inpaint:
        model.set_inpaint()
    seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.requires_grad_(False)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_clip(family: str = "sd1", seed: int = 1):
    """A tiny CLIP-L-shaped text encoder whose hidden size is the family's context dim (SDXL: L + G, pooled)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    hidden = CONTEXT_DIM[family]
    small = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 2, "num_hidden_layers": 2,
             "projection_dim": hidden}
    if family == "sdxl":
        # SDXL concatenates L (768 in the real model) and G; here L and G each give half of the context.
        half = {**small, "hidden_size": hidden // 2, "intermediate_size": hidden, "projection_dim": hidden // 2,
                "num_hidden_layers": 3}
        opts = {"clip_l_model_config": half, "clip_g_model_config": {**half, "projection_dim": SDXL_POOLED}}
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        opts = {"clip_l_model_config": small}
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options=opts)
    seeded_init_(clip.cond_stage_model, seed, scale=0.5)
    clip.cond_stage_model.requires_grad_(False)
    return clip


def make_vae(seed: int = 2):
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI lists every (deliberately) missing VAE key
    try:
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    finally:
        logging.getLogger().setLevel(level)
    seeded_init_(vae.first_stage_model, seed)
    vae.first_stage_model.requires_grad_(False)
    return vae


def golden_model(path: str, dtype=torch.float32):
    """The golden fixture's U-Net in a ComfyUI SD2-layout BaseModel (weights loaded strictly)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["comfy_unet_config"])
        sd = {k[len("unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
    patcher = make_model("sd2", unet=cfg, dtype=dtype)
    patcher.model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return patcher


def make_controlnet(family: str = "sd1", seed: int = 7):
    """A tiny ControlNet (ComfyUI's cldm module) matching the tiny U-Net of the family, seeded (non-zero convs)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    cfg = unet_config(family)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
               device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**cfg)
    seeded_init_(control_model, seed, scale=2.0)
    control_model.requires_grad_(False)
    return comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device(), manual_cast_dtype=None)
