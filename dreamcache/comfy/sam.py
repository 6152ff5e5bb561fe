"""SAM under ComfyUI's model management: the loaded SAM is wrapped in a ModelPatcher and loaded onto the compute
device only when SubjectMask runs it (ComfyUI offloads it later like any other model). Each loaded SAM keeps the
embeddings of the last few images it encoded, so re-running SubjectMask with other prompts or mask options on the
same photo skips the image encoder."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import sam as core_sam
from ..core.errors import DreamCacheError


class SamHolder(torch.nn.Module):
    """Holds the SAM for ModelPatcher, which needs a writable ``device`` attribute (``Sam.device`` is read-only)."""

    def __init__(self, sam: torch.nn.Module):
        super().__init__()
        self.sam = sam
        self.device = sam.device


@dataclass(eq=False)
class SamModel:
    """The value of a DREAMCACHE_SAM socket."""

    patcher: object  # comfy.model_patcher.ModelPatcher around a SamHolder
    variant: str
    name: str
    embeddings: core_sam.EmbeddingCache = field(default_factory=core_sam.EmbeddingCache)  # last images SAM encoded

    def __repr__(self):
        return f"SamModel({self.name!r}, {self.variant})"


def wrap_sam(sam: torch.nn.Module, variant: str, name: str) -> SamModel:
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(SamHolder(sam), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return SamModel(patcher=patcher, variant=variant, name=name)


def load_sam_model(path: str, name: str) -> SamModel:
    model, variant = core_sam.load_sam(path, name)
    return wrap_sam(model, variant, name)


def _activation_bytes(sam) -> int:
    """Rough peak memory of the image encoder's global attention (it materialises heads x tokens^2 fp32 scores)."""
    enc = sam.image_encoder
    tokens = (enc.img_size // enc.patch_embed.proj.kernel_size[0]) ** 2
    heads = enc.blocks[0].attn.num_heads
    return 3 * heads * tokens * tokens * 4


def sam_for_use(sam: SamModel) -> torch.nn.Module:
    """Load the SAM onto ComfyUI's compute device (freeing other models if needed) and return the ``Sam`` module."""
    import comfy.model_management as mm

    if not isinstance(sam, SamModel):
        raise DreamCacheError(f"The sam input is a {type(sam).__name__}, not a SAM model; connect DreamCacheSAMLoader.")
    module = sam.patcher.model.sam
    mm.load_models_gpu([sam.patcher], memory_required=_activation_bytes(module), force_full_load=True)
    return module


def segment(sam: SamModel, images_rgb: torch.Tensor, mode: str, box=None, points=None, labels=None) -> torch.Tensor:
    """SubjectMask's SAM run for a batch ``[B, H, W, 3]``: probabilities ``[B, H, W]`` on ComfyUI's intermediate device,
    with a progress bar and interruption between images."""
    import comfy.model_management as mm
    import comfy.utils

    module = sam_for_use(sam)
    bar = comfy.utils.ProgressBar(images_rgb.shape[0])

    def on_image(i):
        mm.throw_exception_if_processing_interrupted()
        if i:
            bar.update(1)

    probs = core_sam.predict_batch(module, images_rgb, mode, box=box, points=points, labels=labels, on_image=on_image,
                                   cache=sam.embeddings)
    bar.update(1)
    return probs.to(mm.intermediate_device())
