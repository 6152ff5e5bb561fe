"""Attention maps (paper Fig. 5): a recorder on the MODEL, and a node drawing the recording over the images."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..dreamcache.comfy.attention_maps import record_attention, show_attention
from .types import Attention
from .validation import combo_check

#: Every transformer layer of SD1.x/2.x and SDXL U-Nets (first block of each); the adapter must patch the one chosen.
LAYER_CHOICES = ["middle"] + [f"output_{i}" for i in range(12)] + [f"input_{i}" for i in (1, 2, 4, 5, 7, 8)]


class DreamCacheAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheAttentionRecorder",
            display_name="DreamCache Attention Recorder",
            category="DreamCache/inspect",
            description="Returns a copy of the DreamCache MODEL that records, while sampling, "
                        "where the generated image looks in the cached reference at one layer and one step "
                        "(paper Fig. 5). "
                        "Sample with its MODEL, "
                        "then connect the attention output and the sampler's LATENT to Show DreamCache Attention. "
                        "The image is the same as without recording.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The MODEL output of Apply DreamCache (all subjects chained before it are recorded).",
                ),
                io.Combo.Input(
                    "layer",
                    options=LAYER_CHOICES,
                    default="output_6",
                    tooltip="The patched layer to record. At 512² SD1/SD2: middle 8×8 tokens, output_4 16×16, "
                    "output_6 and "
                    "output_8 32×32, output_10 64×64 (the paper shows 16×16 and 32×32).",
                ),
                io.Float.Input(
                    "step_percent",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Which sampling step to record, as a fraction of the schedule: 0 = the first step, 1 = "
                    "the last.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model", tooltip="Connect to the sampler: the recording happens while it samples."
                ),
                Attention.Output(
                    display_name="attention", tooltip="The recording; connect to Show DreamCache Attention."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, layer="output_6"):
        return combo_check(cls, layer=layer)

    @classmethod
    def execute(cls, model, layer="output_6", step_percent=0.5) -> io.NodeOutput:
        return io.NodeOutput(*record_attention(model, layer, step_percent))


class DreamCacheShowAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheShowAttention",
            display_name="Show DreamCache Attention",
            category="DreamCache/inspect",
            description="Draws a recording of DreamCache Attention Recorder: over the generated image, "
                        "how strongly each location draws on the subject; over the reference, "
                        "where the chosen point of the generated image looks.",
            inputs=[
                Attention.Input("attention", tooltip="The attention output of DreamCache Attention Recorder."),
                io.Latent.Input(
                    "latent",
                    tooltip="The LATENT of the sampler that used the recorder's MODEL (so this node runs after it).",
                ),
                io.Image.Input("image", tooltip="The generated image (VAE Decode of that LATENT)."),
                io.Image.Input(
                    "reference", tooltip="The reference as cached: the reference output of Build Feature Cache."
                ),
                io.Float.Input(
                    "point_x",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="The point of the generated image whose attention is shown over the reference: 0 = "
                    "left edge, 1 = right edge.",
                ),
                io.Float.Input(
                    "point_y",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="The point's height: 0 = top edge, 1 = bottom edge.",
                ),
                io.Int.Input(
                    "subject",
                    default=1,
                    min=1,
                    max=16,
                    tooltip="Which subject to show when several Apply DreamCache nodes are chained (1 = the first).",
                ),
                io.Float.Input(
                    "opacity",
                    default=0.55,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="How strongly the heat map covers the image.",
                ),
                io.Mask.Input(
                    "reference_mask",
                    optional=True,
                    tooltip="Optional: the subject's mask on the reference. Without it, every pixel that is not "
                    "white counts as the subject.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image_map",
                    tooltip="The generated image under the subject heat map (red = draws most on the "
                    "subject), with the chosen point marked.",
                ),
                io.Image.Output(
                    display_name="reference_map",
                    tooltip="The reference under the heat map of where the chosen point looks.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, attention, latent, image, reference, point_x=0.5, point_y=0.5, subject=1, opacity=0.55, reference_mask=None
    ) -> io.NodeOutput:
        image_map, reference_map, text = show_attention(
            attention, latent, image, reference, point_x, point_y, subject, reference_mask, opacity
        )
        logging.info("DreamCache attention: %s", text)
        return io.NodeOutput(image_map, reference_map)
