"""What a new user meets first, outside a running ComfyUI. Protects: files the pack writes get the usual
permissions under the umask (a ComfyUI running as another user can read them); ``python -m dreamcache --help``
works in a Python without torch and commands that need torch say in one line to use ComfyUI's Python; an explicit
``--comfyui`` that is not ComfyUI is an error naming it, even with COMFYUI_PATH set; ``info`` on a reference .pt
says how to give its family; the runner names each refused node's error once."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_respect_the_umask(umask_022, tmp_path):
    """Adapters (converted or trained), saved caches and training state all go through atomic_save_safetensors."""
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.adapter_io import atomic_save_safetensors, save_adapter
    from dreamcache.core.cache import from_captures, save_cache
    from dreamcache.core.layers import LayerRef

    a = DreamCacheAdapter({LayerRef("middle_block.1"): 32})
    save_adapter(str(tmp_path / "adapter.safetensors"), a, family="sd1")
    save_cache(from_captures({LayerRef("middle_block.1"): torch.randn(1, 8, 2, 2)}, model_family="sd1"),
               str(tmp_path / "cache.safetensors"))
    atomic_save_safetensors({"x": torch.zeros(1)}, str(tmp_path / "run.state.safetensors"), {"format": "t"})
    for name in ("adapter.safetensors", "cache.safetensors", "run.state.safetensors"):
        assert mode(tmp_path / name) == 0o644, (name, oct(mode(tmp_path / name)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left behind
        "adapter.safetensors", "cache.safetensors", "run.state.safetensors"]
    os.umask(0o077)  # a stricter umask is respected too
    save_adapter(str(tmp_path / "private.safetensors"), a, family="sd1")
    assert mode(tmp_path / "private.safetensors") == 0o600


def test_convert_writes_a_readable_file(golden_path, tmp_path):
    r = subprocess.run(["sh", "-c", f'umask 022 && "{sys.executable}" -m dreamcache convert "$0" "$1" --family sd2',
                        str(golden_path / "golden_public_adapter.pt"), str(tmp_path / "a.safetensors")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "a.safetensors") == 0o644


def torchless_python() -> str:
    """A Python that cannot import torch: the system python3 when it has none, else a fresh venv."""
    for cand in (shutil.which("python3"), "/usr/bin/python3"):
        if cand and subprocess.run([cand, "-c", "import torch"], capture_output=True).returncode != 0:
            return cand
    pytest.skip("no Python without torch on this machine")


def test_help_needs_no_torch_and_torch_commands_say_use_comfyuis_python(tmp_path):
    py = torchless_python()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([py, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)

    for args in (["-m", "dreamcache", "--help"], ["-m", "dreamcache", "run", "--help"],
                 ["-m", "dreamcache", "convert", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage: python -m dreamcache" in r.stdout and not r.stderr, (args, r.stderr)
    for args in (["-m", "dreamcache", "info", "x.pt"], ["-m", "dreamcache", "convert", "x.pt"],
                 ["-m", "dreamcache.train", "--help"], ["-m", "dreamcache.data", "check", "d"]):
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        # one line naming the first of ComfyUI's packages this Python lacks (torch, or numpy where a bare system
        # Python has neither and the command imports numpy first)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert re.search(r"needs the Python package '(torch|numpy|safetensors|PIL)'", r.stderr), r.stderr
        assert "run it with ComfyUI's Python" in r.stderr
    wf = ROOT / "workflows" / "dreamcache_basic.json"
    r = subprocess.run([py, "-m", "dreamcache", "run", str(wf)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env={**env, "COMFYUI_PATH": str(fake_comfyui(tmp_path))})
    assert r.returncode == 2 and "has no torch" in r.stderr and "--server" in r.stderr, r.stderr


def test_dtype_choices_match_the_storage_dtypes():
    from dreamcache.apps.run.cli import DTYPE_CHOICES
    from dreamcache.core.adapter_io import STORAGE_DTYPES

    assert sorted(DTYPE_CHOICES) == sorted(STORAGE_DTYPES)


def fake_comfyui(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True, exist_ok=True)
    (root / "comfy" / "model_patcher.py").write_text("# stand-in\n")
    return root


def test_explicit_comfyui_path_wins_and_must_be_comfyui(tmp_path, monkeypatch):
    from dreamcache.comfy.env import find_comfyui
    from dreamcache.core.errors import DreamCacheError

    good = fake_comfyui(tmp_path)
    monkeypatch.setenv("COMFYUI_PATH", str(good))
    assert find_comfyui() == good.resolve()
    with pytest.raises(DreamCacheError, match="'/bad/path' is not a ComfyUI folder"):
        find_comfyui("/bad/path")
    other = fake_comfyui(tmp_path / "other")
    assert find_comfyui(other) == other.resolve()  # not COMFYUI_PATH's tree
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "missing"))
    with pytest.raises(DreamCacheError, match="COMFYUI_PATH="):
        find_comfyui()
    r = subprocess.run([sys.executable, "-m", "dreamcache", "run", str(ROOT / "workflows" / "dreamcache_basic.json"),
                        "--comfyui", "/bad/path"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COMFYUI_PATH": str(good)})
    assert r.returncode == 2 and "'/bad/path' is not a ComfyUI folder" in r.stderr and "Traceback" not in r.stderr


def test_info_on_a_reference_pt_hints_at_the_family(golden_path):
    import json

    r = subprocess.run([sys.executable, "-m", "dreamcache", "info", str(golden_path / "golden_public_adapter.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "unknown"
    assert "--family sd2" in r.stderr and "base_family sd2" in r.stderr


def test_each_refused_nodes_error_is_named_once():
    """ComfyUI 0.3.64 lists a failed validate_inputs once per input the function takes (here sampler_name,
    scheduler, mode: the same message three times) and repeats every error in the top-level details."""
    from dreamcache.apps.run.comfy_client import describe_rejection

    msg = "sampler_name: 'ddim2' is not one of the choices (euler, ddim)."
    inputs = ("sampler_name", "scheduler", "mode")
    answer = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "\n".join(f"Custom validation failed for node: {x} - {msg}" for x in inputs)},
        "node_errors": {"11": {"class_type": "DreamCacheDualGuidanceSampler", "dependent_outputs": ["13"], "errors": [
            {"type": "custom_validation_failed", "message": "Custom validation failed for node",
             "details": f"{x} - {msg}", "extra_info": {"input_name": x}} for x in inputs]}},
    }
    prompt = {"11": {"class_type": "DreamCacheDualGuidanceSampler", "_meta": {"title": "Sampler"}}}
    text = describe_rejection(answer, prompt)
    assert text.count("ddim2") == 1 and "node 11 (Sampler, DreamCacheDualGuidanceSampler)" in text, text


def test_base_directory_must_hold_this_pack(tmp_path):
    """ComfyUI started with --base-directory loads custom nodes only from BASE/custom_nodes and crashes when it is
    missing: the runner says so in one sentence before starting it, and accepts a base that links the pack."""
    from dreamcache.apps.run.runner import PACK_ROOT, check_base_directory
    from dreamcache.core.errors import DreamCacheError

    base = tmp_path / "base"
    with pytest.raises(DreamCacheError, match="has no custom_nodes folder"):
        check_base_directory(str(base))
    (base / "custom_nodes" / "other_pack").mkdir(parents=True)
    with pytest.raises(DreamCacheError, match="does not hold this pack"):
        check_base_directory(str(base))
    os.symlink(PACK_ROOT, base / "custom_nodes" / "ComfyUI-DreamCache")
    assert check_base_directory(str(base)) is None
    assert (Path(PACK_ROOT) / "dreamcache" / "apps" / "run" / "runner.py").is_file()
