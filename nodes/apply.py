"""ApplyDreamCache (MODEL + adapter + cache [+ mask] -> patched MODEL clone); its advanced form weights each layer."""

from __future__ import annotations

from comfy_api.latest import io

from ..dreamcache.comfy.apply_patch import apply_dreamcache
from .types import Adapter, Cache

_MASK_TIP = (
    "Optional: where the subject applies (1 = fully, 0 = not at all, soft in between), e.g. from the mask editor "
    "or SolidMask/MaskComposite. Same aspect as the image you generate; one mask serves the whole batch, or one "
    "per latent. "
    "Chained Apply nodes with their own masks place several subjects; where masks overlap the subjects add."
)


def _common_inputs():
    return [
        io.Model.Input(
            "model",
            tooltip="The model to personalise (LoRAs may be applied before or after this node; chain a second "
            "Apply DreamCache here to add another subject).",
        ),
        Adapter.Input("adapter", tooltip="The adapter from DreamCacheLoader."),
        Cache.Input("cache", tooltip="The subject's feature cache from BuildFeatureCache or DreamCacheLoad."),
        io.Float.Input(
            "strength",
            default=1.0,
            min=0.0,
            max=2.0,
            step=0.01,
            tooltip="0 = exactly the base model, 1 = the method as trained; above 1 exaggerates the subject.",
        ),
        io.Float.Input(
            "start_percent",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.001,
            tooltip="Sampling progress at which the subject starts to apply (0 = from the first step).",
        ),
        io.Float.Input(
            "end_percent",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.001,
            tooltip="Sampling progress after which the subject stops applying (1 = until the last step).",
        ),
    ]


class DreamCacheApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheApply",
            display_name="Apply DreamCache",
            category="DreamCache",
            description="Patches a copy of the model so its adapter layers cross-attend to the cached subject. "
                        "The input model is untouched. "
                        "Works with any sampler; "
                        "use DualGuidanceSampler or DreamCacheGuider for separate text and image scales. "
                        "An optional mask places the subject; chain several Apply nodes for several subjects.",
            inputs=[*_common_inputs(), io.Mask.Input("mask", optional=True, tooltip=_MASK_TIP)],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model clone.")],
        )

    @classmethod
    def execute(
        cls, model, adapter, cache, strength=1.0, start_percent=0.0, end_percent=1.0, mask=None
    ) -> io.NodeOutput:
        return io.NodeOutput(apply_dreamcache(model, adapter, cache, strength, start_percent, end_percent, mask=mask))


class DreamCacheApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheApplyAdvanced",
            display_name="Apply DreamCache (Advanced)",
            category="DreamCache",
            description="Apply DreamCache with a weight per patched layer: the deep layers "
                        "(middle, output_4) carry more of the subject's shape and layout, the shallow ones "
                        "(output_8, output_10) more of its texture and colour. "
                        "Weight 0 runs that layer's base block exactly.",
            inputs=[
                *_common_inputs(),
                io.String.Input(
                    "layer_weights",
                    default="",
                    multiline=True,
                    placeholder="middle=1, output_4=1, output_6=0.8, output_8=0.5, output_10=0.5",
                    tooltip="name=weight per layer, separated by commas or new lines; layers not named keep 1. "
                    "SD1/SD2 layers: "
                    "middle, output_4, output_6, output_8, output_10 (SDXL: middle, output_1, output_3, output_5). "
                    "A weight multiplies the strength at that layer; 0 turns the layer off.",
                ),
                io.Mask.Input("mask", optional=True, tooltip=_MASK_TIP),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model clone.")],
        )

    @classmethod
    def execute(
        cls, model, adapter, cache, strength=1.0, start_percent=0.0, end_percent=1.0, layer_weights="", mask=None
    ) -> io.NodeOutput:
        return io.NodeOutput(
            apply_dreamcache(
                model, adapter, cache, strength, start_percent, end_percent, mask=mask, layer_weights=layer_weights
            )
        )
