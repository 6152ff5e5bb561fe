"""install.py, run by hand and the way ComfyUI-Manager 4.x runs it: requirements check without torch (installed by
hand, only reported under Manager, which installs requirements.txt itself), model folders and example images under
ComfyUI's base directory (COMFYUI_FOLDERS_BASE_PATH, apart from the ComfyUI tree, under Manager), a checklist of
missing model files with where to get them, no downloads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_comfyui(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "model_patcher.py").write_text("# stand-in\n")
    return root


def manual_env():
    """A user's shell: no Manager variables."""
    return {k: v for k, v in os.environ.items() if k not in ("COMFYUI_FOLDERS_BASE_PATH", "COMFYUI_PATH")}


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "install.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=manual_env())


def pack_copy(tmp_path, extra_requirement=None):
    """The pack's install.py, requirements.txt and workflows/ in ComfyUI/custom_nodes/ComfyUI-DreamCache of a
    stand-in ComfyUI tree; ``extra_requirement`` adds a line to its requirements.txt."""
    comfy = fake_comfyui(tmp_path)
    pack = comfy / "custom_nodes" / "ComfyUI-DreamCache"
    pack.mkdir(parents=True)
    shutil.copy(ROOT / "install.py", pack / "install.py")
    shutil.copytree(ROOT / "workflows", pack / "workflows")
    req = (ROOT / "requirements.txt").read_text()
    (pack / "requirements.txt").write_text(req + (f"\n{extra_requirement}\n" if extra_requirement else ""))
    return comfy, pack


def as_manager(comfy, pack, base):
    """What ComfyUI-Manager 4.x does after installing requirements.txt: ``[sys.executable, "install.py"]`` in the
    pack's folder, with the environment it gives install scripts (COMFYUI_PATH, COMFYUI_FOLDERS_BASE_PATH). pip
    cannot reach an index here, so a pip install would fail the run."""
    env = dict(manual_env(), COMFYUI_PATH=str(comfy), COMFYUI_FOLDERS_BASE_PATH=str(base), PIP_NO_INDEX="1",
               PIP_FIND_LINKS="")
    return subprocess.run([sys.executable, "install.py"], cwd=pack, env=env, capture_output=True, text=True,
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
    assert "huggingface.co/ybelkada/segment-anything/resolve/main/checkpoints/sam_vit_b_01ec64.pth" in r.stdout
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
                       timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ComfyUI not found" in r.stdout


def test_under_manager_everything_goes_to_the_base_path_and_nothing_is_pip_installed(tmp_path):
    """Manager 4.x, requirements already installed, a base directory apart from the ComfyUI tree (ComfyUI Desktop,
    --base-directory): models/ and input/ there, none in the ComfyUI tree, no pip run."""
    comfy, pack = pack_copy(tmp_path)
    base = tmp_path / "user-data"
    r = as_manager(comfy, pack, base)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "requirements: all present" in r.stdout and "installing into" not in r.stdout
    for name in ("dreamcache", "dreamcache_caches", "sams"):
        assert (base / "models" / name).is_dir()
    assert not (comfy / "models").exists() and not (comfy / "input").exists()
    loaded = {n["widgets_values"][0] for wf in (ROOT / "workflows").glob("*.json")
              for n in json.loads(wf.read_text())["nodes"] if n["type"] == "LoadImage"}
    shipped = sorted({p.name for p in (ROOT / "workflows").glob("dreamcache_example_*.png")} | loaded)
    assert len(shipped) >= 3 and sorted(p.name for p in (base / "input").iterdir()) == shipped
    assert f"put it in {base / 'models' / 'checkpoints'}" in r.stdout


def test_every_image_a_workflow_loads_is_copied_whatever_its_name(tmp_path):
    """A new workflow's image (e.g. a background photo) is copied without an edit to install.py."""
    comfy, pack = pack_copy(tmp_path)
    (pack / "workflows" / "beach_background.png").write_bytes(b"png")
    wf = json.loads((pack / "workflows" / "dreamcache_basic.json").read_text())
    wf["nodes"].append({"id": 999, "type": "LoadImage", "widgets_values": ["beach_background.png", "image"]})
    (pack / "workflows" / "dreamcache_new.json").write_text(json.dumps(wf))
    (pack / "workflows" / "dreamcache_example_extra.png").write_bytes(b"png")
    r = as_manager(comfy, pack, tmp_path / "base")
    assert r.returncode == 0, r.stdout + r.stderr
    inputs = {p.name for p in (tmp_path / "base" / "input").iterdir()}
    assert {"beach_background.png", "dreamcache_example_extra.png", "dreamcache_example_subject.png"} <= inputs


def test_under_manager_a_missing_requirement_is_reported_not_installed(tmp_path):
    comfy, pack = pack_copy(tmp_path, extra_requirement="dreamcache-no-such-package>=1.0")
    r = as_manager(comfy, pack, tmp_path / "base")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing into" not in r.stdout
    assert "still missing after ComfyUI-Manager's install: dreamcache-no-such-package>=1.0" in r.stdout
    assert f"-m pip install -r {pack / 'requirements.txt'}" in r.stdout
    assert (tmp_path / "base" / "models" / "dreamcache").is_dir()


def test_by_hand_a_missing_requirement_is_pip_installed(tmp_path):
    """A manual run installs what is missing (here pip has no index, so it fails and says what to run)."""
    comfy, pack = pack_copy(tmp_path, extra_requirement="dreamcache-no-such-package>=1.0")
    env = dict(manual_env(), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    r = subprocess.run([sys.executable, str(pack / "install.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert "installing into" in r.stdout and "dreamcache-no-such-package>=1.0" in r.stdout
    assert r.returncode != 0 and "pip failed" in r.stdout and "install them yourself" in r.stdout
    # by hand in the pack's folder inside ComfyUI/custom_nodes: the ComfyUI tree two levels up is the base
    r = subprocess.run([sys.executable, "install.py", "--no-install"], cwd=pack, env=manual_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "missing requirements (not installed, --no-install)" in r.stdout
    assert (comfy / "models" / "dreamcache").is_dir() and (comfy / "input" / "dreamcache_example_subject.png").is_file()


def test_an_explicit_base_directory_wins(tmp_path):
    comfy = fake_comfyui(tmp_path)
    r = run("--comfyui", comfy, "--base-directory", tmp_path / "b", "--no-install")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "models" / "sams").is_dir() and not (comfy / "models").exists()
