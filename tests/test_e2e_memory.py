"""Memory on a real ComfyUI server (issue 26): what the pack holds is released when the user asks, and queued prompts
with different subjects do not pile up.

Protects: after ``POST /free`` with ``unload_models`` and ``free_memory`` no object of the pack stays alive (the
patch, the adapter module and its ModelPatcher, its weights, the K/V and folded-weight memos, the SAM; checked with
weak references kept by a test-only node inside the server), and the next prompt rebuilds them and saves the same
image bit for bit; under ComfyUI's ``--cache-none`` and ``--cache-lru N`` a soak of 20 prompts with different subjects
keeps the pack's objects of old prompts released and the server's RSS flat (printed per prompt), and POST /free then
releases the rest. Tiny models on the CPU: three servers, about a minute of CPU in all.
"""
from __future__ import annotations

import json
import time

import pytest
from helpers import ON_GPU
from test_e2e_server import SUBJECT, make_base_dir


def start(comfy, tmp_path_factory, *extra):
    from dreamcache.apps.run.comfy_client import ComfyServer

    base = tmp_path_factory.mktemp("comfy_mem")
    make_base_dir(base)
    srv = ComfyServer(comfy, base_directory=str(base), cpu=not ON_GPU, log_path=str(base / "server.log"),
                      extra_args=list(extra))
    srv.start()
    srv.base = base
    return srv


def subject_photo(path, i: int):
    """A different subject per prompt: a coloured ellipse of its own size and place on white."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    img = np.full((96, 96, 3), 255, np.uint8)
    yy, xx = np.ogrid[:96, :96]
    cx, cy, rx, ry = rng.integers(30, 66), rng.integers(30, 66), rng.integers(12, 28), rng.integers(12, 28)
    img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = rng.integers(0, 200, 3)
    Image.fromarray(img).save(path)


def prompt(image: str, tag: str, seed: int = 0, sam: bool = False) -> dict:
    p = {
        "1": {"class_type": "DreamCacheTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "DreamCacheLoader", "inputs": {"adapter_name": "tiny_sd1.safetensors",
                                                           "base_family": "from file"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "DreamCacheBuildFeatureCache", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["13", 0] if sam else ["3", 0], "clip": ["1", 1],
            "adapter": ["2", 0], "seed": 0, "resolution": 64, "fit": "pad", "batch_mode": "concat"}},
        "5": {"class_type": "DreamCacheApply", "inputs": {"model": ["1", 0], "adapter": ["2", 0], "cache": ["4", 0],
                                                          "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a mug on a beach"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "DreamCacheDualGuidanceSampler", "inputs": {
            "model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0], "seed": seed,
            "steps": 2, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "text_scale": 7.5,
            "image_scale": 5.0, "mode": "combined"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": f"mem_{tag}"}},
        "14": {"class_type": "DreamCacheTestTrack", "inputs": {"model": ["5", 0], "latent": ["9", 0], "tag": tag}},
    }
    if sam:
        p["12"] = {"class_type": "DreamCacheTestFreshSAM", "inputs": {"seed": 123}}
        p["13"] = {"class_type": "DreamCacheSubjectMask", "inputs": {
            "image": ["3", 0], "prompt_mode": "auto", "sam": ["12", 0], "box_x": 0, "box_y": 0, "box_width": 0,
            "box_height": 0, "positive_points": "", "negative_points": "", "threshold": 0.5, "grow": 0, "feather": 0,
            "layout": "train", "size": 64, "background": "#ffffff", "invert_mask": False}}
        p["14"]["inputs"]["sam"] = ["12", 0]
    return p


def alive(srv, tag=None) -> list:
    q = f"?tag={tag}" if tag else ""
    return srv.client.get_json(f"/dreamcache_test/alive{q}")["alive"]


def run(srv, p) -> "object":
    import numpy as np
    from PIL import Image

    entry = srv.client.wait(srv.client.queue(p), timeout=600)
    img = entry["outputs"]["11"]["images"][0]
    arr = np.asarray(Image.open(srv.base / "output" / img["subfolder"] / img["filename"]))
    assert arr.std() > 0 and np.isfinite(arr).all()  # not flat, not NaN
    return arr


def rss(srv) -> int:
    import psutil

    return psutil.Process(srv.proc.pid).memory_info().rss


def post_free(srv):
    body = json.dumps({"unload_models": True, "free_memory": True}).encode()
    status, _ = srv.client._request("POST", "/free", body, {"Content-Type": "application/json"})
    assert status == 200


def wait_released(srv, tag, timeout=60.0) -> list:
    deadline = time.monotonic() + timeout
    left = alive(srv, tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = alive(srv, tag)
    return left


@pytest.fixture(scope="module")
def classic(comfy, tmp_path_factory):
    srv = start(comfy, tmp_path_factory)
    yield srv
    srv.stop()


def test_post_free_releases_every_object_of_the_pack_and_the_next_prompt_is_identical(classic):
    srv = classic
    first = run(srv, prompt(SUBJECT.name, "first", sam=True))
    held = {label for _, label in alive(srv, "first")}
    # the probe works: while ComfyUI caches the outputs, the pack's objects are there (K/V and folded memos filled)
    assert {"patch", "adapter0", "adapter0.weight", "adapter_patcher0", "sam", "sam_module"} <= held, held
    assert any(k.startswith("_kv") for k in held) and any(k.startswith("_folded") for k in held), held
    post_free(srv)
    left = wait_released(srv, "first")
    assert not left, f"still alive after POST /free: {left}"
    again = run(srv, prompt(SUBJECT.name, "again", sam=True))
    assert {label for _, label in alive(srv, "again")} >= {"patch", "adapter0", "sam"}  # rebuilt
    assert again.shape == first.shape and (again == first).all()  # bit for bit
    assert srv.alive()


SOAK = 20


@pytest.mark.parametrize("mode", [("--cache-none",), ("--cache-lru", "3")], ids=["cache-none", "cache-lru-3"])
def test_soak_of_prompts_with_different_subjects_holds_memory(comfy, tmp_path_factory, mode):
    srv = start(comfy, tmp_path_factory, *mode)
    try:
        for i in range(SOAK):
            subject_photo(srv.base / "input" / f"subject_{i}.png", i)
        sizes, held = [], []
        for i in range(SOAK):
            run(srv, prompt(f"subject_{i}.png", f"p{i}", seed=i))
            left = alive(srv)  # gc.collect() inside the server first
            held.append(len({t for t, label in left if label == "patch"}))
            sizes.append(rss(srv))
        print(f"{' '.join(mode)}: RSS per prompt (MB): " + ", ".join(f"{s / 1e6:.0f}" for s in sizes))
        print(f"{' '.join(mode)}: prompts whose patch is still alive after each prompt: {held}")
        # ComfyUI keeps the last prompt's models loaded (and, with an LRU of 3 node results, a little more): the pack's
        # objects of older prompts are released, never piling up
        assert max(held) <= 2, held
        gone = {t for t, _ in alive(srv)}
        assert not gone & {f"p{i}" for i in range(SOAK - 2)}, sorted(gone)
        growth = (sizes[-1] - sizes[4]) / 1e6
        assert growth < 40, f"RSS grew by {growth:.0f} MB from prompt 5 to prompt {SOAK}: {sizes}"
        post_free(srv)  # and POST /free releases the rest in this cache mode too
        left = wait_released(srv, None)
        assert not left, f"still alive after POST /free: {left}"
    finally:
        srv.stop()
