"""UI-format workflow -> API prompt conversion and structural checks (no ComfyUI needed).

Protects: widget values are matched to inputs as the frontend stores them (seed control values and upload buttons
take a slot), linked widgets take the link, muted/bypassed nodes, Reroute and PrimitiveNode, Notes skipped, clear
errors for unknown node types and unconnected inputs, --set overrides, and the structural checks CI runs.
"""
from __future__ import annotations

import pytest

from dreamcache.apps.run.workflow import (
    WorkflowError,
    apply_overrides,
    check_structure,
    combo_options,
    ui_to_api,
    widget_value_count,
)

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {"tooltip": "x"}]}},
               "input_order": {"required": ["name"]},
               "output": ["MODEL", "CLIP"]},
    "LoadImage": {"input": {"required": {"image": [["cat.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
    "Sampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {}],
                                       "mode": ["COMBO", {"options": ["x", "y"]}], "image": ["IMAGE"]},
                          "optional": {"scale": ["FLOAT", {}], "extra": ["CLIP"], "forced": ["INT",
                                                                                             {"forceInput": True}]}},
                "input_order": {"required": ["model", "seed", "steps", "mode", "image"], "optional": ["scale", "extra",
                                                                                                      "forced"]},
                "output": ["LATENT"]},
    "Blur": {"input": {"required": {"image": ["IMAGE"], "radius": ["INT", {}]}},
             "input_order": {"required": ["image", "radius"]}, "output": ["IMAGE"]},
}


def node(nid, kind, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    n = {"id": nid, "type": kind, "mode": mode, "inputs": [dict(i) for i in inputs],
         "outputs": [dict(o) for o in outputs]}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def workflow():
    return {
        "version": 0.4,
        "nodes": [
            node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP",
                                                                                          "type": "CLIP",
                                                                                          "links": []}],
                 widgets=["b.safetensors"]),
            node(2, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}, {"name": "MASK",
                                                                                             "type": "MASK",
                                                                                             "links": []}],
                 widgets=["cat.png", "image"]),
            node(3, "Blur", inputs=[{"name": "image", "type": "IMAGE", "link": 2}], outputs=[{"name": "IMAGE",
                                                                                              "type": "IMAGE",
                                                                                              "links": [3]}],
                 widgets=[4], mode=4),
            node(4, "Reroute", inputs=[{"name": "", "type": "*", "link": 3}], outputs=[{"name": "", "type": "IMAGE",
                                                                                        "links": [4]}]),
            node(5, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [5],
                                               "widget": {"name": "steps"}}], widgets=[33, "fixed"]),
            node(6, "Sampler", inputs=[{"name": "model", "type": "MODEL", "link": 1}, {"name": "image",
                                                                                       "type": "IMAGE", "link": 4},
                                       {"name": "steps", "type": "INT", "link": 5, "widget": {"name": "steps"}}],
                 outputs=[{"name": "LATENT", "type": "LATENT", "links": []}], widgets=[123, "randomize", 10, "y", 2.5],
                 title="My sampler"),
            node(7, "Note", widgets=["hello"]),
            node(8, "Blur", inputs=[{"name": "image", "type": "IMAGE", "link": None}], widgets=[1], mode=2),
        ],
        "links": [[1, 1, 0, 6, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 4, 0, 6, 1,
                                                                                                 "IMAGE"], [5, 5, 0, 6,
                                                                                                            2, "INT"]],
        "models": [{"name": "b.safetensors", "url": "https://example.invalid/b", "directory": "checkpoints"}],
    }


def test_conversion_follows_the_frontend_rules():
    api = ui_to_api(workflow(), INFO)
    assert set(api) == {"1", "2", "6"}  # bypassed, muted, Reroute, PrimitiveNode and Note are gone
    assert api["1"]["inputs"] == {"name": "b.safetensors"}
    assert api["2"]["inputs"] == {"image": "cat.png"}  # the upload button's value is skipped
    s = api["6"]
    assert s["class_type"] == "Sampler" and s["_meta"]["title"] == "My sampler"
    assert s["inputs"]["model"] == ["1", 0]
    assert s["inputs"]["image"] == ["2", 0]  # through the Reroute and the bypassed Blur
    assert s["inputs"]["seed"] == 123  # "randomize" is the seed's control value, not the next input's
    assert s["inputs"]["steps"] == 33  # from the PrimitiveNode, not the stored 10
    assert s["inputs"]["mode"] == "y" and s["inputs"]["scale"] == 2.5
    assert "extra" not in s["inputs"] and "forced" not in s["inputs"]


def test_widget_value_count_matches_the_frontend():
    assert widget_value_count(INFO["Sampler"]) == 5  # seed + control, steps, mode, scale
    assert widget_value_count(INFO["LoadImage"]) == 2
    assert combo_options(INFO["Sampler"]["input"]["required"]["mode"]) == ["x", "y"]
    assert combo_options(INFO["Loader"]["input"]["required"]["name"]) == ["a.safetensors", "b.safetensors"]


def test_upload_button_values_follow_the_required_widgets():
    """The frontend appends its upload input to the node's *required* inputs (``required.upload``, Comfy.UploadImage),
    so LoadImageMask stores [image, channel, "image"] (seen in frontends 1.27 and 1.49). Before the fix the converter
    read the upload value as the channel and sent channel="image"."""
    info = {"LoadImageMask": {"input": {"required": {"image": [["m.png"], {"image_upload": True}],
                                                     "channel": [["alpha", "red"], {}]},
                                        "optional": {"gain": ["FLOAT", {}]}},
                              "input_order": {"required": ["image", "channel"], "optional": ["gain"]},
                              "output": ["MASK"]}}
    wf = {"nodes": [node(1, "LoadImageMask", outputs=[{"name": "MASK", "type": "MASK", "links": []}],
                         widgets=["m.png", "red", "image", 0.5])], "links": []}
    inputs = ui_to_api(wf, info)["1"]["inputs"]
    assert inputs == {"image": "m.png", "channel": "red", "gain": 0.5}
    assert widget_value_count(info["LoadImageMask"]) == 4


def test_unknown_node_type_and_unconnected_input():
    wf = workflow()
    wf["nodes"].append(node(9, "SomePackNode", widgets=[]))
    with pytest.raises(WorkflowError, match=r"node 9 \(SomePackNode\): node type 'SomePackNode' is not installed"):
        ui_to_api(wf, INFO)
    wf = workflow()
    wf["nodes"][5]["inputs"][0]["link"] = None
    with pytest.raises(WorkflowError, match="required input 'model' is not connected"):
        ui_to_api(wf, INFO)
    with pytest.raises(WorkflowError, match="not a UI-format workflow"):
        ui_to_api({"1": {"class_type": "X", "inputs": {}}}, INFO)


def test_muted_source_leaves_the_input_unconnected():
    wf = workflow()
    wf["nodes"][0]["mode"] = 2
    with pytest.raises(WorkflowError, match="required input 'model' is not connected"):
        ui_to_api(wf, INFO)


def test_overrides():
    api = ui_to_api(workflow(), INFO)
    out = apply_overrides(api, ["6.seed=7", "My sampler.mode=\"x\"", "Loader.name=a.safetensors", "Sampler.scale=1e-1"])
    assert out["6"]["inputs"]["seed"] == 7 and out["6"]["inputs"]["mode"] == "x" and out["6"]["inputs"]["scale"] == 0.1
    assert out["1"]["inputs"]["name"] == "a.safetensors"
    assert api["6"]["inputs"]["seed"] == 123  # the input prompt is not modified
    with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
        apply_overrides(api, ["seed=1"])
    with pytest.raises(WorkflowError, match="matches 0 nodes"):
        apply_overrides(api, ["Nope.seed=1"])


def test_structure_checks():
    assert check_structure(workflow(), INFO) == []
    wf = workflow()
    wf["nodes"][5]["widgets_values"] = [1, 2]
    wf["links"].append([9, 1, 0, 77, 0, "MODEL"])
    wf["nodes"][0]["outputs"][0]["links"] = []
    wf["models"].append({"url": "x"})
    problems = check_structure(wf, INFO)
    text = "\n".join(problems)
    assert "2 widget values, the schema has 5" in text
    assert "link 9 joins missing nodes" in text
    assert "link 1 is not listed on output 0" in text
    assert "needs 'name' and 'directory'" in text
    wf = workflow()
    wf["links"][0][5] = "VAE"
    assert any("carries VAE into input 'model'" in p for p in check_structure(wf, INFO))
