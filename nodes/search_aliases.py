"""Search aliases: the words artists type into the node search ("personalize", "subject", "reference", "IP adapter
alternative") for each node, in one table, applied to every node's schema by one helper.

ComfyUI 0.33's ``io.Schema`` has ``search_aliases`` (served in /object_info; the frontend searches them with the
node's name and display name); 0.3.64's has not, and there the nodes are left exactly as they are.
"""
from __future__ import annotations

import dataclasses
import functools

from comfy_api.latest import io

#: What every node that personalises with a subject answers to.
PERSONALIZE = ["personalize", "personalise", "personalization", "subject", "reference image",
               "IP adapter alternative", "IPAdapter alternative", "subject-driven generation"]

SEARCH_ALIASES: dict[str, list[str]] = {
    "DreamCacheApply": PERSONALIZE + ["apply subject", "subject reference", "regional subject"],
    "DreamCacheApplyAdvanced": PERSONALIZE + ["layer weights", "per-layer subject strength"],
    "DreamCacheBuildFeatureCache": PERSONALIZE + ["encode subject", "reference", "subject embedding"],
    "DreamCacheLoader": ["load adapter", "DreamCache model", "personalize", "IP adapter alternative", "subject"],
    "DreamCacheSubjectMask": ["subject", "reference", "remove background", "cut out subject", "segment",
                              "background removal"],
    "DreamCacheSAMLoader": ["segment anything", "SAM", "load SAM", "segmentation model"],
    "DreamCacheDualGuidanceSampler": ["KSampler", "subject", "image guidance", "image scale", "personalize"],
    "DreamCacheGuider": ["guider", "CFG", "image guidance", "image scale", "subject"],
    "DreamCacheSave": ["save subject", "subject library", "save reference", "export cache"],
    "DreamCacheLoad": ["load subject", "subject library", "load reference", "import cache"],
    "DreamCacheCombine": ["several references", "multiple reference images", "merge subjects", "subject"],
    "DreamCacheAttentionRecorder": ["attention map", "heatmap", "where the subject applies", "debug"],
    "DreamCacheShowAttention": ["attention map", "heatmap", "visualize attention", "where the subject applies"],
}


def supported() -> bool:
    """Whether the running ComfyUI's schemas carry search aliases (0.33: yes; 0.3.64: no)."""
    return any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def with_search_aliases(node_cls: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """The node with its ``define_schema`` extended by the table's aliases for its node id (kept after any the node
    sets itself), where ComfyUI supports them; unchanged otherwise."""
    if not supported() or node_cls.__dict__.get("_dreamcache_search_aliases"):
        return node_cls
    define = node_cls.define_schema.__func__

    @functools.wraps(define)
    def define_schema(cls):
        schema = define(cls)
        own = list(schema.search_aliases or [])
        schema.search_aliases = own + [a for a in SEARCH_ALIASES.get(schema.node_id, []) if a not in own]
        return schema

    node_cls.define_schema = classmethod(define_schema)
    node_cls._dreamcache_search_aliases = True
    return node_cls
