"""Refresh tests/data/object_info_snapshot.json from a real ComfyUI server (the schemas CI checks workflows against).

    COMFYUI_PATH=/path/to/ComfyUI python tools/snapshot_object_info.py

Starts ComfyUI on 127.0.0.1 with an empty base directory holding only this pack, reads /object_info, and keeps the
node types the shipped workflows may use (this pack's nodes and the core nodes of tests/test_workflows.py). A
ComfyUI-backed test checks the snapshot still matches the live server, so it cannot drift unnoticed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamcache.apps.run.comfy_client import ComfyServer  # noqa: E402
from dreamcache.comfy.env import comfyui_version, find_comfyui  # noqa: E402

SNAPSHOT = ROOT / "tests" / "data" / "object_info_snapshot.json"
#: Core nodes the shipped workflows may use, checked against ComfyUI 0.3.64 (see tests/test_workflows.py).
CORE_NODES = sorted([
    "CheckpointLoaderSimple", "LoadImage", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode", "SaveImage",
                     "PreviewImage",
    "LoraLoader", "ControlNetLoader", "ControlNetApplyAdvanced", "SamplerCustomAdvanced", "RandomNoise",
                     "KSamplerSelect",
    "BasicScheduler", "KSampler", "SolidMask", "MaskComposite", "FeatherMask", "InvertMask", "MaskToImage",
    "ConditioningSetMask", "ConditioningCombine",
    "ImageToMask", "VAEEncode", "SetLatentNoiseMask", "DifferentialDiffusion", "InpaintModelConditioning",
    "ImagePadForOutpaint",
])
VOLATILE = {"tooltip"}


def fetch(comfyui: str) -> dict:
    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.symlink(ROOT, os.path.join(base, "custom_nodes", "ComfyUI-DreamCache"))
        with ComfyServer(comfyui, base_directory=base, cpu=True, log_path=os.path.join(base, "log.txt")) as srv:
            return srv.client.object_info()


def select(info: dict) -> dict:
    keep = {k: v for k, v in info.items() if k.startswith("DreamCache") or k in CORE_NODES}
    missing = [k for k in CORE_NODES if k not in keep]
    if missing:
        raise SystemExit(f"core nodes missing from this ComfyUI: {missing}")
    return dict(sorted(keep.items()))


def main():
    root = find_comfyui(sys.argv[1] if len(sys.argv) > 1 else None)
    if root is None:
        raise SystemExit("set COMFYUI_PATH or pass the ComfyUI folder")
    snap = select(fetch(str(root)))
    sys.path.insert(0, str(root))
    version = comfyui_version(root)
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps({"comfyui_version": version, "object_info": snap}, indent=1,
                                   sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT} ({len(snap)} node types, ComfyUI {version})")


if __name__ == "__main__":
    main()
