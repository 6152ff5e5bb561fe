"""DreamCacheSave / DreamCacheLoad / DreamCacheCombine: cache a subject once, reuse and share it."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..dreamcache.core.adapter_io import STORAGE_DTYPES
from ..dreamcache.core.cache import concat_caches, load_cache, save_cache
from . import paths
from .model_files import ModelFile
from .types import Cache
from .validation import combo_check

CACHE_FILE = ModelFile("cache_name", paths.CACHES, "Cache",
                       "save it with DreamCacheSave first (or copy the file there) and refresh.")


class DreamCacheSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheSave",
            display_name="Save DreamCache Cache",
            category="DreamCache/cache",
            description="Saves a feature cache to models/dreamcache_caches as .safetensors with its metadata "
                        "(model family, layers, seed, resolution), "
                        "so the subject is cached once and reused or shared without the reference image.",
            inputs=[
                Cache.Input("cache", tooltip="The cache to save."),
                io.String.Input("filename_prefix", default="subject",
                                tooltip="File name (may include subfolders) inside "
                                "models/dreamcache_caches; a counter is appended, nothing is overwritten."),
                io.Combo.Input("dtype", options=list(STORAGE_DTYPES), default="fp16",
                               tooltip="Storage precision: fp16 halves the size (≈6 MB per 512² reference for "
                                       "SD1.5/2.1); keep stores it as computed."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dtype="fp16"):
        return combo_check(cls, dtype=dtype)

    @classmethod
    def execute(cls, cache, filename_prefix="subject", dtype="fp16") -> io.NodeOutput:
        base = folder_paths.get_folder_paths(paths.CACHES)[0]
        path = paths.safe_output_path(base, filename_prefix)
        save_cache(cache, path, dtype=STORAGE_DTYPES[dtype])
        rel = os.path.relpath(path, base)
        text = f"Saved {rel} ({os.path.getsize(path) / 1e6:.1f} MB). {cache.describe()}"
        return io.NodeOutput(ui=ui.PreviewText(text))


class DreamCacheLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheLoad",
            display_name="Load DreamCache Cache",
            category="DreamCache/cache",
            description="Loads a saved feature cache from models/dreamcache_caches (its metadata is checked).",
            inputs=[CACHE_FILE.combo(tooltip="A cache file written by DreamCacheSave, in "
                                             "ComfyUI/models/dreamcache_caches.")],
            outputs=[Cache.Output(display_name="cache", tooltip="The loaded cache, for ApplyDreamCache.")],
        )

    @classmethod
    def validate_inputs(cls, cache_name):
        return combo_check(cls, cache_name=cache_name)

    @classmethod
    def combo_error(cls, name, value):
        return CACHE_FILE.combo_error(name, value)

    @classmethod
    def fingerprint_inputs(cls, cache_name):
        return CACHE_FILE.fingerprint(cache_name)

    @classmethod
    def execute(cls, cache_name) -> io.NodeOutput:
        return io.NodeOutput(load_cache(CACHE_FILE.path(cache_name), name=cache_name))


class DreamCacheCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamCacheCombine",
            display_name="Combine DreamCache Caches",
            category="DreamCache/cache",
            description="Concatenates the references of two caches of the same subject "
                        "(built with the same model and adapter), so every generated image attends to both.",
            inputs=[
                Cache.Input("cache_a", tooltip="First cache."),
                Cache.Input("cache_b", tooltip="Second cache (same model family, layers and resolution)."),
            ],
            outputs=[Cache.Output(display_name="cache", tooltip="One cache holding the references of both.")],
        )

    @classmethod
    def execute(cls, cache_a, cache_b) -> io.NodeOutput:
        return io.NodeOutput(concat_caches([cache_a, cache_b]))
