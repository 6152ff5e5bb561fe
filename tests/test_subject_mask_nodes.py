"""DreamCacheSAMLoader and DreamCacheSubjectMask inside ComfyUI (the pack loaded by ComfyUI's own loader).

Protects: both nodes are registered with descriptions and a tooltip on every input and output; every prompt mode
runs the full node path with a tiny seeded SAM (shapes, dtypes, value ranges, batches) and gives the same mask as the
core SAM with the same prompts; SAM is a ModelPatcher loaded through comfy.model_management only when used; mask mode
never requests, loads or runs SAM (check_lazy_status, and a real ComfyUI graph whose SAM file is not even a SAM); the
loader detects and strictly loads a checkpoint from models/sams and refuses a non-SAM file clearly; changing only
mask options or prompts does not re-run SAM's image encoder; SubjectMask's
output feeds BuildFeatureCache in a real graph (the cache is built from it); an unchanged graph does not re-run SAM.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import node, prompt_executor, random_adapter, run_node


@pytest.fixture(scope="module")
def core(pack):
    return pack.dreamcache


@pytest.fixture(scope="module")
def tiny_sam(pack):
    pytest.importorskip("segment_anything", reason="segment-anything is not installed (pip install segment-anything)")
    from tiny_sam import make_tiny_sam

    return pack.dreamcache.comfy.sam.wrap_sam(make_tiny_sam(seed=0), "tiny", "tiny.pth")


@pytest.fixture(scope="module")
def sams_dir(pack, models_dir):
    d = models_dir / "sams"
    d.mkdir(exist_ok=True)
    return d


def photo(b=2, h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, h, w, 3, generator=g) * 0.4
    img[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = torch.tensor([0.9, 0.6, 0.1])
    return img


def square_mask(b=2, h=48, w=64):
    m = torch.zeros(b, h, w)
    m[:, 10:30, 20:50] = 1.0
    return m


class LoadSpy:
    """Records every comfy.model_management.load_models_gpu call."""

    def __init__(self, monkeypatch):
        import comfy.model_management as mm

        self.calls = []
        real = mm.load_models_gpu

        def spy(models, *a, **k):
            self.calls.append(list(models))
            return real(models, *a, **k)

        monkeypatch.setattr(mm, "load_models_gpu", spy)


# ---------------------------------------------------------------------------------------------------------------------
# schema


def test_nodes_are_registered_with_descriptions_and_tooltips(pack):
    assert {"DreamCacheSAMLoader", "DreamCacheSubjectMask"} <= set(pack.loaded_node_ids)
    for node_id, category in (("DreamCacheSAMLoader", "DreamCache/loaders"), ("DreamCacheSubjectMask",
                                                                              "DreamCache/image")):
        schema = node(node_id).GET_SCHEMA()
        assert schema.category == category and schema.description
        for item in list(schema.inputs) + list(schema.outputs):
            assert item.tooltip, (node_id, item.id)
        assert not schema.not_idempotent
    schema = node("DreamCacheSubjectMask").GET_SCHEMA()
    by_id = {i.id: i for i in schema.inputs}
    assert by_id["sam"].optional and by_id["sam"].lazy and by_id["sam"].get_io_type() == "DREAMCACHE_SAM"
    assert by_id["mask"].optional and by_id["mask"].lazy
    assert [o.get_io_type() for o in schema.outputs] == ["IMAGE", "MASK"]
    assert node("DreamCacheSAMLoader").GET_SCHEMA().outputs[0].get_io_type() == "DREAMCACHE_SAM"


def test_sams_folder_is_registered_and_shared(pack, models_dir):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["sams"]
    assert os.path.join(str(models_dir), "sams") in paths
    assert {".pth", ".safetensors"} <= exts
    # another pack registered "sams" first: its folder and extensions stay, ours are added
    saved = folder_paths.folder_names_and_paths["sams"]
    try:
        folder_paths.folder_names_and_paths["sams"] = (["/other/pack/sams"], {".pth"})
        pack.nodes.paths.register_folders()
        paths, exts = folder_paths.folder_names_and_paths["sams"]
        assert paths[0] == "/other/pack/sams" and os.path.join(str(models_dir), "sams") in paths
        assert {".pth", ".safetensors"} <= exts
    finally:
        folder_paths.folder_names_and_paths["sams"] = saved


# ---------------------------------------------------------------------------------------------------------------------
# SubjectMask with a tiny SAM


@pytest.mark.parametrize("mode,prompts", [
    ("auto", {}),
    ("box", {"box_x": 12, "box_y": 8, "box_width": 40, "box_height": 30, "negative_points": "1,1"}),
    ("points", {"positive_points": "32,24", "negative_points": "2,2; 60,40"}),
])
def test_each_sam_mode_runs_the_full_node_path(core, tiny_sam, monkeypatch, mode, prompts):
    spy = LoadSpy(monkeypatch)
    img = photo()
    ref, mask = run_node("DreamCacheSubjectMask", image=img, prompt_mode=mode, sam=tiny_sam, size=64, **prompts)
    assert ref.shape == (2, 64, 64, 3) and ref.dtype == torch.float32
    assert mask.shape == (2, 48, 64) and mask.dtype == torch.float32
    assert 0 <= float(ref.min()) and float(ref.max()) <= 1 and 0 <= float(mask.min()) and float(mask.max()) <= 1
    # SAM went through ComfyUI's model management
    assert spy.calls and all(c == [tiny_sam.patcher] for c in spy.calls)
    # the node's mask is the core SAM's with the same prompts, thresholded at 0.5
    box, points, labels = core.core.subject.sam_prompts(mode, 64, 48, **prompts)
    probs = core.core.sam.predict_batch(tiny_sam.patcher.model.sam, img, mode, box=box, points=points, labels=labels)
    assert torch.equal(mask, (probs > 0.5).float())
    # keep layout: the same mask, the photo's background painted white
    ref_keep, mask_keep = run_node("DreamCacheSubjectMask", image=img, prompt_mode=mode, sam=tiny_sam, layout="keep",
                                   **prompts)
    assert torch.equal(mask_keep, mask)
    assert torch.equal(ref_keep, core.core.subject.composite(img, mask, (1.0, 1.0, 1.0)))


def test_batch_images_are_segmented_one_by_one(tiny_sam):
    img = torch.cat([photo(1, seed=0), photo(1, seed=5).flip(2)])
    _, both = run_node("DreamCacheSubjectMask", image=img, prompt_mode="auto", sam=tiny_sam, feather=2)
    _, second = run_node("DreamCacheSubjectMask", image=img[1:], prompt_mode="auto", sam=tiny_sam, feather=2)
    assert torch.allclose(both[1], second[0], atol=1e-6)  # image 2 of the batch is segmented on its own
    assert not torch.equal(both[0], both[1])  # not one mask broadcast to the batch
    assert ((both > 0) & (both < 1)).any()  # feathered edges


def test_changing_only_mask_options_does_not_re_encode_the_image(tiny_sam):
    """Tweaking threshold, grow, feather, layout or the prompts re-runs the node but not SAM's image encoder."""
    img = photo(1, seed=11)
    calls = []
    handle = tiny_sam.patcher.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, m1 = run_node("DreamCacheSubjectMask", image=img, prompt_mode="auto", sam=tiny_sam, threshold=0.5)
        assert len(calls) == 1
        _, m2 = run_node("DreamCacheSubjectMask", image=img, prompt_mode="auto", sam=tiny_sam, threshold=0.45,
                         feather=3)
        run_node("DreamCacheSubjectMask", image=img, prompt_mode="box", sam=tiny_sam, box_x=5, box_y=5, box_width=30,
                 box_height=30)
        assert len(calls) == 1
        run_node("DreamCacheSubjectMask", image=photo(1, seed=12), prompt_mode="auto", sam=tiny_sam)
        assert len(calls) == 2
    finally:
        handle.remove()
    assert not torch.equal(m1, m2)


def test_odd_inputs_through_the_node(tiny_sam):
    """Grayscale, a tiny image, a very wide image and RGBA all give a square RGB reference."""
    for img in (torch.rand(1, 30, 40, 1), torch.rand(1, 6, 5, 3), torch.rand(1, 16, 300, 3)):
        ref, mask = run_node("DreamCacheSubjectMask", image=img, prompt_mode="box", sam=tiny_sam, box_x=0, box_y=0,
                             box_width=img.shape[2], box_height=img.shape[1], threshold=0.0, size=32)
        assert ref.shape == (1, 32, 32, 3) and mask.shape == img.shape[:3]
    rgba = torch.cat([photo(1), square_mask(1)[..., None]], dim=-1)
    ref, mask = run_node("DreamCacheSubjectMask", image=rgba, prompt_mode="auto", sam=tiny_sam, size=32)
    assert torch.equal(mask, square_mask(1)) and ref.shape == (1, 32, 32, 3)


def test_user_errors_are_dreamcache_errors(core, tiny_sam):
    err = core.core.errors.DreamCacheError
    with pytest.raises(err, match="needs a SAM model"):
        run_node("DreamCacheSubjectMask", image=photo(), prompt_mode="auto")
    with pytest.raises(err, match="box_width and box_height"):
        run_node("DreamCacheSubjectMask", image=photo(), prompt_mode="box", sam=tiny_sam)
    with pytest.raises(err, match="at least one positive point"):
        run_node("DreamCacheSubjectMask", image=photo(), prompt_mode="points", sam=tiny_sam, positive_points="")
    with pytest.raises(err, match="Background colour"):
        run_node("DreamCacheSubjectMask", image=photo(), prompt_mode="mask", mask=square_mask(), background="#zz")
    with pytest.raises(err, match="No subject found in image 1 of 2.*give a box or points"):
        run_node("DreamCacheSubjectMask", image=photo(), prompt_mode="mask", mask=torch.zeros(1, 64, 64))


# ---------------------------------------------------------------------------------------------------------------------
# mask mode: SAM never requested, loaded or run


def test_check_lazy_status_requests_only_what_the_mode_uses(pack):
    cls = node("DreamCacheSubjectMask")
    img = photo()
    rgba = torch.cat([img, square_mask()[..., None]], dim=-1)
    # linked but not yet evaluated inputs arrive as None; unlinked ones are absent
    assert cls.check_lazy_status(image=img, prompt_mode="mask", sam=None, mask=None) == ["mask"]
    assert cls.check_lazy_status(image=img, prompt_mode="mask", sam=None, mask=square_mask()) == []
    assert cls.check_lazy_status(image=img, prompt_mode="mask", sam=None) == []
    for mode in ("auto", "box", "points"):
        assert cls.check_lazy_status(image=img, prompt_mode=mode, sam=None, mask=None) == ["sam"]
        assert cls.check_lazy_status(image=img, prompt_mode=mode) == []  # nothing linked: execute says what is missing
    assert cls.check_lazy_status(image=rgba, prompt_mode="auto", sam=None) == []  # already cut out


def test_mask_mode_runs_with_sam_none_and_never_loads_a_model(core, monkeypatch):
    spy = LoadSpy(monkeypatch)
    img = photo()
    big = torch.zeros(1, 96, 128)
    big[:, 20:60, 40:100] = 1.0  # one mask of another size for the whole batch
    ref, mask = run_node("DreamCacheSubjectMask", image=img, prompt_mode="mask", mask=big, sam=None, size=64)
    assert spy.calls == []
    assert ref.shape == (2, 64, 64, 3) and torch.equal(mask, square_mask())
    _, inverted = run_node("DreamCacheSubjectMask", image=img, prompt_mode="mask", mask=1.0 - big, invert_mask=True)
    assert torch.equal(inverted, square_mask())


# ---------------------------------------------------------------------------------------------------------------------
# loader


def test_loader_detects_loads_and_wraps_in_a_model_patcher(core, tiny_sam, sams_dir, monkeypatch):
    import comfy.model_management as mm
    import comfy.model_patcher
    from tiny_sam import register_tiny_variant

    register_tiny_variant(core.core.sam, monkeypatch)
    torch.save(tiny_sam.patcher.model.sam.state_dict(), str(sams_dir / "tiny_sam.pth"))
    (sam,) = run_node("DreamCacheSAMLoader", sam_name="tiny_sam.pth")
    assert sam.variant == "tiny" and sam.name == "tiny_sam.pth"
    assert isinstance(sam.patcher, comfy.model_patcher.ModelPatcher)
    assert sam.patcher.load_device == mm.get_torch_device() and sam.patcher.offload_device == mm.unet_offload_device()
    for k, v in tiny_sam.patcher.model.sam.state_dict().items():
        assert torch.equal(sam.patcher.model.sam.state_dict()[k], v)
    img = photo()
    a = run_node("DreamCacheSubjectMask", image=img, prompt_mode="auto", sam=sam, size=32)
    b = run_node("DreamCacheSubjectMask", image=img, prompt_mode="auto", sam=tiny_sam, size=32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    fp = node("DreamCacheSAMLoader").fingerprint_inputs(sam_name="tiny_sam.pth")
    os.utime(sams_dir / "tiny_sam.pth", ns=(1, 1))
    assert node("DreamCacheSAMLoader").fingerprint_inputs(sam_name="tiny_sam.pth") != fp


def test_loader_refuses_non_sam_and_missing_files(core, sams_dir, models_dir):
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(3, 3)}, str(sams_dir / "not_sam.safetensors"))
    with pytest.raises(core.core.errors.DreamCacheError, match="'not_sam.safetensors' is not a Segment Anything "
                                                               "checkpoint"):
        run_node("DreamCacheSAMLoader", sam_name="not_sam.safetensors")
    with pytest.raises(core.core.errors.DreamCacheError, match="'nope.pth' was not found in .*sams"):
        run_node("DreamCacheSAMLoader", sam_name="nope.pth")
    # a typed path never leaves the sams folder
    (models_dir / "outside.pth").write_bytes(b"x")
    for name in ("../outside.pth", str(models_dir / "outside.pth")):
        with pytest.raises(core.core.errors.DreamCacheError, match="was not found in"):
            run_node("DreamCacheSAMLoader", sam_name=name)


# ---------------------------------------------------------------------------------------------------------------------
# real ComfyUI graphs


class _Server:
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def graph_env(pack, comfy, sams_dir):
    """Test-only nodes: a source of tiny models/images and an output node that records what reaches it."""
    from tiny_models import make_clip, make_model, make_vae

    import nodes as comfy_nodes

    model = make_model("sd1")
    objects = {"model": model, "clip": make_clip("sd1"), "vae": make_vae(), "adapter": random_adapter(pack.dreamcache,
                                                                                                      model),
               "image": photo(), "mask": square_mask()}
    captured = []

    class Source:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL", "CLIP", "VAE", "DREAMCACHE_ADAPTER", "IMAGE", "MASK")
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self):
            return tuple(objects[k] for k in ("model", "clip", "vae", "adapter", "image", "mask"))

    class Capture:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"cache": ("DREAMCACHE_CACHE",), "reference": ("IMAGE",), "subject": ("IMAGE",),
                                 "mask": ("MASK",)}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, **kwargs):
            captured.append(kwargs)
            return ()

    (sams_dir / "broken_sam.pth").write_bytes(b"this is not a SAM checkpoint")
    saved = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    comfy_nodes.NODE_CLASS_MAPPINGS.update({"DCTestSource": Source, "DCTestCapture": Capture})
    yield objects, captured
    comfy_nodes.NODE_CLASS_MAPPINGS.clear()
    comfy_nodes.NODE_CLASS_MAPPINGS.update(saved)


def _prompt(mode, sam_name, size=96, resolution=64):
    return {
        "1": {"class_type": "DCTestSource", "inputs": {}},
        "2": {"class_type": "DreamCacheSAMLoader", "inputs": {"sam_name": sam_name}},
        "3": {"class_type": "DreamCacheSubjectMask", "inputs": {
            "image": ["1", 4], "prompt_mode": mode, "sam": ["2", 0], "mask": ["1", 5], "box_x": 0, "box_y": 0,
                                                                "box_width": 0,
            "box_height": 0, "positive_points": "", "negative_points": "", "threshold": 0.5, "grow": 0, "feather": 0,
            "layout": "train", "size": size, "background": "#ffffff", "invert_mask": False}},
        "4": {"class_type": "DreamCacheBuildFeatureCache", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["3", 0], "clip": ["1", 1], "adapter": ["1", 3], "seed": 0,
            "resolution": resolution, "fit": "pad", "batch_mode": "concat"}},
        "5": {"class_type": "DCTestCapture", "inputs": {"cache": ["4", 0], "reference": ["4", 1], "subject": ["3", 0],
                                                        "mask": ["3", 1]}},
    }


def _run(executor, prompt, pid):
    import asyncio

    import execution

    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert valid[0], valid[1:]
    executor.execute(prompt, pid, execute_outputs=valid[2])
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success and not errors, errors
    cached = [m[1]["nodes"] for m in executor.status_messages if m[0] == "execution_cached"][0]
    return cached


def test_graph_subject_mask_feeds_build_feature_cache_and_mask_mode_never_loads_sam(core, graph_env, monkeypatch):
    """Image -> SubjectMask (mask mode) -> BuildFeatureCache in a ComfyUI graph. The SAM loader in the graph points at a
    file that is not a SAM at all: had it run, the graph would fail."""
    objects, captured = graph_env
    calls = []
    real = core.core.subject.refine_masks
    monkeypatch.setattr(core.core.subject, "refine_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    executor = prompt_executor(_Server())
    captured.clear()
    _run(executor, _prompt("mask", "broken_sam.pth"), "p1")
    (got,) = captured
    subject_img, reference, cache = got["subject"], got["reference"], got["cache"]
    # what SubjectMask produced, as a direct node run gives it
    expected, expected_mask = run_node("DreamCacheSubjectMask", image=objects["image"], prompt_mode="mask",
                                       mask=objects["mask"], size=96)
    assert torch.equal(subject_img, expected) and torch.equal(got["mask"], expected_mask)
    # the cache was built from it: its reference is SubjectMask's output fitted to the cache resolution
    assert subject_img.shape == (2, 96, 96, 3) and reference.shape == (2, 64, 64, 3)
    assert torch.equal(reference, core.core.image.fit_reference(subject_img, resolution=64, fit="pad"))
    assert cache.resolution == (64, 64) and cache.references == 2
    direct_cache, direct_ref = run_node("DreamCacheBuildFeatureCache", model=objects["model"], vae=objects["vae"],
                                        image=subject_img,
                                        clip=objects["clip"], adapter=objects["adapter"], seed=0, resolution=64)
    assert torch.equal(direct_ref, reference)
    assert cache.layers == direct_cache.layers
    for ref in cache.layers:
        assert torch.equal(cache.tokens[ref], direct_cache.tokens[ref])
    # unchanged graph: nothing re-runs; a changed widget re-runs SubjectMask only
    n = len(calls)
    cached = _run(executor, _prompt("mask", "broken_sam.pth"), "p2")
    assert "3" in cached and "4" in cached and len(calls) == n
    _run(executor, _prompt("mask", "broken_sam.pth", size=104), "p3")
    assert len(calls) == n + 1


def test_graph_auto_mode_loads_sam_once_and_does_not_rerun_it(core, graph_env, tiny_sam, sams_dir, monkeypatch):
    from tiny_sam import register_tiny_variant

    register_tiny_variant(core.core.sam, monkeypatch)
    torch.save(tiny_sam.patcher.model.sam.state_dict(), str(sams_dir / "tiny_graph.pth"))
    objects, captured = graph_env
    runs = []
    real = core.core.sam.predict
    monkeypatch.setattr(core.core.sam, "predict", lambda *a, **k: runs.append(1) or real(*a, **k))
    executor = prompt_executor(_Server())
    captured.clear()
    _run(executor, _prompt("auto", "tiny_graph.pth"), "q1")
    assert len(runs) == 2  # one SAM run per image of the batch
    expected, _ = run_node("DreamCacheSubjectMask", image=objects["image"], prompt_mode="auto", sam=tiny_sam, size=96)
    assert torch.equal(captured[-1]["subject"], expected)
    runs.clear()
    cached = _run(executor, _prompt("auto", "tiny_graph.pth"), "q2")
    assert runs == [] and {"2", "3"} <= set(cached)
