"""Post-install step (ComfyUI-Manager runs this after cloning the pack; you can run it by hand too).

1. Requirements: run by hand, it installs the packages of requirements.txt that are missing into *this* Python
   (never torch: ComfyUI provides it). Under ComfyUI-Manager (which sets COMFYUI_FOLDERS_BASE_PATH for install
   scripts, and has installed requirements.txt itself, with its pip overrides, blacklist and no-deps setting, or
   defers it to its start-up resolver) it installs nothing and only reports what is still missing.
   Model files are never downloaded.
2. Creates the model folders: models/dreamcache (adapters), models/dreamcache_caches (saved subject caches),
   models/sams (SAM checkpoints, shared with other packs), and copies the example images of workflows/ (every image
   a shipped workflow loads, and every dreamcache_example_*.png) into the input folder (never overwriting), so the
   example workflows open with their images loaded. Both live under ComfyUI's base directory: --base-directory, else
   an explicit --comfyui, else COMFYUI_FOLDERS_BASE_PATH (ComfyUI Desktop and --base-directory installs keep models/
   and input/ apart from the ComfyUI code), else the ComfyUI folder found.
3. Prints, per shipped workflow, which of its model files are still missing, where to get them, and how to run
   it with a file you have instead.

    python install.py [--comfyui PATH] [--base-directory PATH] [--no-install | --install]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: What a shipped workflow's model file is, and its size (the workflows' own ``models`` lists give the link).
ABOUT = {
    "v2-1_512-ema-pruned.safetensors": "Stable Diffusion 2.1-base, the released adapter's base model, 5.2 GB",
    "cross_attention-199999.pt": "the authors' DreamCache adapter for SD 2.1-base, 101 MB; the link is a Google Drive "
                                 "folder: download this file from it",
    "sam_vit_b_01ec64.pth": "Segment Anything ViT-B for Subject Mask's auto mode, 375 MB; also at "
                            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "control_v11p_sd21_depth.safetensors": "an SD 2.1 depth ControlNet",
    "512-inpainting-ema.safetensors": "Stable Diffusion 2 inpainting, for dreamcache_inpaint_model only, 5.2 GB",
}
#: Loader node type -> (models folder, index of its file name in widgets_values, input name for --set).
LOADERS = {
    "CheckpointLoaderSimple": ("checkpoints", 0, "ckpt_name"),
    "DreamCacheLoader": ("dreamcache", 0, "adapter_name"),
    "DreamCacheSAMLoader": ("sams", 0, "sam_name"),
    "ControlNetLoader": ("controlnet", 0, "control_net_name"),
    "LoraLoader": ("loras", 0, "lora_name"),
}
#: File names in the shipped workflows that are placeholders for a file of the user's choice.
PLACEHOLDERS = {"your_sd21_lora.safetensors": "a placeholder: pick any SD 2.x LoRA you have"}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
FOLDERS = ("dreamcache", "dreamcache_caches", "sams")


def find_comfyui(explicit: str | None = None) -> str | None:
    """An explicit --comfyui wins and must be a ComfyUI folder (SystemExit naming it otherwise)."""
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "comfy", "model_patcher.py")):
            sys.exit(f"[DreamCache] error: --comfyui '{explicit}' is not a ComfyUI folder (no comfy/model_patcher.py).")
        return os.path.abspath(explicit)
    for cand in (os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(HERE))):
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


def workflow_needs(path: str) -> list[dict]:
    """The model files a workflow needs: its top-level ``models`` list and the file names in its active loader
    nodes (muted nodes and files the workflow makes itself, like a saved cache, are left out)."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    needs = {}
    for m in data.get("models") or []:
        needs[(m["directory"], m["name"])] = {"folder": m["directory"], "name": m["name"], "url": m.get("url"),
                                              "node": None}
    for node in data.get("nodes") or []:
        loader = LOADERS.get(node.get("type"))
        values = node.get("widgets_values")
        if loader is None or node.get("mode", 0) in (2, 4) or not isinstance(values, list) or len(values) <= loader[1]:
            continue
        folder, idx, input_name = loader
        entry = needs.setdefault((folder, values[idx]),
                                 {"folder": folder, "name": values[idx], "url": None, "node": None})
        entry["node"] = (node["id"], node.get("type"), input_name)
    return list(needs.values())


def files_in(folder: str) -> list[str]:
    """Model files under a folder, as ComfyUI names them (relative paths, '/' separated)."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(MODEL_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(out)


def model_report(models_dir: str, workflows_dir: str | None = None) -> list[str]:
    """Each model file the shipped workflows need (missing ones with where to get them and how to use a file you
    have instead), then per workflow what it still lacks."""
    workflows_dir = workflows_dir or os.path.join(HERE, "workflows")
    per_workflow, files = {}, {}
    for wf in sorted(f for f in os.listdir(workflows_dir) if f.endswith(".json")):
        needs = workflow_needs(os.path.join(workflows_dir, wf))
        per_workflow[wf[:-5]] = needs
        for n in needs:
            entry = files.setdefault((n["folder"], n["name"]), dict(n))
            entry["url"] = entry.get("url") or n.get("url")
            entry["node"] = entry.get("node") or n.get("node")
    have = {}
    lines = []
    for (folder, name), n in files.items():
        present = files_in(os.path.join(models_dir, folder))
        have[(folder, name)] = name in present
        if have[(folder, name)]:
            lines.append(f"  ok      {folder}/{name}")
            continue
        if name in PLACEHOLDERS:
            lines.append(f"  PICK    {folder}/{name} is {PLACEHOLDERS[name]}")
        else:
            lines.append(f"  MISSING {folder}/{name}" + (f" ({ABOUT[name]})" if name in ABOUT else ""))
            where = f"; get it from {n['url']}" if n.get("url") else ""
            lines.append(f"          put it in {os.path.join(models_dir, folder)}{where}")
        if present and n.get("node"):
            _nid, kind, input_name = n["node"]
            shown = ", ".join(present[:3]) + (" ..." if len(present) > 3 else "")
            lines.append(f"          or use a file you have ({shown}): pick it in {kind} in the UI, or "
                         f"`run WORKFLOW --set {kind}.{input_name}={present[0]}`")
    lines.append("  per workflow:")
    width = max(map(len, per_workflow))
    for wf, needs in per_workflow.items():
        lacking = [n["name"] for n in needs if not have[(n["folder"], n["name"])]]
        lines.append(f"    {wf:<{width}}  " + (f"missing {', '.join(lacking)}" if lacking else "ready"))
    lines.append("  To use another file than the workflow names: pick it in the loader node in the UI, or pass "
                 "`python -m dreamcache run WORKFLOW --set NODE.INPUT=FILE` (`--list` shows the nodes and inputs).")
    lines.append("  An adapter only fits its model family: cross_attention-199999.pt needs an SD 2.x checkpoint (SD "
                 "2.1-base); for SD 1.x or SDXL train an adapter with `python -m dreamcache.train`.")
    return lines


def example_inputs(workflows_dir: str) -> list[str]:
    """The images the shipped workflows load, found in the workflows themselves (every LoadImage node's file that
    workflows/ ships) and by name (every workflows/dreamcache_example_*.png): a new one needs no edit here."""
    import json

    names = {n for n in os.listdir(workflows_dir) if n.startswith("dreamcache_example_") and n.endswith(".png")}
    for wf in (f for f in os.listdir(workflows_dir) if f.endswith(".json")):
        with open(os.path.join(workflows_dir, wf), encoding="utf-8") as f:
            nodes = json.load(f).get("nodes") or []
        for node in nodes:
            values = node.get("widgets_values")
            if node.get("type") == "LoadImage" and isinstance(values, list) and values and isinstance(values[0], str):
                if os.path.basename(values[0]) == values[0] and os.path.isfile(os.path.join(workflows_dir, values[0])):
                    names.add(values[0])
    return sorted(names)


def copy_examples(input_dir: str) -> list[str]:
    import shutil

    os.makedirs(input_dir, exist_ok=True)
    copied = []
    examples = os.path.join(HERE, "workflows")
    for name in example_inputs(examples):
        if not os.path.exists(os.path.join(input_dir, name)):
            shutil.copyfile(os.path.join(examples, name), os.path.join(input_dir, name))
            copied.append(name)
    return copied


def under_manager(env=None) -> bool:
    """ComfyUI-Manager (3.x and 4.x, and cm-cli) runs install scripts with COMFYUI_FOLDERS_BASE_PATH set, after it
    has handled requirements.txt itself; a user running install.py by hand does not set it."""
    return bool((env if env is not None else os.environ).get("COMFYUI_FOLDERS_BASE_PATH"))


def base_directory(args, root: str | None) -> str | None:
    """Where models/ and input/ live: --base-directory, an explicit --comfyui, COMFYUI_FOLDERS_BASE_PATH, then the
    ComfyUI folder found."""
    if args.base_directory:
        return os.path.abspath(args.base_directory)
    if args.comfyui:
        return root
    env = os.environ.get("COMFYUI_FOLDERS_BASE_PATH")
    return os.path.abspath(env) if env else root


def check_requirements(install: bool) -> int:
    req = os.path.join(HERE, "requirements.txt")
    missing = missing_requirements(req)
    if not missing:
        print("[DreamCache] requirements: all present")
        return 0
    if install:
        print(f"[DreamCache] installing into {sys.executable}: {', '.join(missing)}")
        rc = subprocess.call([sys.executable, "-m", "pip", "install", *missing])
        if rc != 0:
            print(f"[DreamCache] pip failed ({rc}); install them yourself: {sys.executable} -m pip install -r {req}")
        return rc
    if under_manager():
        print(f"[DreamCache] still missing after ComfyUI-Manager's install: {', '.join(missing)}. Manager installs "
              "requirements.txt itself (or at the next start, with its unified resolver); if they are still missing "
              "after a restart, Manager skipped them (its pip blacklist, overrides or no-deps setting): install them "
              f"with {sys.executable} -m pip install -r {req}")
    else:
        print(f"[DreamCache] missing requirements (not installed, --no-install): {', '.join(missing)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ComfyUI-DreamCache post-install: requirements, model folders, model "
                                             "checklist")
    ap.add_argument("--comfyui", help="ComfyUI directory (default: COMFYUI_PATH or the folder two levels up)")
    ap.add_argument("--base-directory", help="ComfyUI's base directory for models/ and input/ (as ComfyUI's "
                                             "--base-directory; default: COMFYUI_FOLDERS_BASE_PATH, else the "
                                             "ComfyUI directory)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--no-install", action="store_true", help="only report missing requirements, do not pip install")
    mode.add_argument("--install", action="store_true", help="pip install missing requirements even under "
                                                             "ComfyUI-Manager")
    args = ap.parse_args(argv)

    rc = check_requirements(install=args.install or not (args.no_install or under_manager()))
    if rc != 0:
        return rc

    root = find_comfyui(args.comfyui)
    base = base_directory(args, root)
    if base is None:
        print("[DreamCache] ComfyUI not found (put the pack in ComfyUI/custom_nodes/ or pass --comfyui); model folders "
              "not created.")
        return 0
    models = os.path.join(base, "models")
    for name in FOLDERS:
        os.makedirs(os.path.join(models, name), exist_ok=True)
    print(f"[DreamCache] model folders ready under {models}: {', '.join(FOLDERS)}")
    copied = copy_examples(os.path.join(base, "input"))
    if copied:
        print(f"[DreamCache] example images copied to {os.path.join(base, 'input')}: {', '.join(copied)}")
    print("[DreamCache] model files of the shipped workflows (nothing is downloaded automatically):")
    print("\n".join(model_report(models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
