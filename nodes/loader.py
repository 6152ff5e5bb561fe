"""DreamCacheLoader: pick an adapter file from models/dreamcache and validate it."""
from __future__ import annotations

from comfy_api.latest import io

from ..dreamcache.core.adapter_io import read_adapter
from ..dreamcache.core.errors import DreamCacheError
from ..dreamcache.core.layers import FAMILIES
from . import paths
from .model_files import ModelFile
from .types import Adapter
from .validation import combo_check

FAMILY_CHOICES = ["from file"] + list(FAMILIES)


ADAPTER_FILE = ModelFile("adapter_name", paths.ADAPTERS, "Adapter",
                         "put the adapter there (see the README's model table) and refresh.")


class DreamCacheLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheLoader",
            display_name="DreamCache Loader",
            category="DreamCache/loaders",
            description="Loads a DreamCache adapter "
                        "(the pack's .safetensors or the reference .pt) from models/dreamcache. "
                        "Every key is checked; the layers it patches come from the file.",
            inputs=[
                ADAPTER_FILE.combo(tooltip="Adapter file in ComfyUI/models/dreamcache (.safetensors, or the reference "
                                       "cross_attention-199999.pt)."),
                io.Combo.Input("base_family", options=FAMILY_CHOICES, default="from file", optional=True,
                               tooltip="Model family the adapter was trained for. 'from file' uses the file's "
                                       "metadata; "
                                       "set it for a reference .pt (the released one is sd2) to get a clear error on a "
                                       "wrong model."),
            ],
            outputs=[Adapter.Output(display_name="adapter", tooltip="The validated adapter, for BuildFeatureCache and "
                                                                    "ApplyDreamCache.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name, base_family="from file"):
        return combo_check(cls, adapter_name=adapter_name, base_family=base_family)

    @classmethod
    def combo_error(cls, name, value):
        return ADAPTER_FILE.combo_error(name, value)

    @classmethod
    def fingerprint_inputs(cls, adapter_name, base_family="from file"):
        return ADAPTER_FILE.fingerprint(adapter_name, base_family)

    @classmethod
    def execute(cls, adapter_name, base_family="from file") -> io.NodeOutput:
        adapter = read_adapter(ADAPTER_FILE.path(adapter_name), name=adapter_name)
        if base_family != "from file":
            if adapter.family is not None and adapter.family != base_family:
                raise DreamCacheError(f"Adapter '{adapter_name}' says it was trained for {adapter.family}, not "
                                      f"{base_family}; set base_family to 'from file'.")
            adapter.family = base_family
        return io.NodeOutput(adapter)
