"""Custom socket types of the pack (permanent: renaming one breaks saved workflows)."""
from comfy_api.latest import io

Adapter = io.Custom("DREAMCACHE_ADAPTER")
Cache = io.Custom("DREAMCACHE_CACHE")
Sam = io.Custom("DREAMCACHE_SAM")
Attention = io.Custom("DREAMCACHE_ATTENTION")
