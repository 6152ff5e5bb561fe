"""install.py (what ComfyUI-Manager runs after cloning): requirements check without torch, model folders created
inside the ComfyUI tree, a checklist of missing model files with where to get them, no downloads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_comfyui(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "model_patcher.py").write_text("# stand-in\n")
    return root


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "install.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_creates_folders_and_lists_missing_models(tmp_path):
    root = fake_comfyui(tmp_path)
    r = run("--comfyui", root, "--no-install")
    assert r.returncode == 0, r.stderr
    for name in ("dreamcache", "dreamcache_caches", "sams"):
        assert (root / "models" / name).is_dir()
    assert r.stdout.count("MISSING") == 5  # checkpoint, adapter, SAM, ControlNet, inpainting checkpoint; each once
    assert "MISSING checkpoints/v2-1_512-ema-pruned.safetensors" in r.stdout and "5.2 GB" in r.stdout
    assert "MISSING sams/sam_vit_b_01ec64.pth" in r.stdout  # the shipped workflows' Subject Mask needs SAM
    assert "drive.google.com" in r.stdout and "dl.fbaipublicfiles.com" in r.stdout
    shipped = (ROOT / "workflows" / "dreamcache_example_subject.png").read_bytes()
    assert (root / "input" / "dreamcache_example_subject.png").read_bytes() == shipped
    (root / "input" / "dreamcache_example_subject.png").write_bytes(b"the user's own file")
    run("--comfyui", root, "--no-install")
    # never overwritten
    assert (root / "input" / "dreamcache_example_subject.png").read_bytes() == b"the user's own file"
    (root / "models" / "dreamcache" / "cross_attention-199999.pt").write_bytes(b"x")
    r = run("--comfyui", root, "--no-install")
    assert "ok      dreamcache/cross_attention-199999.pt" in r.stdout and r.stdout.count("MISSING") == 4


def test_reports_per_workflow_the_files_it_names_and_how_to_use_another(tmp_path):
    """A checkpoint of another name is not the file the workflows need: say so, and how to run with it."""
    root = fake_comfyui(tmp_path)
    for folder, name in (("checkpoints", "random_sd15.safetensors"), ("dreamcache", "cross_attention-199999.pt"),
                         ("sams", "sam_vit_b_01ec64.pth")):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        (root / "models" / folder / name).write_bytes(b"x")
    r = run("--comfyui", root, "--no-install")
    assert r.returncode == 0, r.stderr
    assert "ok      checkpoints/" not in r.stdout and "MISSING checkpoints/v2-1_512-ema-pruned.safetensors" in r.stdout
    assert "--set CheckpointLoaderSimple.ckpt_name=random_sd15.safetensors" in r.stdout
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("    dreamcache_")}
    assert set(lines) == {p.stem for p in (ROOT / "workflows").glob("*.json")}
    assert lines["dreamcache_basic"].endswith("missing v2-1_512-ema-pruned.safetensors")
    assert "control_v11p_sd21_depth.safetensors" in lines["dreamcache_controlnet"]
    assert "your_sd21_lora.safetensors" in lines["dreamcache_lora"] and "PICK    loras/your_sd21_lora" in r.stdout
    assert "only fits its model family" in r.stdout
    (root / "models" / "checkpoints" / "v2-1_512-ema-pruned.safetensors").write_bytes(b"x")
    r = run("--comfyui", root, "--no-install")
    assert [ln for ln in r.stdout.splitlines() if "dreamcache_basic" in ln][0].endswith("ready")


def test_an_explicit_path_that_is_not_comfyui_is_an_error(tmp_path):
    r = run("--comfyui", tmp_path / "nope", "--no-install")
    assert r.returncode != 0 and f"'{tmp_path / 'nope'}' is not a ComfyUI folder" in r.stderr


def test_requirements_never_include_torch():
    sys.path.insert(0, str(ROOT))
    import install

    names = [n.lower() for n, _ in install.requirement_names(str(ROOT / "requirements.txt"))]
    assert "torch" not in names and "torchvision" not in names
    assert {"safetensors", "numpy", "pillow", "segment-anything"} <= set(names)
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in deps
    for n in names:
        assert n in deps.lower(), f"pyproject dependencies must mirror requirements.txt ({n})"


def test_without_comfyui_it_says_so(tmp_path):
    import pytest

    if ROOT.parent.name == "custom_nodes":
        pytest.skip("the pack sits inside a ComfyUI tree, so install.py finds it")
    r = subprocess.run([sys.executable, str(ROOT / "install.py"), "--no-install"], capture_output=True, text=True,
                       timeout=120,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ComfyUI not found" in r.stdout
