"""The shipped example workflows (workflows/*.json): what CI can check without ComfyUI, plus the snapshot check.

Protects: every workflow parses as UI format 0.4, uses only core nodes of ComfyUI 0.3.64 (listed here) and this
pack's nodes, has consistent links and widget counts matching the node schemas (checked against a snapshot of
/object_info that a ComfyUI-backed test keeps honest), converts to an API prompt, names the model files it needs
(name, url where public, directory), ships its thumbnail and the images it loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreamcache.apps.run.workflow import check_structure, input_specs, ui_to_api, widget_slots

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SNAPSHOT = json.loads((ROOT / "tests" / "data" / "object_info_snapshot.json").read_text())
INFO = SNAPSHOT["object_info"]
COMFYUI_VERSION = "0.3.64"
#: Core nodes the workflows may use, as of ComfyUI 0.3.64 (MarkdownNote/Note are frontend-only).
CORE_NODES = {"CheckpointLoaderSimple", "LoadImage", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode", "SaveImage",
              "PreviewImage",
              "LoraLoader", "ControlNetLoader", "ControlNetApplyAdvanced", "SamplerCustomAdvanced", "RandomNoise",
              "KSamplerSelect",
              "BasicScheduler", "KSampler", "SolidMask", "MaskComposite", "FeatherMask", "InvertMask", "MaskToImage",
              "ConditioningSetMask", "ConditioningCombine", "MarkdownNote", "Note",
              "ImageToMask", "VAEEncode", "SetLatentNoiseMask", "DifferentialDiffusion", "InpaintModelConditioning",
              "ImagePadForOutpaint"}
EXPECTED = {"dreamcache_basic", "dreamcache_official_sd21", "dreamcache_lora", "dreamcache_controlnet",
            "dreamcache_cache_library",
            "dreamcache_custom_sampling", "dreamcache_regional", "dreamcache_two_subjects",
            "dreamcache_attention_maps", "dreamcache_inpaint", "dreamcache_inpaint_model", "dreamcache_img2img",
            "dreamcache_outpaint"}
PLACEHOLDERS = {"your_sd21_lora.safetensors"}
LOADER_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "DreamCacheLoader": "adapter_name",
                 "DreamCacheSAMLoader": "sam_name",
                 "LoraLoader": "lora_name", "ControlNetLoader": "control_net_name"}


def load(path):
    return json.loads(path.read_text())


def test_all_expected_workflows_ship():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    assert SNAPSHOT["comfyui_version"] == COMFYUI_VERSION


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_structure(path):
    wf = load(path)
    assert wf["version"] == 0.4 and wf["nodes"] and wf["links"]
    types = {n["type"] for n in wf["nodes"]}
    assert types <= CORE_NODES | {k for k in INFO if k.startswith("DreamCache")}, types - CORE_NODES
    # every workflow applies DreamCache, with a cache it builds or loads
    assert "DreamCacheApply" in types, f"{path.stem} never applies DreamCache"
    assert types & {"DreamCacheBuildFeatureCache", "DreamCacheLoad"}, f"{path.stem} has no feature cache"
    assert check_structure(wf, INFO) == []
    api = ui_to_api(wf, INFO)
    assert any(v["class_type"] in ("SaveImage", "DreamCacheSave") for v in api.values())
    assert any(n["type"] == "MarkdownNote" for n in wf["nodes"]), "each workflow explains itself in notes"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_names_its_model_files(path):
    """Every file a loader needs is in the models list with a download url (the frontend's schema requires one and
    offers the download); the only exception is the LoRA placeholder, which a note explains."""
    wf = load(path)
    listed = {(m["name"], m["directory"]) for m in wf["models"]}
    for m in wf["models"]:
        assert set(m) == {"name", "url",
                          "directory"} and m["name"] and m["directory"] and m["url"].startswith("https://")
    for n in wf["nodes"]:
        if n["type"] in LOADER_INPUTS:
            names = [name for name, spec, _s in input_specs(INFO[n["type"]]) if widget_slots(spec)[0]]
            value = n["widgets_values"][names.index(LOADER_INPUTS[n["type"]])]
            if value in PLACEHOLDERS:
                assert any(value in note["widgets_values"][0] for note in wf["nodes"] if note["type"] == "MarkdownNote")
                continue
            assert any(value == name for name,
                       _d in listed), f"{path.stem}: {n['type']} loads {value}, which the models list does not name"
            assert n["properties"]["models"][0]["name"] == value


#: The frontend's rule for its Download button on a missing model, per frontend release (read from each one's
#: bundle: an allow-list of URL prefixes, and of file-name endings; a few exact URLs are also allowed).
DOWNLOAD_RULES = {
    "1.27": (("https://civitai.com/", "https://huggingface.co/"), (".safetensors", ".sft")),
    "1.49": (("https://civitai.com/", "https://civitai.red/", "https://huggingface.co/"),
             (".safetensors", ".sft", ".ckpt", ".pth", ".pt")),
    "1.58": (("https://civitai.com/", "https://civitai.red/", "https://huggingface.co/"),
             (".safetensors", ".sft", ".ckpt", ".pth", ".pt")),
}
#: Entries no frontend offers to download, and why (the frontend shows their link).
LINK_ONLY = {"cross_attention-199999.pt": "the authors publish the adapter only in a Google Drive folder"}


def downloadable(entry: dict, frontend: str) -> bool:
    prefixes, endings = DOWNLOAD_RULES[frontend]
    return entry["url"].startswith(prefixes) and entry["name"].endswith(endings)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_models_entry_gets_the_download_button_where_the_frontend_allows_it(path):
    for m in load(path)["models"]:
        if m["name"] in LINK_ONLY:
            assert not any(downloadable(m, f) for f in DOWNLOAD_RULES)  # if it ever can be, use that URL
            continue
        for frontend in DOWNLOAD_RULES:
            expected = frontend != "1.27" or m["name"].endswith((".safetensors", ".sft"))
            assert downloadable(m, frontend) == expected, (path.stem, m["name"], frontend)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_thumbnail_and_loaded_images_ship(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", \
        f"{thumb.name} missing (tools/screenshot_workflows.py)"
    for n in load(path)["nodes"]:
        if n["type"] == "LoadImage":
            assert (ROOT / "workflows" / n["widgets_values"][0]).is_file()


def test_snapshot_matches_the_live_object_info(comfy, pack):
    """The schemas CI checks against are the ones ComfyUI really serves (inputs, order, widgets, outputs). On the
    ComfyUI release the snapshot was taken from they are equal; on another release the shipped workflows must still
    convert and link the same: equal inputs, and the snapshot's outputs a prefix of the live ones (a release may
    append an output, as 0.33 did to PreviewImage, without moving any link)."""
    import nodes

    def conversion_view(info):
        view = {}
        for name, spec, section in input_specs(info):
            typ = spec[0] if isinstance(spec[0], str) else "COMBO"
            view[name] = (section, typ, widget_slots(spec))
        return view, list(info["output"])

    from dreamcache.comfy.env import comfyui_version

    version = comfyui_version(comfy)
    same_release = version == SNAPSHOT["comfyui_version"]
    problems = []
    for node_id, snap in INFO.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node_id)
        if cls is None:
            from helpers import load_core_extras

            load_core_extras()
            cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        live = cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else None
        if live is None:
            live = {"input": cls.INPUT_TYPES(), "input_order": {k: list(v) for k, v in cls.INPUT_TYPES().items()},
                    "output": list(cls.RETURN_TYPES)}
        (live_in, live_out), (snap_in, snap_out) = conversion_view(live), conversion_view(snap)
        if same_release or node_id.startswith("DreamCache"):
            ok = (live_in, live_out) == (snap_in, snap_out)
        else:
            ok = live_in == snap_in and live_out[:len(snap_out)] == snap_out
        if not ok:
            problems.append(f"{node_id}: live {(live_in, live_out)} vs snapshot {(snap_in, snap_out)}")
    assert not problems, (f"ComfyUI {version} (snapshot of {SNAPSHOT['comfyui_version']}); refresh "
                          "tests/data with tools/snapshot_object_info.py or fix the workflows:\n" + "\n".join(problems))
