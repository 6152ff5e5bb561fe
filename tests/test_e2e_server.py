"""End-to-end against a real ComfyUI server process (127.0.0.1, free port, --cpu unless DREAMCACHE_TEST_DEVICE=cuda,
its own base directory).

The pack and a test-only node pack (tiny random-weight models) are linked into the base directory's
custom_nodes. Protects: /object_info lists every node of the pack with tooltips; graphs run through /prompt to a
saved image; broken graphs (wrong types, missing adapter file, adapter/model mismatch) get the clear error and the
server stays up; ``python -m dreamcache run`` works against a running server.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ON_GPU

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SUBJECT = ROOT / "workflows" / "dreamcache_example_subject.png"
PERMANENT_IDS = ["DreamCacheLoader", "DreamCacheBuildFeatureCache", "DreamCacheApply", "DreamCacheGuider",
                 "DreamCacheDualGuidanceSampler", "DreamCacheSave", "DreamCacheLoad", "DreamCacheCombine",
                 "DreamCacheSAMLoader", "DreamCacheSubjectMask"]
PERMANENT_IDS += ["DreamCacheApplyAdvanced", "DreamCacheAttentionRecorder", "DreamCacheShowAttention"]
TINY_CHANNELS = {"middle_block.1": 128, "output_blocks.4.1": 128, "output_blocks.6.1": 64, "output_blocks.8.1": 64,
                 "output_blocks.10.1": 32}


#: Example images the e2e base directory holds at 64x64 (the photo the inpaint/img2img/outpaint workflows load).
TINY_INPUTS = ("dreamcache_example_kitchen.png", "dreamcache_example_kitchen_mask.png")


def write_tiny_adapter(path: Path, family: str | None, seed: int = 0):
    """An adapter whose channels fit the tiny SD1/SD2 models of tests/tiny_models.py."""
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.adapter_io import save_adapter
    from dreamcache.core.layers import LayerRef

    a = DreamCacheAdapter({LayerRef(m): c for m, c in TINY_CHANNELS.items()})
    a.reset_reference_init(seed)
    if path.suffix == ".pt":
        torch.save(a.reference_state_dict(), path)
    else:
        save_adapter(str(path), a, family=family)


def make_base_dir(base: Path):
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-DreamCache")
    os.symlink(TESTS / "e2e_nodes", base / "custom_nodes" / "dreamcache_test_nodes")
    for d in ("dreamcache", "dreamcache_caches", "checkpoints", "loras", "controlnet", "sams"):
        (base / "models" / d).mkdir(parents=True, exist_ok=True)
    write_tiny_adapter(base / "models" / "dreamcache" / "tiny_sd1.safetensors", "sd1")
    write_tiny_adapter(base / "models" / "dreamcache" / "cross_attention-199999.pt", None, seed=1)
    (base / "input").mkdir()
    for img in (ROOT / "workflows").glob("*.png"):
        shutil.copy(img, base / "input" / img.name)
    for name in TINY_INPUTS:  # the photo workflows at 64², so their tiny U-Net runs in seconds
        from PIL import Image

        Image.open(base / "input" / name).resize((64, 64)).save(base / "input" / name)


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    from dreamcache.apps.run.comfy_client import ComfyServer

    base = tmp_path_factory.mktemp("comfy_base")
    make_base_dir(base)
    srv = ComfyServer(comfy, base_directory=str(base), cpu=not ON_GPU, log_path=str(base / "server.log"))
    srv.start()
    srv.base = base
    yield srv
    srv.stop()


def basic_prompt(adapter="tiny_sd1.safetensors", family="sd1", steps=2):
    return {
        "1": {"class_type": "DreamCacheTestTinyCheckpoint", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "DreamCacheLoader", "inputs": {"adapter_name": adapter, "base_family": "from file"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": SUBJECT.name}},
        "4": {"class_type": "DreamCacheBuildFeatureCache", "inputs": {"model": ["1", 0], "vae": ["1", 2],
                                                                      "image": ["3", 0], "clip": ["1", 1],
                                                                      "adapter": ["2", 0], "seed": 0, "resolution": 64,
                                                                      "fit": "pad", "batch_mode": "concat"}},
        "5": {"class_type": "DreamCacheApply", "inputs": {"model": ["1", 0], "adapter": ["2", 0], "cache": ["4", 0],
                                                          "strength": 1.0,
                                                          "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a mug on a beach"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "DreamCacheDualGuidanceSampler", "inputs": {"model": ["5", 0], "positive": ["6", 0],
                                                                        "negative": ["7", 0], "latent_image": ["8", 0],
                                                                        "seed": 0, "steps": steps,
                                                                        "sampler_name": "euler", "scheduler": "normal",
                                                                        "denoise": 1.0,
                                                                        "text_scale": 7.5, "image_scale": 5.0,
                                                                        "mode": "combined"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "e2e"}},
    }


def test_object_info_lists_every_node_with_tooltips(server):
    info = server.client.object_info()
    for node_id in PERMANENT_IDS:
        assert node_id in info, node_id
        spec = info[node_id]
        assert spec["category"].startswith("DreamCache") and spec["description"]
        for section in ("required", "optional"):
            for name, s in spec["input"].get(section, {}).items():
                assert len(s) > 1 and s[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    from dreamcache.apps.run.workflow import combo_options

    assert "tiny_sd1.safetensors" in combo_options(info["DreamCacheLoader"]["input"]["required"]["adapter_name"])


def test_help_pages_are_served(server):
    """The frontend's help panel first fetches /extensions/<pack folder>/docs/<NodeId>/<locale>.md (frontend 1.27 to
    1.58; "en" by default), and only on a 404 the flat <NodeId>.md."""
    for node_id in PERMANENT_IDS:
        served = server.client.get_bytes(f"/extensions/ComfyUI-DreamCache/docs/{node_id}/en.md")
        assert served == (ROOT / "web" / "docs" / node_id / "en.md").read_bytes()


def test_graph_runs_to_a_saved_image(server):
    """The whole node graph (Loader -> Build -> Apply -> Dual Guidance Sampler -> VAE Decode -> Save) runs in a real
    server and saves a picture: not a flat (NaN or black) image."""
    from helpers import is_picture

    pid = server.client.queue(basic_prompt())
    entry = server.client.wait(pid, timeout=600)
    images = entry["outputs"]["11"]["images"]
    path = server.base / "output" / images[0]["filename"]
    assert images and path.is_file()
    assert is_picture(path), f"{path} is flat (a NaN or black image)"


def _expect_rejection(server, prompt, *needles):
    from dreamcache.apps.run.comfy_client import ServerError

    with pytest.raises(ServerError) as e:
        server.client.queue(prompt)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert server.alive() and server.client.get_json("/system_stats")


def test_wrong_types_are_rejected_and_the_server_stays_up(server):
    p = basic_prompt()
    p["5"]["inputs"]["model"] = ["1", 2]  # a VAE into Apply's MODEL input
    _expect_rejection(server, p, "node 5 (DreamCacheApply)", "mismatch")


def test_missing_adapter_file_is_rejected(server):
    p = basic_prompt(adapter="does_not_exist.safetensors")
    _expect_rejection(server, p, "node 2 (DreamCacheLoader)", "does_not_exist.safetensors")


def test_adapter_model_mismatch_fails_with_the_clear_error(server):
    from dreamcache.apps.run.comfy_client import ServerError

    p = basic_prompt(family="sdxl")
    pid = server.client.queue(p)
    with pytest.raises(ServerError) as e:
        server.client.wait(pid, timeout=600)
    assert "does not fit this SDXL model" in str(e.value) and "node 4" in str(e.value)
    assert server.alive() and server.client.get_json("/system_stats")


def test_run_command_against_a_running_server(server, tmp_path):
    wf = tmp_path / "prompt.json"
    wf.write_text(json.dumps(basic_prompt()))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dreamcache", "run", str(wf), "--server", server.client.url, "--set",
                        "9.seed=3",
                        "--set", "SaveImage.filename_prefix=cli", "--output", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "queued prompt.json" in r.stdout and "done in" in r.stdout
    saved = list(out.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("11_cli")
    r = subprocess.run([sys.executable, "-m", "dreamcache", "run", str(wf), "--server", server.client.url, "--set",
                        "nope.seed=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "matches 0 nodes" in r.stderr


# ---- the shipped workflows ----------------------------------------------------------------------------------------

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SWAPS = {  # real loaders -> test-only tiny ones (same outputs, same order)
    "CheckpointLoaderSimple": ("DreamCacheTestTinyCheckpoint", {"family": "sd2", "seed": 0}),
    "DreamCacheSAMLoader": ("DreamCacheTestTinySAM", {"seed": 123}),
    "ControlNetLoader": ("DreamCacheTestTinyControlNet", {"family": "sd2"}),
}
FAST = {  # small and quick on a CPU
    "DreamCacheDualGuidanceSampler": {"steps": 2},
    "BasicScheduler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "DreamCacheBuildFeatureCache": {"resolution": 64},
    "DreamCacheSubjectMask": {"size": 64},
    "ImagePadForOutpaint": {"right": 32, "feathering": 8},
}
#: The workflows that work on a photo: (what is checked) the image is not flat, and outside the mask the photo is kept.
PHOTO_WORKFLOWS = {"dreamcache_inpaint", "dreamcache_inpaint_model", "dreamcache_img2img", "dreamcache_outpaint"}


def tiny_prompt(workflow: dict, object_info: dict) -> dict:
    from dreamcache.apps.run.workflow import ui_to_api

    prompt = ui_to_api(workflow, object_info)
    for node in prompt.values():
        if node["class_type"] in SWAPS:
            inpainting = "inpainting" in str(node["inputs"].get("ckpt_name", ""))
            node["class_type"], node["inputs"] = SWAPS[node["class_type"]][0], dict(SWAPS[node["class_type"]][1])
            if inpainting:  # an inpainting checkpoint: the tiny 9-channel U-Net
                node["inputs"]["family"] = "sd2_inpaint"
        node["inputs"].update(FAST.get(node["class_type"], {}))
    return prompt


def write_tiny_lora(path: Path):
    """A kohya-style LoRA for the tiny SD2 U-Net (the LoRA workflow's placeholder file name)."""
    import comfy.lora
    from safetensors.torch import save_file
    from tiny_models import make_model

    model = make_model("sd2")
    keymap = comfy.lora.model_lora_keys_unet(model.model, {})
    g = torch.Generator().manual_seed(3)
    sd = {}
    for lkey, wkey in keymap.items():
        if lkey.startswith("lora_unet_") and ".transformer_blocks.0.attn1.to_" in wkey and wkey.endswith("weight"):
            w = model.get_model_object(wkey)
            sd[f"{lkey}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.3
            sd[f"{lkey}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.3
            sd[f"{lkey}.alpha"] = torch.tensor(2.0)
    assert sd
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def live_info(server):
    write_tiny_lora(server.base / "models" / "loras" / "your_sd21_lora.safetensors")
    return server.client.object_info()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_runs(server, live_info, path):
    """Each shipped workflow, converted through the live /object_info, runs to its outputs, and its generated
    image is a picture (at least one saved image that is not flat: a NaN latent saves as a black square)."""
    from helpers import is_picture

    workflow = json.loads(path.read_text())
    prompt = tiny_prompt(workflow, live_info)
    probes = add_photo_probes(prompt) if path.stem in PHOTO_WORKFLOWS else None
    entry = server.client.wait(server.client.queue(prompt), timeout=900)
    if path.stem in PHOTO_WORKFLOWS:
        check_photo_kept(server, prompt, entry, probes)
    saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    if path.stem == "dreamcache_cache_library":
        # group A saves the subject; then group B (muted in the file) reuses it without the reference image
        caches = sorted((server.base / "models" / "dreamcache_caches").glob("my_subject_*.safetensors"))
        assert caches
        for n in workflow["nodes"]:
            n["mode"] = 0
            if n["type"] == "DreamCacheLoad":
                n["widgets_values"][0] = caches[-1].name
        info = server.client.object_info()
        prompt = tiny_prompt(workflow, info)
        entry = server.client.wait(server.client.queue(prompt), timeout=900)
        saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    files = [server.base / "output" / img["subfolder"] / img["filename"] for img in saved if img["type"] == "output"]
    assert saved and all(f.is_file() for f in files)
    assert any(is_picture(f) for f in files), f"{path.stem}: every saved image is flat ({[f.name for f in files]})"


def add_photo_probes(prompt: dict) -> dict:
    """Extra outputs for the photo checks: the photo as the workflow feeds it, its VAE round trip (encode + decode
    with the workflow's VAE) and the mask that keeps it (None for img2img). Returns {what: node id}."""
    keepers = ("SetLatentNoiseMask", "InpaintModelConditioning")
    keeper = next((k for k, v in prompt.items() if v["class_type"] in keepers), None)
    if keeper is None:
        encoder = next(v for v in prompt.values() if v["class_type"] == "VAEEncode")
        mask = None
    elif prompt[keeper]["class_type"] == "SetLatentNoiseMask":
        encoder, mask = prompt[prompt[keeper]["inputs"]["samples"][0]], prompt[keeper]["inputs"]["mask"]
    else:
        encoder, mask = prompt[keeper], prompt[keeper]["inputs"]["mask"]
    pixels, vae = encoder["inputs"]["pixels"], encoder["inputs"]["vae"]
    prompt.update({
        "p1": {"class_type": "SaveImage", "inputs": {"images": pixels, "filename_prefix": "probe_photo"}},
        "p2": {"class_type": "VAEEncode", "inputs": {"pixels": pixels, "vae": vae}},
        "p3": {"class_type": "VAEDecode", "inputs": {"samples": ["p2", 0], "vae": vae}},
        "p4": {"class_type": "SaveImage", "inputs": {"images": ["p3", 0], "filename_prefix": "probe_roundtrip"}},
    })
    probes = {"photo": "p1", "roundtrip": "p4"}
    if mask is not None:
        sampler = next(k for k, v in prompt.items() if v["class_type"] == "DreamCacheDualGuidanceSampler")
        prompt.update({
            "p5": {"class_type": "MaskToImage", "inputs": {"mask": mask}},
            "p6": {"class_type": "SaveImage", "inputs": {"images": ["p5", 0], "filename_prefix": "probe_mask"}},
            "p7": {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "probe_out"}},
            "p8": {"class_type": "SaveLatent", "inputs": {"samples": ["p2", 0], "filename_prefix": "probe_photo"}},
        })
        probes.update(mask="p6", latent="p7", photo_latent="p8")
    return probes


def _saved(server, entry, node_id):
    import numpy as np
    from PIL import Image

    outputs = entry["outputs"][node_id]
    if "latents" in outputs:
        from safetensors.torch import load_file

        f = outputs["latents"][0]
        return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]
    img = outputs["images"][0]
    return np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"]).convert("RGB"),
                      dtype=np.float32) / 255.0


def check_photo_kept(server, prompt, entry, probes):
    """The workflow's image is not flat; outside the mask (latent cells the mask does not touch) the sampled latent
    is the photo's latent (what keeps the photo: noise mask / InpaintModelConditioning), and the pixels there (at
    least one latent cell, 8 px, away from the mask) are the photo within the VAE's round-trip error: their mean
    distance to the photo is at most the round trip's plus 2/255. (The tiny VAE has random weights, so its round
    trip is far from the photo and the pixel bound alone is loose; the latent check is the strict one.)"""
    import numpy as np

    out_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage" and not k.startswith("p"))
    out, photo, rt = (_saved(server, entry, k) for k in (out_id, probes["photo"], probes["roundtrip"]))
    assert out.shape == photo.shape and np.isfinite(out).all() and out.std() > 0.02, out.std()
    if "mask" not in probes:
        return
    mask = torch.from_numpy(_saved(server, entry, probes["mask"])[..., 0])
    latent, photo_latent = _saved(server, entry, probes["latent"]), _saved(server, entry, probes["photo_latent"])
    cells = torch.nn.functional.max_pool2d(mask[None, None], 8)[0, 0] == 0
    assert cells.any() and (~cells).any()
    assert torch.allclose(latent[0][:, cells], photo_latent[0][:, cells], atol=1e-4)
    assert (latent[0][:, ~cells] - photo_latent[0][:, ~cells]).abs().max() > 1e-2  # the masked part was repainted
    outside = (torch.nn.functional.max_pool2d(mask[None, None], 17, stride=1, padding=8)[0, 0] == 0).numpy()
    assert 0.1 < outside.mean() < 0.9, outside.mean()
    err, err_rt = np.abs(out - photo)[outside].mean(), np.abs(rt - photo)[outside].mean()
    assert err <= err_rt + 2 / 255, (err, err_rt)


# ---- python -m dreamcache run: exit codes, checked overrides, --list, only this prompt's files ---------------------

def run_cli(server, prompt: dict, tmp_path: Path, *args, name="prompt.json"):
    wf = tmp_path / name
    wf.write_text(json.dumps(prompt))
    cmd = [sys.executable, "-m", "dreamcache", "run", str(wf), "--server", server.client.url, *map(str, args)]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def with_preview(prompt: dict) -> dict:
    """The basic prompt plus a second output (a preview of the subject photo) that can run on its own."""
    return {**prompt, "12": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}


def test_run_exits_1_when_an_output_node_is_refused(server, tmp_path):
    """ComfyUI answers HTTP 200 and runs the other outputs when one is refused ("Output will be ignored"): run must
    exit 1, name the node's error once and save nothing."""
    out = tmp_path / "out"
    r = run_cli(server, with_preview(basic_prompt()), tmp_path,
                "--set", "DreamCacheDualGuidanceSampler.sampler_name=ddim2", "--output", out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node 9 (DreamCacheDualGuidanceSampler)" in r.stderr and "'ddim2' is not one of the choices" in r.stderr
    assert r.stderr.count("ddim2") == 1, r.stderr  # not again under scheduler and mode
    assert "done in" not in r.stdout and not (out.exists() and any(out.iterdir()))
    r = run_cli(server, with_preview(basic_prompt()), tmp_path, "--set", "EmptyLatentImage.width=abc", "--output", out)
    assert r.returncode == 1 and "node 8 (EmptyLatentImage)" in r.stderr, r.stderr
    assert r.stderr.count("Failed to convert") == 1, r.stderr
    assert not (out.exists() and any(out.iterdir()))


def test_run_exits_1_when_a_node_fails(server, tmp_path):
    r = run_cli(server, basic_prompt(family="sdxl"), tmp_path, "--output", tmp_path / "out")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("does not fit this SDXL model") == 1 and "node 4" in r.stderr


def test_misspelt_override_is_an_error_listing_the_inputs(server, tmp_path):
    r = run_cli(server, basic_prompt(), tmp_path, "--set", "EmptyLatentImage.widht=256")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "node 8 (EmptyLatentImage) has no input 'widht'" in r.stderr and "width, height, batch_size" in r.stderr
    assert "queued" not in r.stdout


def test_list_shows_ids_titles_types_and_values(server, tmp_path):
    r = run_cli(server, basic_prompt(), tmp_path, "--list", "--set", "9.steps=5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\n9  DreamCacheDualGuidanceSampler\n" in r.stdout and "    steps = 5\n" in r.stdout
    assert "    sampler_name = \"euler\"" in r.stdout and "    model = " not in r.stdout  # links are not settable
    assert "queued" not in r.stdout


@pytest.mark.parametrize("stem", sorted(PHOTO_WORKFLOWS))
def test_list_offers_the_photo_and_the_mask_by_title(server, tmp_path, stem):
    """`run --list` shows the photo workflows' inputs by title, and `--set Photo.image=` / `Mask.image=` set them."""
    workflow = json.loads((ROOT / "workflows" / f"{stem}.json").read_text())
    sets = ["--set", "Photo.image=my_photo.png"]
    if any(n.get("title") == "Mask" for n in workflow["nodes"]):
        sets += ["--set", "Mask.image=my_mask.png"]
    r = run_cli(server, workflow, tmp_path, "--list", *sets, name=f"{stem}.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '  Photo  (LoadImage)\n    image = "my_photo.png"' in r.stdout, r.stdout
    if len(sets) > 2:
        assert '  Mask  (LoadImage)\n    image = "my_mask.png"' in r.stdout, r.stdout
    assert "queued" not in r.stdout


def test_run_lists_only_the_files_this_prompt_made(server, tmp_path):
    """A second identical run is served from ComfyUI's cache: its history still lists the first run's preview,
    which is not this run's output."""
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": SUBJECT.name}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    first = run_cli(server, prompt, tmp_path, "--output", tmp_path / "a")
    assert first.returncode == 0 and len(list((tmp_path / "a").iterdir())) == 1, first.stdout + first.stderr
    second = run_cli(server, prompt, tmp_path, "--output", tmp_path / "b")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 output file(s)" in second.stdout and "cached from an earlier prompt" in second.stdout
    assert not list((tmp_path / "b").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "prompt.json"]  # nothing else in the cwd


def test_started_server_keeps_log_and_outputs_out_of_the_cwd(comfy, server, tmp_path):
    """Without --server the runner starts ComfyUI itself: its log goes into the output folder, and neither a log
    nor an output folder lands in the current folder."""
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": SUBJECT.name}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "p.json").write_text(json.dumps(prompt))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    r = subprocess.run([sys.executable, "-m", "dreamcache", "run", "p.json", "--comfyui", str(comfy), "--cpu",
                        "--base-directory", str(server.base), "--output", str(out)],
                       cwd=cwd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["p.json"]
    assert (out / "comfyui.log").is_file() and any(p.name.startswith("2_") for p in out.iterdir())


# ---- NaN named on the server (issue 26) -----------------------------------------------------------------------------

def _fails_with(server, prompt, node_id, *needles):
    from dreamcache.apps.run.comfy_client import ServerError

    with pytest.raises(ServerError) as e:
        server.client.wait(server.client.queue(prompt), timeout=600)
    msg = str(e.value)
    assert f"node {node_id} " in msg, msg
    for n in needles:
        assert n in msg, msg
    assert "index" not in msg and "out of bounds" not in msg, msg
    assert server.alive() and server.client.get_json("/system_stats")
    return msg


def _broken(part):
    return {"class_type": "DreamCacheTestBrokenCheckpoint", "inputs": {"family": "sd1", "broken": part}}


def test_text_encoder_that_did_not_load_is_named_in_the_cache_pass_and_the_sampler(server):
    p = basic_prompt()
    p["1"] = _broken("clip")
    _fails_with(server, p, 4, "Build Feature Cache (DreamCache): the conditioning of the cache pass holds NaN values",
                "the text encoder did not load", "clip missing:")
    p = basic_prompt()
    p["12"] = _broken("clip")
    p["6"]["inputs"]["clip"] = ["12", 1]  # the sampler's prompt from the broken text encoder
    _fails_with(server, p, 9, "the text conditioning (CONDITIONING) of the sampler holds NaN values",
                "the text encoder did not load")


def test_base_model_nan_is_blamed_on_the_base_model_not_dreamcache(server):
    p = basic_prompt()
    p["12"] = _broken("unet_out")
    p["5"]["inputs"]["model"] = ["12", 0]  # the cache from a good model, sampling on one whose U-Net is NaN
    _fails_with(server, p, 9, "the base model's own prediction at the first step (with DreamCache off) holds NaN",
                "the base model, not DreamCache", "--force-upcast-attention")


def test_nan_image_is_named_by_subject_mask_and_the_attention_overlay(server):
    """Issue 26's attention workflow with a VAE that decodes NaN: Show DreamCache Attention names the image instead
    of failing on a NaN cast to an index; Subject Mask fed such an image names it too."""
    p = basic_prompt()
    p["12"] = _broken("vae")
    p["13"] = {"class_type": "DreamCacheAttentionRecorder", "inputs": {"model": ["5", 0], "layer": "output_6",
                                                                      "step_percent": 0.5}}
    p["9"]["inputs"]["model"] = ["13", 0]
    p["10"]["inputs"]["vae"] = ["12", 2]
    p["14"] = {"class_type": "DreamCacheShowAttention", "inputs": {
        "attention": ["13", 1], "latent": ["9", 0], "image": ["10", 0], "reference": ["4", 1], "point_x": 0.5,
        "point_y": 0.5, "subject": 1, "opacity": 0.55}}
    p["11"]["inputs"]["images"] = ["14", 0]
    _fails_with(server, p, 14, "Show DreamCache Attention: the image input holds NaN values",
                "the generated image is broken", "--fp32-vae")
    p = basic_prompt()
    p["12"] = _broken("vae")
    p["10"]["inputs"]["vae"] = ["12", 2]
    p["15"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    p["14"] = {"class_type": "DreamCacheSubjectMask", "inputs": {
        "image": ["10", 0], "prompt_mode": "mask", "mask": ["15", 0], "box_x": 0, "box_y": 0, "box_width": 0,
        "box_height": 0, "positive_points": "", "negative_points": "", "threshold": 0.5, "grow": 0, "feather": 0,
        "layout": "train", "size": 64, "background": "#ffffff", "invert_mask": False}}
    p["11"]["inputs"]["images"] = ["14", 0]
    _fails_with(server, p, 14, "Subject Mask (DreamCache): the image input holds NaN values",
                "the node connected to image produced them")
