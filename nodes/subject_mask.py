"""DreamCacheSAMLoader and DreamCacheSubjectMask: turn an ordinary photo into the reference the adapters were trained on
(the subject alone on white), and output its MASK. SAM is optional: a MASK from any segmenter works without it."""
from __future__ import annotations

from functools import partial

from comfy_api.latest import io

from ..dreamcache.comfy import sam as sam_glue
from ..dreamcache.core import subject
from . import paths
from .model_files import ModelFile
from .types import Sam
from .validation import combo_check

SAM_FILE = ModelFile("sam_name", paths.SAMS, "SAM checkpoint", "put it there (see the README's SAM table) and refresh.")


class DreamCacheSAMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheSAMLoader",
            display_name="DreamCache SAM Loader",
            category="DreamCache/loaders",
            description="Loads a Segment Anything checkpoint from models/sams for SubjectMask. "
                        "ViT-B, ViT-L or ViT-H is recognised from the weights; the file is read safely "
                        "(safetensors, or tensors-only .pth) and loaded strictly.",
            inputs=[
                SAM_FILE.combo(tooltip="SAM checkpoint in ComfyUI/models/sams, e.g. sam_vit_b_01ec64.pth (375 MB, "
                                       "fast) "
                                       "or sam_vit_h_4b8939.pth (2.56 GB, best edges)."),
            ],
            outputs=[Sam.Output(display_name="sam", tooltip="The SAM model, for DreamCacheSubjectMask (loaded on the "
                                                            "GPU only when used).")],
        )

    @classmethod
    def validate_inputs(cls, sam_name):
        return combo_check(cls, sam_name=sam_name)

    @classmethod
    def combo_error(cls, name, value):
        return SAM_FILE.combo_error(name, value)

    @classmethod
    def fingerprint_inputs(cls, sam_name):
        return SAM_FILE.fingerprint(sam_name)

    @classmethod
    def execute(cls, sam_name) -> io.NodeOutput:
        return io.NodeOutput(sam_glue.load_sam_model(SAM_FILE.path(sam_name), sam_name))


class DreamCacheSubjectMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheSubjectMask",
            display_name="Subject Mask (DreamCache)",
            category="DreamCache/image",
            description="Cuts the subject out of an ordinary photo and lays it out as DreamCache's reference: "
                        "alone on white, cropped, centred, about 85% of a square. "
                        "Finds the subject with SAM (auto, box or points) or takes any MASK; also outputs the mask.",
            inputs=[
                io.Image.Input("image", tooltip="The photo(s) of the subject. A batch is processed image by image; an "
                                                "RGBA image's "
                                                "transparency is used as its mask in auto and mask modes."),
                io.Combo.Input("prompt_mode", options=list(subject.PROMPT_MODES), default="auto",
                               tooltip="auto: SAM picks the most salient object near the centre; box: SAM segments "
                                       "inside the box; "
                                       "points: SAM segments from the clicked points; mask: use the mask input as is "
                                       "(SAM is not loaded)."),
                Sam.Input("sam", optional=True, lazy=True,
                          tooltip="SAM from DreamCacheSAMLoader; needed by auto, box and points. Never loaded in mask "
                                  "mode."),
                io.Mask.Input("mask", optional=True, lazy=True,
                              tooltip="mask mode: the subject mask from any segmenter (1 = subject); resized to the "
                                      "image if needed."),
                io.Int.Input("box_x", default=0, min=0, max=16384,
                             tooltip="box mode: left edge of the box around the subject, in pixels."),
                io.Int.Input("box_y", default=0, min=0, max=16384, tooltip="box mode: top edge of the box, in pixels."),
                io.Int.Input("box_width", default=0, min=0, max=16384,
                             tooltip="box mode: width of the box, in pixels."),
                io.Int.Input("box_height", default=0, min=0, max=16384,
                             tooltip="box mode: height of the box, in pixels."),
                io.String.Input("positive_points", default="", multiline=False,
                                tooltip="points mode (and extra hints in box mode): pixels on the subject as x,y "
                                        "pairs, e.g. 120,80; 200,150."),
                io.String.Input("negative_points", default="", multiline=False,
                                tooltip="Pixels that are NOT the subject, as x,y pairs, e.g. 10,10; 300,20 (points and "
                                        "box modes)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Mask values above this are the subject (0.5 = SAM's own cut-off; lower keeps "
                                       "more, higher less)."),
                io.Int.Input("grow", default=0, min=-256, max=256,
                             tooltip="Grow (positive) or shrink (negative) the mask by this many pixels; -2 to -4 "
                                     "removes a background halo."),
                io.Int.Input("feather", default=0, min=0, max=256,
                             tooltip="Soften the mask edge over this many pixels (0 = hard edge; 2-8 looks natural)."),
                io.Combo.Input("layout", options=list(subject.LAYOUTS), default="train",
                               tooltip="train: crop to the subject, keep its aspect, centre it at ~85% of a square of "
                                       "side 'size' "
                                       "(what the adapters were trained on); keep: same canvas, background painted "
                                       "over."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8,
                             tooltip="train layout: side of the square output (512 for SD1.5/2.1, 1024 for SDXL)."),
                io.String.Input("background", default="#ffffff",
                                tooltip="Background colour: white (#ffffff) is what DreamCache was trained with; also "
                                        "255,255,255 or a name."),
                io.Boolean.Input("invert_mask", default=False,
                                 tooltip="mask mode: invert the mask input. Turn on for LoadImage's MASK, which is 1 "
                                         "where the PNG is transparent."),
            ],
            outputs=[
                io.Image.Output(display_name="reference", tooltip="The subject on the background colour, for "
                                                                  "BuildFeatureCache's image input."),
                io.Mask.Output(display_name="mask", tooltip="The final subject mask (after threshold, grow and "
                                                            "feather) at the input image's size, 1 = subject."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt_mode="auto", layout="train"):
        return combo_check(cls, prompt_mode=prompt_mode, layout=layout)

    @classmethod
    def check_lazy_status(cls, image=None, prompt_mode="auto", **kwargs):
        """Ask ComfyUI only for what this mode uses: the mask in mask mode, SAM otherwise (and not even SAM when an
        auto-mode image is already cut out)."""
        if prompt_mode == "mask":
            return ["mask"] if "mask" in kwargs and kwargs["mask"] is None else []
        if "sam" in kwargs and kwargs["sam"] is None and subject.needs_sam(prompt_mode, image):
            return ["sam"]
        return []

    @classmethod
    def execute(cls, image, prompt_mode="auto", box_x=0, box_y=0, box_width=0, box_height=0, positive_points="",
                negative_points="",
                threshold=0.5, grow=0, feather=0, layout="train", size=512, background="#ffffff", invert_mask=False,
                sam=None, mask=None) -> io.NodeOutput:
        images = subject.as_image_batch(image)
        subject.parse_color(background)  # fail before any model runs
        segment, prompts = None, (None, None, None)
        if sam is not None and prompt_mode in subject.SAM_MODES:
            prompts = subject.sam_prompts(prompt_mode, images.shape[2], images.shape[1], box_x, box_y, box_width,
                                          box_height, positive_points, negative_points)
            segment = partial(sam_glue.segment, sam, mode=prompt_mode)
        return io.NodeOutput(*subject.subject_reference(images, prompt_mode, mask=mask, invert_mask=invert_mask,
                                                        segment=segment, prompts=prompts, threshold=threshold,
                                                        grow=grow, feather=feather, layout=layout, size=size,
                                                        background=background))
