"""Reading tensor files safely, for every file the pack opens (adapters, caches, SAM checkpoints, training states):
safetensors, or ``torch.load(weights_only=True)``; nothing else is ever unpickled. Errors are one DreamCacheError
that names the file and says what to do (``hint``)."""
from __future__ import annotations

import os
import pickle
import re

import torch

from .errors import DreamCacheError

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
TENSOR_EXTENSIONS = SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS


def read_safetensors(path: str, name: str, hint: str, tensors: bool = True) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file on the CPU (``tensors=False``: the header only, no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise DreamCacheError(
            f"'{name}' could not be read as safetensors ({type(e).__name__}: {str(e)[:160]}); {hint}.") from None
    return sd, meta


def read_torch_tensors(path: str, name: str, hint: str):
    """The object of a PyTorch file loaded with ``weights_only=True`` (tensors and plain containers only); a
    ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is taken off."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob:
            raise DreamCacheError(
                f"'{name}' contains objects other than tensors, which are never unpickled (torch.load weights_only "
                f"refused: {glob.group(1)}); {hint}.") from None
        raise DreamCacheError(
            f"'{name}' could not be read as a PyTorch tensor file (not a valid checkpoint); {hint}.") from None
    except Exception as e:  # damaged or foreign files fail in many ways (KeyError, EOFError, BadZipFile, ...)
        raise DreamCacheError(
            f"'{name}' could not be read as a PyTorch tensor file ({type(e).__name__}: {str(e)[:160]}); {hint}."
        ) from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model") \
            and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    return obj


def read_tensor_file(path: str, name: str, hint: str, wrong_extension: str) -> tuple[object, dict]:
    """``(tensors, metadata)`` of a ``.safetensors``/``.sft`` or PyTorch (``.pt``, ``.pth``, ``.ckpt``, ``.bin``)
    file (a PyTorch file has no metadata); ``wrong_extension`` ends the error for any other extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        return read_safetensors(path, name, hint)
    if ext in TORCH_EXTENSIONS:
        return read_torch_tensors(path, name, hint), {}
    raise DreamCacheError(f"'{name}' has extension '{ext}', which {wrong_extension}.")
