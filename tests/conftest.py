"""Test setup.

* The core (``dreamcache``) is importable from the repo root; its tests need only torch and safetensors.
* ComfyUI integration tests use the ``comfy`` / ``pack`` fixtures. ComfyUI is found through ``COMFYUI_PATH`` or
  because this pack sits in ``ComfyUI/custom_nodes/<pack>/``. Without it those tests are skipped with the reason
  shown; with ``COMFYUI_PATH`` set, a ComfyUI that fails to import is an error, never a skip.
* The golden fixture is looked up in ``DREAMCACHE_FIXTURES``, ``../shared/fixtures`` or ``./shared/fixtures``.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# One CPU thread for the tests and the processes they start (ComfyUI servers, CLIs), unless DREAMCACHE_TEST_THREADS
# says otherwise: the tiny models' operations are far too small to split, and on a 2-core machine two OpenMP threads
# spin-wait on each other (a ControlNet guidance test: 4.8 s with one thread, 78 s with two on a busy machine).
# benchmarks/bench.py sets its own thread count.
TEST_THREADS = os.environ.get("DREAMCACHE_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = TEST_THREADS
os.environ["MKL_NUM_THREADS"] = TEST_THREADS


def _find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        if not (p / "comfy" / "model_patcher.py").is_file():
            raise pytest.UsageError(f"COMFYUI_PATH={env} is not a ComfyUI source tree (no comfy/model_patcher.py).")
        return p
    parent = ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy" / "model_patcher.py").is_file():
        return parent.parent
    return None


def _find_fixtures() -> Path | None:
    for c in (os.environ.get("DREAMCACHE_FIXTURES"), ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures"):
        if c and (Path(c) / "golden_public.safetensors").is_file():
            return Path(c)
    return None


COMFYUI = _find_comfyui()
FIXTURES = _find_fixtures()
NO_COMFY = "ComfyUI not importable: set COMFYUI_PATH to a ComfyUI checkout or install the pack in ComfyUI/custom_nodes/"

# ComfyUI first on sys.path: its top-level `nodes` module must win over this pack's `nodes/` package.
if COMFYUI is not None and str(COMFYUI) not in sys.path:
    sys.path.insert(0, str(COMFYUI))
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.append(p)

from helpers import ON_GPU, TEST_DEVICE  # noqa: E402  (tests/ is on sys.path now)


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(TEST_THREADS))


def pytest_report_header(config):
    where = f"ComfyUI at {COMFYUI}" if COMFYUI else NO_COMFY
    return [f"dreamcache: {where}", f"dreamcache: golden fixture at {FIXTURES or 'NOT FOUND'}",
            f"dreamcache: integration tests compute on {TEST_DEVICE} (DREAMCACHE_TEST_DEVICE), "
            f"{TEST_THREADS} CPU thread(s)"]


@pytest.fixture(scope="session")
def comfy():
    """Imports ComfyUI in CPU mode (or on the GPU with DREAMCACHE_TEST_DEVICE=cuda) and returns its root path
    (skips the test without ComfyUI)."""
    if COMFYUI is None:
        pytest.skip(NO_COMFY)
    import torch
    from comfy.cli_args import args

    args.cpu = not ON_GPU
    args.disable_api_nodes = True
    if ON_GPU:
        if TEST_DEVICE != "cuda" or not torch.cuda.is_available():
            raise pytest.UsageError(f"DREAMCACHE_TEST_DEVICE={TEST_DEVICE}: only 'cuda' is supported, and it needs "
                                    "a CUDA GPU")
        # parity at 1e-5 needs full fp32 matmuls and convolutions (TF32 rounds to 10 mantissa bits)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.samplers  # noqa: F401

    import nodes  # noqa: F401  (ComfyUI's nodes.py)

    assert Path(nodes.__file__).resolve().parent == COMFYUI, \
        f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py"
    if ON_GPU:  # ComfyUI may change these while importing; the parity bounds assume fp32 everywhere
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        assert comfy.model_management.get_torch_device().type == "cuda"
    return COMFYUI


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def pack(comfy, models_dir):
    """This pack loaded by ComfyUI's own custom-node loader (as a user's install would be), with the model folders
    pointed at a temporary directory. Returns the loaded package module (its ``.dreamcache`` is the core it uses)."""
    import folder_paths

    import nodes

    folder_paths.models_dir = str(models_dir)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(ROOT), ignore=set(), module_parent="custom_nodes"))
    assert ok, "ComfyUI failed to load the pack (see the log above)"
    module = sys.modules[str(ROOT).replace(".", "_x_")]
    module.loaded_node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before) or sorted(
        k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(ROOT.name)
    )
    return module


@pytest.fixture(scope="session")
def golden_path():
    if FIXTURES is None:
        pytest.skip("golden fixture not found (set DREAMCACHE_FIXTURES or keep shared/fixtures beside the repo)")
    return FIXTURES


@pytest.fixture(scope="session")
def golden(golden_path):
    from safetensors import safe_open

    with safe_open(str(golden_path / "golden_public.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


@pytest.fixture(scope="session")
def sd1(pack):
    """Tiny SD1 model, CLIP and VAE, a random adapter that fits, and a cache built with BuildFeatureCache."""
    from types import SimpleNamespace

    import torch
    from helpers import random_adapter, run_node
    from tiny_models import make_clip, make_model, make_vae

    ns = SimpleNamespace(core=pack.dreamcache, model=make_model("sd1"), clip=make_clip("sd1"), vae=make_vae())
    ns.adapter = random_adapter(ns.core, ns.model, seed=0)
    g = torch.Generator().manual_seed(5)
    ns.image = torch.rand(1, 64, 64, 3, generator=g)
    ns.cache, ns.reference = run_node("DreamCacheBuildFeatureCache", model=ns.model, vae=ns.vae, image=ns.image,
                                      clip=ns.clip,
                                      adapter=ns.adapter, seed=0, resolution=64, fit="pad", batch_mode="concat")
    ns.positive = run_node("CLIPTextEncode", clip=ns.clip, text="a photo of a dog")[0]
    ns.negative = run_node("CLIPTextEncode", clip=ns.clip, text="")[0]
    return ns
