"""The pack's ComfyUI nodes (V3 API). Node ids are permanent: never rename one without adding an alias here."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import DreamCacheApply, DreamCacheApplyAdvanced
from .attention_maps import DreamCacheAttentionRecorder, DreamCacheShowAttention
from .build_cache import DreamCacheBuildFeatureCache
from .cache_files import DreamCacheCombine, DreamCacheLoad, DreamCacheSave
from .loader import DreamCacheLoader
from .paths import register_folders
from .sampling import DreamCacheDualGuidanceSampler, DreamCacheGuider
from .search_aliases import with_search_aliases
from .subject_mask import DreamCacheSAMLoader, DreamCacheSubjectMask

register_folders()

NODES: list[type[io.ComfyNode]] = [
    DreamCacheLoader,
    DreamCacheBuildFeatureCache,
    DreamCacheApply,
    DreamCacheGuider,
    DreamCacheDualGuidanceSampler,
    DreamCacheSave,
    DreamCacheLoad,
    DreamCacheCombine,
    DreamCacheSAMLoader,
    DreamCacheSubjectMask,
    DreamCacheApplyAdvanced,
    DreamCacheAttentionRecorder,
    DreamCacheShowAttention,
]


NODES = [with_search_aliases(node) for node in NODES]  # where the running ComfyUI supports them (0.33: yes)


class DreamCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
