"""Reading, validating, writing and converting DreamCache adapter files.

Two formats are read:

* the authors' trainer's ``.pt`` (``torch.save`` of a plain dict of tensors), loaded with
  ``torch.load(weights_only=True)`` only: nothing but tensors and plain containers is ever unpickled;
* the pack's own ``.safetensors``: the same key names plus metadata (format, version, base family, layers).

Loading is strict, unlike the authors' ``strict=False``: every key must be an adapter parameter, every layer
must have all nine parameters, every shape must agree with the layer's channel count. The layers an adapter
patches are whatever its keys name.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field

import torch

from .. import __version__
from .adapter import PARAM_SHAPES, DreamCacheAdapter, layer_parameter_count
from .errors import DreamCacheError
from .files import read_tensor_file
from .layers import FAMILIES, LayerRef, sort_layers

ADAPTER_FORMAT = "dreamcache.adapter"
ADAPTER_FORMAT_VERSION = 1

_PARAM_ALT = "|".join(re.escape(p) for p in PARAM_SHAPES)
_KEY_RE = re.compile(
    rf"^(?:model\.)?diffusion_model\.(?P<module>.+?)\.transformer_blocks\.(?P<idx>\d+)\.(?P<param>{_PARAM_ALT})$")


@dataclass
class AdapterFile:
    """A validated adapter: per-layer tensors, channel counts and what the file says about itself."""

    name: str
    channels: dict[LayerRef, int]
    tensors: dict[LayerRef, dict[str, torch.Tensor]]
    family: str | None = None  # "sd1" | "sd2" | "sdxl" | None when the file does not say (reference .pt)
    metadata: dict = field(default_factory=dict)

    @property
    def layers(self) -> tuple[LayerRef, ...]:
        return tuple(sort_layers(self.channels))

    def parameter_count(self) -> int:
        return sum(layer_parameter_count(c) for c in self.channels.values())

    def build(self, operations=torch.nn, device=None, dtype=None) -> DreamCacheAdapter:
        """An ``nn.Module`` holding these weights (cast to ``dtype`` if given)."""
        module = DreamCacheAdapter(self.channels, operations=operations, device=device, dtype=dtype)
        module.load_reference_state_dict(self.tensors)
        module.requires_grad_(False)
        return module.eval()


def adapter_file_of(module: DreamCacheAdapter, family: str | None = None, name: str = "adapter") -> AdapterFile:
    """The weights of an adapter module as an :class:`AdapterFile` (detached float32 copies on the CPU)."""
    tensors = {ref: {k: v.detach().float().cpu().clone() for k, v in module.layer(ref).state_dict().items()}
               for ref in module.layers}
    return AdapterFile(name=name, channels=dict(module.channels), tensors=tensors, family=family)


def _short(items, n=3) -> str:
    items = list(items)
    shown = ", ".join(f"'{i}'" for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def parse_state_dict(sd: dict, source: str) -> tuple[dict[LayerRef, int], dict[LayerRef, dict[str, torch.Tensor]]]:
    """Validate a reference-named state dict; return channel counts and per-layer tensors.

    Raises one :class:`DreamCacheError` that lists every problem found (unknown, missing, mis-shaped keys).
    """
    if not isinstance(sd, dict) or not sd:
        raise DreamCacheError(f"'{source}' holds no tensors, so it is not a DreamCache adapter; pick an adapter file.")
    unknown, not_tensor = [], []
    per_layer: dict[LayerRef, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _KEY_RE.match(str(key))
        ref = None
        if m:
            try:
                ref = LayerRef(m.group("module"), int(m.group("idx")))
            except DreamCacheError:
                ref = None
        if ref is None:
            unknown.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            not_tensor.append(key)
            continue
        per_layer.setdefault(ref, {})[m.group("param")] = value
    if not per_layer:
        raise DreamCacheError(
            f"'{source}' is not a DreamCache adapter: none of its {len(sd)} entries has an adapter parameter name "
            f"(found {_short(sd)}); pick an adapter file such as the reference 'cross_attention-199999.pt'."
        )
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unrecognised key(s) {_short(unknown)}")
    if not_tensor:
        problems.append(f"non-tensor value(s) at {_short(not_tensor)}")
    channels: dict[LayerRef, int] = {}
    for ref in sort_layers(per_layer):
        params = per_layer[ref]
        missing = [p for p in PARAM_SHAPES if p not in params]
        if missing:
            problems.append(f"layer {ref} is missing {_short(missing, 9)}")
            continue
        c = int(params["norm2_mem.weight"].shape[0]) if params["norm2_mem.weight"].dim() == 1 else -1
        for p, shape_of in PARAM_SHAPES.items():
            t = params[p]
            if c <= 0 or tuple(t.shape) != shape_of(c):
                problems.append(f"layer {ref} {p} has shape {tuple(t.shape)}, expected {shape_of(max(c, 0))}")
            elif not t.is_floating_point():
                problems.append(f"layer {ref} {p} has dtype {t.dtype}, expected a float type")
        channels[ref] = c
    if problems:
        raise DreamCacheError(f"'{source}' is not a valid DreamCache adapter: " + "; ".join(problems)
                              + "; re-download or re-convert it.")
    return channels, per_layer


def _parse_metadata(meta: dict | None, source: str, channels: dict[LayerRef, int]) -> tuple[str | None, dict]:
    meta = dict(meta or {})
    fmt = meta.get("format")
    if fmt is None:
        return None, meta  # a bare safetensors with reference names: accepted, family unknown
    if fmt != ADAPTER_FORMAT:
        raise DreamCacheError(f"'{source}' is a '{fmt}' file, not a DreamCache adapter ('{ADAPTER_FORMAT}'); pick an "
                              "adapter file.")
    try:
        version = int(meta.get("format_version", "1"))
    except ValueError:
        raise DreamCacheError(f"'{source}' has an unreadable format_version {meta.get('format_version')!r}; re-convert "
                              "the file.") from None
    if version > ADAPTER_FORMAT_VERSION:
        raise DreamCacheError(
            f"'{source}' uses adapter format version {version}, newer than this pack reads ({ADAPTER_FORMAT_VERSION}); "
            "update ComfyUI-DreamCache."
        )
    family = meta.get("base_family") or None
    if family in ("unknown", ""):
        family = None
    if family is not None and family not in FAMILIES:
        raise DreamCacheError(f"'{source}' names an unknown base family '{family}' (expected one of "
                              f"{', '.join(FAMILIES)}); re-convert it with --family.")
    if "layers" in meta:
        try:
            listed = {LayerRef(d["module"], int(d.get("block_index",
                                                      0))): int(d["channels"]) for d in json.loads(meta["layers"])}
        except (ValueError, KeyError, TypeError, DreamCacheError):
            raise DreamCacheError(f"'{source}' has unreadable layer metadata; re-convert the file.") from None
        if listed != channels:
            raise DreamCacheError(
                f"'{source}' metadata lists layers {sorted(map(str, listed))} but its tensors hold "
                f"{sorted(map(str, channels))}; the file is inconsistent, re-convert it."
            )
    return family, meta


def read_adapter(path: str, name: str | None = None) -> AdapterFile:
    """Read and validate an adapter file (``.safetensors`` or legacy ``.pt``)."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise DreamCacheError(f"Adapter file '{path}' does not exist; put adapters in ComfyUI/models/dreamcache.")
    sd, meta = read_tensor_file(path, name, "the file is damaged or not an adapter; use a plain tensor .pt or a "
                                            ".safetensors adapter",
                                "is not an adapter format; use .safetensors or the authors' .pt")
    if not isinstance(sd, dict):
        raise DreamCacheError(f"'{name}' holds a {type(sd).__name__}, not a dict of tensors, so it is not a DreamCache "
                              "adapter.")
    channels, tensors = parse_state_dict(sd, name)
    family, meta = _parse_metadata(meta, name, channels)
    return AdapterFile(name=name, channels=channels, tensors=tensors, family=family, metadata=meta)


def adapter_metadata(channels: dict[LayerRef, int], family: str | None, extra: dict | None = None) -> dict[str, str]:
    if family is not None and family not in FAMILIES:
        raise DreamCacheError(f"Unknown base family '{family}'; use one of {', '.join(FAMILIES)}.")
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": str(ADAPTER_FORMAT_VERSION),
        "base_family": family or "unknown",
        "layers": json.dumps([{"module": r.module, "block_index": r.block_index,
                               "channels": channels[r]} for r in sort_layers(channels)]),
        "parameters": str(sum(layer_parameter_count(c) for c in channels.values())),
        "written_by": f"ComfyUI-DreamCache {__version__}",
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


#: Storage precisions offered for saved adapters and caches; "keep" stores the tensors as they are.
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]):
    """Write next to ``path`` then rename, so a crash never leaves half a file under the real name. The file gets
    the usual permissions (0666 less the umask, e.g. 0644), not the owner-only 0600 of mkstemp or of safetensors'
    own writer, so a ComfyUI running as another user can read it."""
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f".partial-{secrets.token_hex(8)}.safetensors")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask, read without changing the process umask
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors (0.8) writes 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(path: str, adapter: AdapterFile | DreamCacheAdapter, family: str | None = None,
                 dtype: torch.dtype | None = None, extra_metadata: dict | None = None):
    """Write an adapter in the pack's safetensors format (reference key names + metadata)."""
    if isinstance(adapter, DreamCacheAdapter):
        sd = adapter.reference_state_dict()
        channels = adapter.channels
    else:
        sd = {ref.key_prefix + p: t for ref, params in adapter.tensors.items() for p, t in params.items()}
        channels = adapter.channels
        family = family if family is not None else adapter.family
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    atomic_save_safetensors(sd, path, adapter_metadata(channels, family, extra_metadata))


def convert_adapter(src: str, dst: str, family: str | None = None, dtype: torch.dtype | None = None) -> AdapterFile:
    """Convert a reference ``.pt`` (or re-write a safetensors) into the pack's format; returns what was read."""
    af = read_adapter(src)
    if family is None:
        family = af.family
    elif af.family is not None and af.family != family:
        raise DreamCacheError(f"'{af.name}' says it is for '{af.family}', not '{family}'; drop --family or pick the "
                              "right one.")
    extra = {"converted_from": os.path.basename(src)}
    save_adapter(dst, af, family=family, dtype=dtype, extra_metadata=extra)
    return af
