"""ApplyDreamCache: MODEL + adapter + cache -> patched MODEL clone."""
from __future__ import annotations

from comfy_api.latest import io

from ..dreamcache.comfy.apply_patch import apply_dreamcache
from .types import Adapter, Cache


class DreamCacheApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheApply",
            display_name="Apply DreamCache",
            category="DreamCache",
            description="Patches a copy of the model so its adapter layers cross-attend to the cached subject. The "
                        "input model is "
                        "untouched. Works with any sampler; use DualGuidanceSampler or DreamCacheGuider for separate "
                        "text and image scales.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalise (LoRAs may be applied before or after this "
                                                "node)."),
                Adapter.Input("adapter", tooltip="The adapter from DreamCacheLoader."),
                Cache.Input("cache", tooltip="The subject's feature cache from BuildFeatureCache or DreamCacheLoad."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="0 = exactly the base model, 1 = the method as trained; above 1 exaggerates the "
                                       "subject."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the subject starts to apply (0 = from the first "
                                       "step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which the subject stops applying (1 = until the last "
                                       "step)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model clone.")],
        )

    @classmethod
    def execute(cls, model, adapter, cache, strength=1.0, start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        return io.NodeOutput(apply_dreamcache(model, adapter, cache, strength, start_percent, end_percent))
