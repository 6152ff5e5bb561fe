"""Find and import ComfyUI from a script (trainer, dataset synthesis, benchmarks, the headless runner).

Looks at an explicit path, then ``COMFYUI_PATH``, then the folder that holds this pack when it sits in
``ComfyUI/custom_nodes/<pack>/``. ComfyUI goes first on ``sys.path`` so its top-level modules (``nodes``,
``folder_paths``) win over this pack's folders of the same name.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.errors import DreamCacheError

PACK_ROOT = Path(__file__).resolve().parents[2]


def is_comfyui(path: str | os.PathLike) -> bool:
    return (Path(path) / "comfy" / "model_patcher.py").is_file()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ComfyUI folder to use, or None when none is found. An explicit path wins over ``COMFYUI_PATH`` and is
    never passed over silently: one that is not a ComfyUI folder is an error naming it."""
    if explicit:
        if not is_comfyui(explicit):
            where = "does not exist" if not Path(explicit).exists() else "has no comfy/model_patcher.py"
            raise DreamCacheError(f"--comfyui '{explicit}' is not a ComfyUI folder (it {where}); give the folder that "
                                  "holds ComfyUI's main.py.")
        return Path(explicit).resolve()
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not is_comfyui(env):
            raise DreamCacheError(f"COMFYUI_PATH='{env}' is not a ComfyUI folder (no comfy/model_patcher.py); fix or "
                                  "unset it, or pass --comfyui PATH.")
        return Path(env).resolve()
    if PACK_ROOT.parent.name == "custom_nodes" and is_comfyui(PACK_ROOT.parent.parent):
        return PACK_ROOT.parent.parent.resolve()
    return None


def import_comfyui(explicit: str | os.PathLike | None = None, cpu: bool | None = None, **cli_args) -> Path:
    """Make ComfyUI importable and initialise its model management (CPU mode when no GPU, or when asked).
    ``cli_args`` set ComfyUI command-line options first (e.g. ``use_pytorch_cross_attention=True``)."""
    root = find_comfyui(explicit)
    if root is None:
        raise DreamCacheError("ComfyUI was not found; pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH.")
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import torch
    from comfy.cli_args import args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        args.cpu = True
    for k, v in cli_args.items():
        if not hasattr(args, k):
            raise DreamCacheError(f"ComfyUI has no command-line option '{k}'.")
        setattr(args, k, v)
    import comfy.model_management  # noqa: F401  (reads args on import)

    return root


def comfyui_version(root: str | os.PathLike) -> str | None:
    """The release a ComfyUI tree says it is (``__version__`` in its comfyui_version.py), read with ``ast``: the file
    is parsed, never executed. None when the file or the assignment is missing."""
    import ast

    path = Path(root) / "comfyui_version.py"
    if not path.is_file():
        return None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                return node.value.value
    return None
