"""Post-install step (ComfyUI-Manager runs this after cloning the pack; you can run it by hand too).

1. Installs the packages of requirements.txt into *this* Python if they are missing (never torch: ComfyUI
   provides it). Nothing else is downloaded: model files are never fetched automatically.
2. Creates the model folders: models/dreamcache (adapters), models/dreamcache_caches (saved subject caches),
   models/sams (SAM checkpoints, shared with other packs), and copies the example images of workflows/ into
   ComfyUI's input folder (never overwriting), so the example workflows open with their images loaded.
3. Prints which model files are still missing and where to get them.

    python install.py [--comfyui PATH] [--no-install]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: What the user needs, where it goes and where to get it (kept in sync with README's model table).
MODEL_FILES = [
    {
        "folder": "dreamcache", "patterns": (".safetensors", ".pt", ".pth", ".sft", ".ckpt", ".bin"),
        "what": "a DreamCache adapter (required)",
        "hint": "the authors' SD 2.1-base adapter cross_attention-199999.pt from "
                "https://drive.google.com/drive/folders/11qgm_oXMgHg4jiD7Q2S0rWeIfHhTPg0K (optionally convert it with "
                "`python -m dreamcache convert cross_attention-199999.pt --family sd2`), or one you trained with "
                "`python -m dreamcache.train`",
    },
    {
        "folder": "sams", "patterns": (".pth", ".pt", ".safetensors"),
        "what": "a Segment Anything checkpoint (optional: only for SubjectMask's auto/box/points modes)",
        "hint": "sam_vit_b_01ec64.pth (375 MB) from "
                "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth "
                "(or vit_l / vit_h from the same place)",
    },
    {
        "folder": "checkpoints", "patterns": (".safetensors", ".ckpt"),
        "what": "a Stable Diffusion checkpoint of the adapter's family (SD 2.1-base for the released adapter)",
        "hint": "v2-1_512-ema-pruned.safetensors from https://huggingface.co/stabilityai/stable-diffusion-2-1-base",
    },
]
FOLDERS = ("dreamcache", "dreamcache_caches", "sams")


def find_comfyui(explicit: str | None = None) -> str | None:
    for cand in (explicit, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(HERE))):
        if cand and os.path.isfile(os.path.join(cand, "comfy", "model_patcher.py")):
            return os.path.abspath(cand)
    return None


def requirement_names(path: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
            out.append((name, line))
    return out


def missing_requirements(path: str) -> list[str]:
    missing = []
    for name, spec in requirement_names(path):
        if name.lower() in ("torch", "torchvision"):
            continue  # provided by ComfyUI, never installed by this pack
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        try:
            from packaging.requirements import Requirement

            if not Requirement(spec).specifier.contains(version, prereleases=True):
                missing.append(spec)
        except Exception:
            pass  # packaging unavailable or an unusual spec: presence is enough
    return missing


def model_report(models_dir: str) -> list[str]:
    lines = []
    for m in MODEL_FILES:
        folder = os.path.join(models_dir, m["folder"])
        have = []
        if os.path.isdir(folder):
            for root, _dirs, files in os.walk(folder):
                have += [f for f in files if f.lower().endswith(m["patterns"])]
        if have:
            lines.append(f"  ok      {m['folder']}/: {', '.join(sorted(have)[:3])}{' ...' if len(have) > 3 else ''}")
        else:
            lines.append(f"  MISSING {m['what']}\n          put it in {folder}\n          get {m['hint']}")
    return lines


def copy_examples(input_dir: str) -> list[str]:
    import shutil

    os.makedirs(input_dir, exist_ok=True)
    copied = []
    examples = os.path.join(HERE, "workflows")
    for name in sorted(os.listdir(examples)):
        example = name.startswith("dreamcache_example_") and name.endswith(".png")
        if example and not os.path.exists(os.path.join(input_dir, name)):
            shutil.copyfile(os.path.join(examples, name), os.path.join(input_dir, name))
            copied.append(name)
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ComfyUI-DreamCache post-install: requirements, model folders, model "
                                             "checklist")
    ap.add_argument("--comfyui", help="ComfyUI directory (default: COMFYUI_PATH or the folder two levels up)")
    ap.add_argument("--no-install", action="store_true", help="only report missing requirements, do not pip install")
    args = ap.parse_args(argv)

    req = os.path.join(HERE, "requirements.txt")
    missing = missing_requirements(req)
    if missing and not args.no_install:
        print(f"[DreamCache] installing into {sys.executable}: {', '.join(missing)}")
        rc = subprocess.call([sys.executable, "-m", "pip", "install", *missing])
        if rc != 0:
            print(f"[DreamCache] pip failed ({rc}); install them yourself: {sys.executable} -m pip install -r {req}")
            return rc
    elif missing:
        print(f"[DreamCache] missing requirements (not installed, --no-install): {', '.join(missing)}")
    else:
        print("[DreamCache] requirements: all present")

    root = find_comfyui(args.comfyui)
    if root is None:
        print("[DreamCache] ComfyUI not found (put the pack in ComfyUI/custom_nodes/ or pass --comfyui); model folders "
              "not created.")
        return 0
    models = os.path.join(root, "models")
    for name in FOLDERS:
        os.makedirs(os.path.join(models, name), exist_ok=True)
    print(f"[DreamCache] model folders ready under {models}: {', '.join(FOLDERS)}")
    copied = copy_examples(os.path.join(root, "input"))
    if copied:
        print(f"[DreamCache] example images copied to {os.path.join(root, 'input')}: {', '.join(copied)}")
    print("[DreamCache] model files (nothing is downloaded automatically):")
    print("\n".join(model_report(models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
