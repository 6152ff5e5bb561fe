"""Where DreamCache adapters sit in a Stable Diffusion U-Net, and how ComfyUI names those places.

A layer is the ``transformer_blocks.<block_index>`` of one SpatialTransformer, written as the
SpatialTransformer's module path under ``diffusion_model.`` (``output_blocks.4.1``) plus the block index, or by its
short name (``output_4``, :func:`layer_name`).
ComfyUI's attention hooks see the same place as ``extra_options["block"] == ("output", 4)`` and
``extra_options["block_index"] == 0``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DreamCacheError

_MODULE_RE = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\.(\d+)$")
_KIND = {"input_blocks": "input", "output_blocks": "output"}


@dataclass(frozen=True, order=True)
class LayerRef:
    """One patched transformer block: SpatialTransformer module path + index of the block inside it."""

    module: str
    block_index: int = 0

    def __post_init__(self):
        if not _MODULE_RE.match(self.module):
            raise DreamCacheError(
                f"'{self.module}' is not a SpatialTransformer path of an SD U-Net "
                "(expected e.g. 'middle_block.1' or 'output_blocks.4.1')."
            )
        if self.block_index < 0:
            raise DreamCacheError(f"Layer {self.module} has a negative transformer block index {self.block_index}.")

    @property
    def comfy_block(self) -> tuple[str, int]:
        """ComfyUI's ``transformer_options["block"]`` for this SpatialTransformer."""
        m = _MODULE_RE.match(self.module)
        if m.group(1) is None:
            return ("middle", 0)
        return (_KIND[m.group(1)], int(m.group(2)))

    @property
    def hook_key(self) -> tuple[tuple[str, int], int]:
        """What a ComfyUI attention patch sees: ``(extra["block"], extra["block_index"])``."""
        return (self.comfy_block, self.block_index)

    @property
    def key_prefix(self) -> str:
        """Prefix of this layer's tensors in adapter files (the authors' trainer's names)."""
        return f"diffusion_model.{self.module}.transformer_blocks.{self.block_index}."

    @property
    def slot(self) -> str:
        """A name without dots, usable as an ``nn.ModuleDict`` key."""
        return f"{self.module.replace('.', '_')}__{self.block_index}"

    def __str__(self) -> str:
        return self.module if self.block_index == 0 else f"{self.module}[{self.block_index}]"


def parse_layer(text: str) -> LayerRef:
    """``output_blocks.4.1`` or ``output_blocks.4.1[2]`` (block index 2) or ``output_blocks.4.1:2``; the inverse of
    ``str(LayerRef)``."""
    m = re.fullmatch(r"\s*([\w.]+?)(?:\[(\d+)\]|:(\d+))?\s*", text)
    if not m:
        raise DreamCacheError(f"Layer '{text}' is not understood; write a SpatialTransformer path such as "
                              "output_blocks.4.1 (optionally [block index]).")
    return LayerRef(m.group(1), int(m.group(2) or m.group(3) or 0))


def sort_layers(layers) -> list[LayerRef]:
    """U-Net execution order: input blocks, middle block, output blocks (by id)."""
    order = {"input": 0, "middle": 1, "output": 2}
    return sorted(layers, key=lambda r: (order[r.comfy_block[0]], r.comfy_block[1], r.block_index))


#: The five layers of the paper and of the released SD 2.1-base adapter (also SD 1.x, same layout).
SD_LAYERS = tuple(
    LayerRef(m)
    for m in ("middle_block.1", "output_blocks.4.1", "output_blocks.6.1", "output_blocks.8.1", "output_blocks.10.1")
)

#: SDXL is not in the paper. Same rule as SD: the middle transformer plus every second decoder
#: transformer (SDXL's decoder transformers are output_blocks.0.1 .. 5.1), first block of each.
SDXL_LAYERS = tuple(LayerRef(m) for m in ("middle_block.1", "output_blocks.1.1", "output_blocks.3.1",
                                          "output_blocks.5.1"))

FAMILIES = ("sd1", "sd2", "sdxl")
#: The side, in pixels, each family was trained at: the default size of training, evaluation and previews.
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def default_layers(family: str) -> tuple[LayerRef, ...]:
    if family in ("sd1", "sd2"):
        return SD_LAYERS
    if family == "sdxl":
        return SDXL_LAYERS
    raise DreamCacheError(f"No default DreamCache layer set for model family '{family}'; pass the layers explicitly.")


# ---- the short names artists type (Apply DreamCache's layer weights, attention maps) ------------------------------

def layer_name(ref: LayerRef) -> str:
    """The short name an artist types: ``middle``, ``output_4``, ``input_7`` (``output_4_1`` for block index 1)."""
    kind, idx = ref.comfy_block
    base = "middle" if kind == "middle" else f"{kind}_{idx}"
    return base if ref.block_index == 0 else f"{base}_{ref.block_index}"


def resolve_layer(name: str, layers) -> LayerRef:
    """The layer of ``layers`` called ``name`` (short name, module path or ``str(ref)``); an error lists the valid
    names otherwise."""
    key = name.strip()
    for ref in layers:
        if key in (layer_name(ref), ref.module if ref.block_index == 0 else None, str(ref)):
            return ref
    valid = ", ".join(layer_name(r) for r in layers)
    raise DreamCacheError(f"The adapter has no layer '{key}'; its layers are: {valid}.")
