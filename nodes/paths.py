"""Model folders of the pack, registered through folder_paths so extra_model_paths.yaml entries keep working."""
from __future__ import annotations

import os

from ..dreamcache.core.files import TENSOR_EXTENSIONS

ADAPTERS = "dreamcache"  # models/dreamcache: adapter files
CACHES = "dreamcache_caches"  # models/dreamcache_caches: saved feature caches
SAMS = "sams"  # models/sams: Segment Anything checkpoints (the folder name other packs use too: shared)
ADAPTER_EXTENSIONS = set(TENSOR_EXTENSIONS)
CACHE_EXTENSIONS = {".safetensors"}
SAM_EXTENSIONS = set(TENSOR_EXTENSIONS)


def _register(name: str, extensions: set[str]):
    import folder_paths

    default = os.path.join(folder_paths.models_dir, name)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
        return
    # Already known (an extra_model_paths.yaml entry, another pack, or another load of this pack): keep its paths,
    # add ours, and add our extensions to its filter. An empty filter means "every file" to folder_paths (that is
    # what an extra_model_paths.yaml entry for a folder ComfyUI does not know gets): the loader would list notes.txt
    # and readme.md, so it becomes ours.
    folder_paths.add_model_folder_path(name, default)
    paths, exts = folder_paths.folder_names_and_paths[name]
    if isinstance(exts, set):
        exts.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))


def missing_file_message(folder: str, name: str, what: str, hint: str) -> str:
    import folder_paths

    return f"{what} '{name}' was not found in {', '.join(folder_paths.get_folder_paths(folder))}; {hint}"


def resolve_file(folder: str, name: str, what: str, hint: str) -> str:
    """Full path of a file picked in a combo, or one clear error naming the folders searched."""
    import folder_paths

    from ..dreamcache.core.errors import DreamCacheError

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise DreamCacheError(missing_file_message(folder, name, what, hint))
    return path


def file_fingerprint(folder: str, name: str, *extra):
    """Re-run a loader node when its file changes on disk (same name, new content)."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return (name, *extra)
    st = os.stat(path)
    return (name, *extra, st.st_mtime_ns, st.st_size)


def register_folders():
    _register(ADAPTERS, ADAPTER_EXTENSIONS)
    _register(CACHES, CACHE_EXTENSIONS)
    _register(SAMS, SAM_EXTENSIONS)  # kept as is (paths added, extensions merged) when another pack registered it


def safe_output_path(base_dir: str, prefix: str, extension: str = ".safetensors") -> str:
    """A new file path for ``prefix`` inside ``base_dir``. ``prefix`` may name subfolders but never leaves
    ``base_dir`` (no absolute paths, no '..'); a 5-digit counter keeps earlier files."""
    from ..dreamcache.core.errors import DreamCacheError

    raw = (prefix or "").strip().replace("\\", "/")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts or raw.startswith("/") or os.path.isabs(raw) or (len(raw) > 1 and raw[1] == ":") or ".." in parts:
        raise DreamCacheError(f"File name prefix '{prefix}' must be a relative name inside the caches folder (no '..', "
                              "no absolute path).")
    base = os.path.realpath(base_dir)
    folder = os.path.realpath(os.path.join(base, *parts[:-1]))
    if os.path.commonpath([base, folder]) != base:
        raise DreamCacheError(f"File name prefix '{prefix}' points outside the caches folder; use a plain name such as "
                              "'my_subject'.")
    os.makedirs(folder, exist_ok=True)
    stem = parts[-1]
    counter = 1
    while True:
        path = os.path.join(folder, f"{stem}_{counter:05d}{extension}")
        if not os.path.exists(path):
            return path
        counter += 1
