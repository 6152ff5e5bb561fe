"""DreamCacheGuider (a GUIDER for SamplerCustomAdvanced) and DualGuidanceSampler (a KSampler with two scales)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..dreamcache.comfy.guidance import MODES, make_guider
from ..dreamcache.comfy.pipeline import sample_dual_guidance
from .validation import combo_check

_TEXT_TIP = "s_T: how strongly the prompt steers the image (like CFG). The reference runs use 7.5."
_IMAGE_TIP = ("s_I: how strongly the cached subject steers the image. The reference demo uses 5.0, its DreamBench runs "
              "0.4; "
              "lower keeps more of the prompt, higher copies more of the subject. Ignored in joint mode.")
_MODE_TIP = ("combined: e(∅,∅) + s_I·(e(img,∅) − e(∅,∅)) + s_T·(e(img,text) − e(img,∅)), three model calls per step; "
             "joint: one scale for both (s_T), two calls per step.")


def _scale_inputs():
    return [
        io.Float.Input("text_scale", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_TEXT_TIP),
        io.Float.Input("image_scale", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_IMAGE_TIP),
        io.Combo.Input("mode", options=list(MODES), default="combined", tooltip=_MODE_TIP),
    ]


class DreamCacheGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheGuider",
            display_name="DreamCache Guider",
            category="DreamCache/sampling",
            description="A GUIDER for SamplerCustomAdvanced with DreamCache's combined text and image guidance; "
                        "the image condition is switched on and off per branch. "
                        "Needs the MODEL from ApplyDreamCache.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of ApplyDreamCache."),
                io.Conditioning.Input("positive", tooltip="The prompt (ControlNets attached here apply to every "
                                                          "branch)."),
                io.Conditioning.Input("negative",
                                      tooltip="The negative / empty prompt: the text-unconditional branch."),
                *_scale_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, mode="combined"):
        return combo_check(cls, mode=mode)

    @classmethod
    def execute(cls, model, positive, negative, text_scale=7.5, image_scale=5.0, mode="combined") -> io.NodeOutput:
        return io.NodeOutput(make_guider(model, positive, negative, text_scale, image_scale, mode))


class DreamCacheDualGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheDualGuidanceSampler",
            display_name="Dual Guidance Sampler (DreamCache)",
            category="DreamCache/sampling",
            description="A KSampler with separate text and image guidance scales for a DreamCache-patched model.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of ApplyDreamCache."),
                io.Conditioning.Input("positive", tooltip="The prompt (ControlNets attached here apply to every "
                                                          "branch)."),
                io.Conditioning.Input("negative",
                                      tooltip="The negative / empty prompt: the text-unconditional branch."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (Empty Latent Image, or an encoded "
                                                        "image with denoise < 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=30, min=1, max=10000,
                             tooltip="Number of sampling steps (the reference uses 50 DDIM steps)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="How the noise levels are spaced over the steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent is replaced by noise (1 = all)."),
                *_scale_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The denoised latent.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler, mode="combined"):
        return combo_check(cls, sampler_name=sampler_name, scheduler=scheduler, mode=mode)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, sampler_name, scheduler, denoise=1.0,
                text_scale=7.5, image_scale=5.0, mode="combined") -> io.NodeOutput:
        return io.NodeOutput(sample_dual_guidance(model, positive, negative, latent_image, seed, steps, sampler_name,
                                                  scheduler,
                                                  denoise, text_scale, image_scale, mode))
