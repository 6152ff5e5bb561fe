"""BuildFeatureCache: one frozen-model pass on the reference at timestep 1 with the empty prompt."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..dreamcache.comfy.cache_pass import build_feature_cache
from ..dreamcache.core.image import FIT_MODES
from .types import Adapter, Cache
from .validation import combo_check


class DreamCacheBuildFeatureCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheBuildFeatureCache",
            display_name="Build Feature Cache (DreamCache)",
            category="DreamCache",
            description="Runs the model once on the reference "
                        "(the subject on white) at timestep 1 with the empty prompt, adapters off, "
                        "and caches the inputs of the adapter's layers. "
                        "Do this once per subject; sampling then needs no reference pass.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (the one you sample with; LoRAs applied before this "
                                                "are fine)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the reference."),
                io.Image.Input("image", tooltip="The subject on a white background (use SubjectMask on an ordinary "
                                                "photo). "
                                                "A batch of images of one subject gives a multi-reference cache. Alpha "
                                                "is composited on white."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes the empty prompt \"\" for the pass (what the "
                                                             "adapters were trained with)."),
                Adapter.Input("adapter", tooltip="The adapter: it says which layers to cache."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the small noise added at timestep 1 (fixed so a cache is reproducible)."),
                io.Int.Input("resolution", default=512, min=0, max=4096, step=8,
                             tooltip="Side of the square the reference is fitted to (512 for SD1.5/2.1-base, 768 for "
                                     "2.1-768, 1024 for SDXL); 0 keeps its size."),
                io.Combo.Input("fit", options=list(FIT_MODES), default="pad",
                               tooltip="pad: keep the aspect, pad with white (what training saw); stretch: resize the "
                                       "whole picture "
                                       "(the reference inference script); crop: centre crop."),
                io.Combo.Input("batch_mode", options=["concat", "per_image"], default="concat",
                               tooltip="For several reference images: concat = every generated image attends to all of "
                                       "them; "
                                       "per_image = image i of a batch uses reference i."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional override of the empty prompt (the official inference scripts "
                                              "pass the negative prompt here)."),
            ],
            outputs=[
                Cache.Output(display_name="cache", tooltip="The feature cache of the subject; save it with "
                                                           "DreamCacheSave to reuse it."),
                io.Image.Output(display_name="reference", tooltip="The reference exactly as it was encoded (after "
                                                                  "fitting)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, fit="pad", batch_mode="concat"):
        return combo_check(cls, fit=fit, batch_mode=batch_mode)

    @classmethod
    def execute(cls, model, vae, image, adapter, seed=0, resolution=512, fit="pad", batch_mode="concat", clip=None,
                conditioning=None) -> io.NodeOutput:
        cache, pixels = build_feature_cache(model, vae, image, adapter, clip=clip, conditioning=conditioning, seed=seed,
                                            resolution=resolution, fit=fit, per_image=batch_mode == "per_image")
        logging.info(cache.describe())
        return io.NodeOutput(cache, pixels)
