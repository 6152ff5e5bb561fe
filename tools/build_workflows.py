"""Builds the example workflows in workflows/ (UI format 0.4, as the ComfyUI frontend saves them).

    python tools/build_workflows.py          # rewrite workflows/*.json from the definitions below

Widget values, input/output sockets and their order come from the /object_info snapshot in tests/data (refreshed by
tools/snapshot_object_info.py), so a generated file is what the frontend itself would save for these nodes. The
thumbnails (same name, .jpg) are screenshots of each workflow in a real browser: tools/screenshot_workflows.py.
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamcache import __version__  # noqa: E402
from dreamcache.apps.run.workflow import input_specs, upload_values, widget_slots  # noqa: E402

SNAPSHOT = json.loads((ROOT / "tests" / "data" / "object_info_snapshot.json").read_text())
INFO = SNAPSHOT["object_info"]
COMFY_VERSION = SNAPSHOT["comfyui_version"]

CKPT = {"name": "v2-1_512-ema-pruned.safetensors",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
        "directory": "checkpoints"}
ADAPTER = {"name": "cross_attention-199999.pt",
           "url": "https://drive.google.com/drive/folders/11qgm_oXMgHg4jiD7Q2S0rWeIfHhTPg0K", "directory": "dreamcache"}
#: The frontend offers its Download button only for huggingface.co / civitai.com URLs (and, from frontend 1.49 on,
#: .pt/.pth/.ckpt files; 1.27 takes .safetensors/.sft only): SAM ViT-B from its Hugging Face copy (the same file as
#: dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth, which the README also names). The authors publish
#: the adapter only in a Google Drive folder, which no frontend downloads from: its entry is a link.
SAM = {"name": "sam_vit_b_01ec64.pth",
       "url": "https://huggingface.co/ybelkada/segment-anything/resolve/main/checkpoints/sam_vit_b_01ec64.pth",
       "directory": "sams"}
#: Any SD 2.x LoRA works, and there is no one public file to point at, so it is a placeholder name (not in the
#: workflow's models list, whose entries the frontend requires to carry a download url).
LORA_PLACEHOLDER = "your_sd21_lora.safetensors"
CONTROLNET = {"name": "control_v11p_sd21_depth.safetensors",
              "url": "https://huggingface.co/thibaud/controlnet-sd21/resolve/main/control_v11p_sd21_depth.safetensors",
              "directory": "controlnet"}
CKPT_INPAINT = {"name": "512-inpainting-ema.safetensors",
                "url": "https://huggingface.co/stabilityai/stable-diffusion-2-inpainting/resolve/main/"
                       "512-inpainting-ema.safetensors",
                "directory": "checkpoints"}
SUBJECT = "dreamcache_example_subject.png"
PHOTO = "dreamcache_example_kitchen.png"
PHOTO_MASK = "dreamcache_example_kitchen_mask.png"
SUBJECT2 = "dreamcache_example_subject2.png"
DEPTH = "dreamcache_example_depth.png"
OFFICIAL_NEGATIVE = "Open mouth, tongue out, teeth visible, bad photo, low quality, blurred, deformed"
NEGATIVE = "blurry, low quality, deformed, watermark, text"


VIEW_SCALE = 0.7


def bounding_box(nodes: list[dict], groups: list[dict]) -> tuple[float, float, float, float]:
    """Canvas box around every node (title bar included) and group of a UI-format workflow."""
    boxes = [(d["pos"][0], d["pos"][1] - 30, d["pos"][0] + d["size"][0], d["pos"][1] + d["size"][1]) for d in nodes]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in groups]
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


class Node:
    def __init__(self, wf, nid, kind, pos, widgets, title=None, mode=0, models=None, size=None, color=None):
        self.wf, self.id, self.kind, self.pos, self.title, self.mode = wf, nid, kind, list(pos), title, mode
        self.widgets, self.models, self.size, self.color = dict(widgets or {}), models, size, color
        self.inputs = {}  # name -> link id
        self.outputs = {}  # slot -> [link ids]

    def out(self, name_or_slot) -> tuple["Node", int]:
        if isinstance(name_or_slot, int):
            return self, name_or_slot
        names = INFO[self.kind].get("output_name") or INFO[self.kind]["output"]
        return self, list(names).index(name_or_slot)


class Workflow:
    def __init__(self, name):
        self.name, self.nodes, self.links, self.groups = name, [], [], []

    def add(self, kind, pos, widgets=None, **kw) -> Node:
        if kind not in ("Note", "MarkdownNote") and kind not in INFO:
            raise KeyError(f"{kind} is not in the object_info snapshot")
        n = Node(self, len(self.nodes) + 1, kind, pos, widgets, **kw)
        self.nodes.append(n)
        return n

    def note(self, text, pos, size=(360, 160), color="#432"):
        return self.add("MarkdownNote", pos, {"text": text}, size=size, color=color)

    def link(self, src, dst: Node, input_name: str):
        node, slot = src if isinstance(src, tuple) else src.out(0)
        lid = len(self.links) + 1
        out_type = (INFO[node.kind]["output"])[slot]
        self.links.append([lid, node.id, slot, dst.id, input_name, out_type])
        node.outputs.setdefault(slot, []).append(lid)
        dst.inputs[input_name] = lid

    def group(self, title, bounding, color="#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    # ---- serialisation ---------------------------------------------------------------------------------------
    def _node_json(self, n: Node, order: int, slots: dict) -> dict:
        if n.kind in ("Note", "MarkdownNote"):
            return {"id": n.id, "type": n.kind, "pos": n.pos, "size": list(n.size), "flags": {}, "order": order,
                    "mode": 0, "inputs": [], "outputs": [],
                    "properties": {}, "widgets_values": [n.widgets["text"]], "color": n.color, "bgcolor": "#653"}
        info = INFO[n.kind]
        inputs, values = [], []
        uploads = upload_values(info)
        for name, spec, section in input_specs(info):
            if section != "required":  # the upload buttons' values follow the required widgets (workflow.py)
                values, uploads = values + uploads, []
            is_widget, extra = widget_slots(spec)
            typ = spec[0] if isinstance(spec[0], str) else "COMBO"
            if is_widget:
                if name not in n.widgets:
                    default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if default is None and typ == "COMBO":
                        opts = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
                        default = opts[0] if opts else None
                    if default is None:
                        raise KeyError(f"{n.kind}.{name} needs a value in workflow {self.name}")
                    n.widgets[name] = default
                values.append(n.widgets[name])
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if opts.get("control_after_generate"):
                    values.append("fixed")
                if name in n.inputs:
                    slots[(n.id, name)] = len(inputs)
                    inputs.append({"name": name, "type": typ, "widget": {"name": name}, "link": n.inputs[name]})
            else:
                if name in n.inputs or section == "required":
                    slots[(n.id, name)] = len(inputs)
                    inputs.append({"name": name, "type": typ, "link": n.inputs.get(name)})
        values += uploads
        unknown = set(n.widgets) - {name for name, _s, _sec in input_specs(info)}
        if unknown:
            raise KeyError(f"{n.kind} has no inputs {unknown} (workflow {self.name})")
        names = info.get("output_name") or info["output"]
        outputs = [{"name": names[i], "type": t, "links": n.outputs.get(i, []), "slot_index": i} for i,
                   t in enumerate(info["output"])]
        pack = n.kind.startswith("DreamCache")
        props = {"Node name for S&R": n.kind, "cnr_id": "comfyui-dreamcache" if pack else "comfy-core",
                 "ver": __version__ if pack else COMFY_VERSION}
        if n.models:
            props["models"] = n.models
        height = 46 + 24 * (len(inputs) + len(values) + len(outputs))
        d = {"id": n.id, "type": n.kind, "pos": n.pos, "size": list(n.size or (320, height)), "flags": {},
             "order": order, "mode": n.mode,
             "inputs": inputs, "outputs": outputs, "properties": props, "widgets_values": values}
        if n.title:
            d["title"] = n.title
        if n.color:
            d["color"] = n.color
        return d

    def to_json(self, models) -> dict:
        # execution order: a topological order of the links (the frontend stores one in "order")
        deps = {n.id: {self.links[link - 1][1] for link in n.inputs.values()} for n in self.nodes}
        order, done = [], set()
        while len(order) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and deps[n.id] <= done]
            order += ready
            done |= set(ready)
        slots = {}
        nodes = {n.id: self._node_json(n, order.index(n.id), slots) for n in self.nodes}
        links = [[lid, o, os_, t, slots[(t, name)], typ] for lid, o, os_, t, name, typ in self.links]
        # open at a readable zoom (the frontend drops node text below ~0.6) with the top-left of the graph in view
        x0, y0, _x1, _y1 = bounding_box(list(nodes.values()), self.groups)
        ds = {"scale": VIEW_SCALE, "offset": [round(40 - x0), round(40 - y0)]}
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-dreamcache/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": [nodes[n.id] for n in self.nodes],
            "links": links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": ds, "frontendVersion": "1.27.10"},
            "models": models,
            "version": 0.4,
        }


# ---- shared pieces ----------------------------------------------------------------------------------------------

def checkpoint(wf, pos=(0, 0)):
    return wf.add("CheckpointLoaderSimple", pos, {"ckpt_name": CKPT["name"]}, models=[CKPT])


def subject_chain(wf, ckpt, x=0, y=260, with_mask=True):
    """LoadImage -> (SAM) SubjectMask -> BuildFeatureCache; returns (adapter loader, cache builder)."""
    adapter = wf.add("DreamCacheLoader", (x, y + 560), {"adapter_name": ADAPTER["name"], "base_family": "sd2"},
                     models=[ADAPTER])
    image = wf.add("LoadImage", (x, y), {"image": SUBJECT}, title="Subject photo")
    build = wf.add("DreamCacheBuildFeatureCache", (x + 820, y + 180), {"seed": 0, "resolution": 512, "fit": "pad",
                                                                       "batch_mode": "concat"})
    if with_mask:
        sam = wf.add("DreamCacheSAMLoader", (x + 380, y), {"sam_name": SAM["name"]}, models=[SAM])
        mask = wf.add("DreamCacheSubjectMask", (x + 380, y + 150), {"prompt_mode": "auto", "layout": "train",
                                                                    "size": 512})
        wf.link(image.out("IMAGE"), mask, "image")
        wf.link(sam, mask, "sam")
        wf.link(mask.out(0), build, "image")
    else:
        wf.link(image.out("IMAGE"), build, "image")
    wf.link(ckpt.out("MODEL"), build, "model")
    wf.link(ckpt.out("VAE"), build, "vae")
    wf.link(ckpt.out("CLIP"), build, "clip")
    wf.link(adapter, build, "adapter")
    return adapter, build


def apply_subject(wf, model_src, adapter, cache_src, pos=(1260, 200), mode=0, **widgets):
    """Apply DreamCache wired to a model, the adapter and a cache."""
    node = wf.add("DreamCacheApply", pos, {"strength": 1.0, **widgets}, mode=mode)
    wf.link(model_src, node, "model")
    wf.link(adapter, node, "adapter")
    wf.link(cache_src, node, "cache")
    return node


def prompts(wf, ckpt, x, y, positive, negative=NEGATIVE):
    pos = wf.add("CLIPTextEncode", (x, y), {"text": positive}, title="Prompt", size=(400, 160))
    neg = wf.add("CLIPTextEncode", (x, y + 200), {"text": negative}, title="Negative prompt", size=(400, 130))
    wf.link(ckpt.out("CLIP"), pos, "clip")
    wf.link(ckpt.out("CLIP"), neg, "clip")
    return pos, neg


def sample_and_save(wf, model_src, pos, neg, ckpt, x, y, prefix, steps=30, text=7.5, image=5.0, mode="combined",
                    sampler="ddim", scheduler="ddim_uniform",
                    batch=1, width=512, height=512, seed=42):
    """Empty Latent Image -> Dual Guidance Sampler -> VAE Decode -> Save Image."""
    latent = wf.add("EmptyLatentImage", (x, y + 420), {"width": width, "height": height, "batch_size": batch})
    return sample_latent_and_save(wf, model_src, pos, neg, ckpt, latent, x + 360, y, prefix, steps=steps, text=text,
                                  image=image, mode=mode, sampler=sampler, scheduler=scheduler, seed=seed)


def sample_latent_and_save(wf, model_src, pos, neg, ckpt, latent_src, x, y, prefix, denoise=1.0, steps=30, text=7.5,
                           image=5.0, mode="combined", sampler="ddim", scheduler="ddim_uniform", seed=42):
    """Dual Guidance Sampler on a given latent (empty, or an encoded photo) -> VAE Decode -> Save Image."""
    sampler_node = wf.add("DreamCacheDualGuidanceSampler", (x, y), {"seed": seed, "steps": steps,
                                                                    "sampler_name": sampler, "scheduler": scheduler,
                                                                    "denoise": denoise, "text_scale": text,
                                                                    "image_scale": image, "mode": mode})
    wf.link(model_src, sampler_node, "model")
    wf.link(pos, sampler_node, "positive")
    wf.link(neg, sampler_node, "negative")
    wf.link(latent_src, sampler_node, "latent_image")
    decode = wf.add("VAEDecode", (x + 360, y))
    wf.link(sampler_node, decode, "samples")
    wf.link(ckpt.out("VAE"), decode, "vae")
    save = wf.add("SaveImage", (x + 600, y), {"filename_prefix": prefix}, size=(420, 460))
    wf.link(decode, save, "images")
    return sampler_node, save


SCALES_NOTE = ("### The two scales\n**text_scale** (s_T) is the usual CFG strength of the prompt. **image_scale** "
               "(s_I) is how strongly the "
               "cached subject steers the image: 0 ignores it, the reference demo uses 5.0, its DreamBench runs 0.4. "
               "`combined` runs three model calls per step; `joint` uses one scale for both (two calls).")


# ---- the workflows ----------------------------------------------------------------------------------------------

def basic():
    wf = Workflow("dreamcache_basic")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build, start_percent=0.0, end_percent=1.0)
    pos, neg = prompts(wf, ckpt, 1260, 520, "a photo of a mug on a wooden table in a sunny kitchen, high quality")
    sample_and_save(wf, apply_.out(0), pos, neg, ckpt, 1720, 200, "dreamcache_basic")
    preview = wf.add("PreviewImage", (820, 820), title="What the model sees (reference)", size=(320, 340))
    wf.link(build.out(1), preview, "images")
    wf.note("### 1 · Subject\nLoad a photo of your subject. **Subject Mask** cuts it out with SAM and lays it out the "
            "way the adapter was "
            "trained: alone on white, centred. Already on white? Use prompt_mode `mask` or wire the image straight to "
            "the cache.", (0, -230))
    wf.note("### 2 · Cache once\n**Build Feature Cache** runs the model one time on the subject (timestep 1, empty "
            "prompt) and keeps the "
            "features the adapter reads. It re-runs only when the subject, model or adapter change.", (820, -60))
    wf.note("### 3 · Personalise\n**Apply DreamCache** patches a copy of the model; any sampler works with it. "
            "**strength** 1 is the method as "
            "trained, 0 the plain model. Name the subject with a plain word in the prompt (\"a mug\"): no special "
            "token is needed.", (1260, -60))
    wf.note(SCALES_NOTE, (1720, -60), size=(420, 200))
    return wf, [CKPT, ADAPTER, SAM]


def official_sd21():
    wf = Workflow("dreamcache_official_sd21")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    build.widgets["fit"] = "stretch"  # the reference scripts resize the whole picture to 512x512
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    pos, neg = prompts(wf, ckpt, 1260, 520, "a mug on top of a mirror", OFFICIAL_NEGATIVE)
    wf.link(neg, build, "conditioning")  # the official scripts build the cache with the negative prompt
    sample_and_save(wf, apply_.out(0), pos, neg, ckpt, 1720, 200, "dreamcache_official", steps=50, text=7.5, image=5.0,
                    batch=4)
    wf.note("### Reference settings (SD 2.1-base)\nAs the authors' demo runs: 50 DDIM steps (eta 0), text_scale 7.5, "
            "image_scale 5.0, "
            "a batch of 4 at 512², the reference resized to 512² (fit `stretch`) and cached with the negative prompt. "
            "Their DreamBench numbers use image_scale 0.4.", (1260, -60), size=(440, 190))
    return wf, [CKPT, ADAPTER, SAM]


def lora():
    wf = Workflow("dreamcache_lora")
    ckpt = checkpoint(wf, (0, 0))
    lora_ = wf.add("LoraLoader", (380, -200), {"lora_name": LORA_PLACEHOLDER, "strength_model": 0.8,
                                               "strength_clip": 0.8},
                   title="LoRA (pick any SD 2.x LoRA you have)")
    wf.link(ckpt.out("MODEL"), lora_, "model")
    wf.link(ckpt.out("CLIP"), lora_, "clip")
    adapter, build = subject_chain(wf, ckpt)
    apply_ = apply_subject(wf, lora_.out(0), adapter, build)
    pos, neg = prompts(wf, ckpt, 1260, 520, "a watercolor painting of a mug, soft colors")
    sample_and_save(wf, apply_.out(0), pos, neg, ckpt, 1720, 200, "dreamcache_lora")
    wf.note("### LoRA + DreamCache\nThe LoRA changes the style, DreamCache keeps the subject. "
            "`your_sd21_lora.safetensors` is a placeholder: "
            "pick any LoRA made for your checkpoint's family (SD 2.x here) from models/loras. It can go before or "
            "after Apply DreamCache; "
            "the cache is built on the plain model.", (820, -260), size=(400, 190))
    return wf, [CKPT, ADAPTER, SAM]


def controlnet():
    wf = Workflow("dreamcache_controlnet")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    pos, neg = prompts(wf, ckpt, 1260, 520, "a photo of a mug on a marble counter, studio light")
    cn = wf.add("ControlNetLoader", (1260, 900), {"control_net_name": CONTROLNET["name"]}, models=[CONTROLNET])
    hint = wf.add("LoadImage", (1260, 1020), {"image": DEPTH}, title="Depth map (any pose/depth/edge hint)")
    cna = wf.add("ControlNetApplyAdvanced", (1720, 700), {"strength": 0.8, "start_percent": 0.0, "end_percent": 0.8})
    wf.link(pos, cna, "positive")
    wf.link(neg, cna, "negative")
    wf.link(cn, cna, "control_net")
    wf.link(hint.out("IMAGE"), cna, "image")
    wf.link(ckpt.out("VAE"), cna, "vae")
    sample_and_save(wf, apply_.out(0), cna.out(0), cna.out(1), ckpt, 2100, 200, "dreamcache_controlnet")
    wf.note("### ControlNet + DreamCache\nThe ControlNet fixes the layout (here a depth map), DreamCache the subject, "
            "the prompt the rest. "
            "Use a ControlNet for your checkpoint's family (SD 2.1: e.g. the thibaud/controlnet-sd21 models).", (1720,
                                                                                                                 420),
            size=(400, 170))
    return wf, [CKPT, ADAPTER, SAM, CONTROLNET]


def cache_library():
    wf = Workflow("dreamcache_cache_library")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    save = wf.add("DreamCacheSave", (1260, 330), {"filename_prefix": "my_subject", "dtype": "fp16"})
    wf.link(build, save, "cache")
    wf.group("A · Build and save the subject once", (-30, 170, 1720, 800))
    load = wf.add("DreamCacheLoad", (0, 1200), {"cache_name": "my_subject_00001.safetensors"}, mode=2)
    adapter2 = wf.add("DreamCacheLoader", (0, 1340), {"adapter_name": ADAPTER["name"], "base_family": "sd2"},
                      models=[ADAPTER], mode=2)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter2, load, pos=(420, 1200), mode=2)
    pos, neg = prompts(wf, ckpt, 420, 1450, "a photo of a mug floating in space, stars in the background")
    for n in (pos, neg):
        n.mode = 2
    s, save_img = sample_and_save(wf, apply_.out(0), pos, neg, ckpt, 880, 1200, "dreamcache_library")
    for n in wf.nodes[-4:]:
        n.mode = 2
    wf.group("B · Use a saved subject (no reference image needed)", (-20, 1120, 2280, 800), color="#88a")
    wf.note("### A library of subjects\nRun once: group A saves `my_subject_00001.safetensors` to "
            "models/dreamcache_caches. Then mute group A, "
            "unmute group B (Ctrl+M) and pick the saved cache: the subject is reused without its photo, SAM or the "
            "cache pass. Caches "
            "are small (≈6 MB per subject in fp16) and can be shared.", (1260, 520), size=(420, 220))
    return wf, [CKPT, ADAPTER, SAM]


def custom_sampling():
    wf = Workflow("dreamcache_custom_sampling")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    pos, neg = prompts(wf, ckpt, 1260, 520, "a photo of a mug in the snow, golden hour")
    guider = wf.add("DreamCacheGuider", (1720, 0), {"text_scale": 7.5, "image_scale": 5.0, "mode": "combined"})
    wf.link(apply_, guider, "model")
    wf.link(pos, guider, "positive")
    wf.link(neg, guider, "negative")
    noise = wf.add("RandomNoise", (1720, 300), {"noise_seed": 42})
    ks = wf.add("KSamplerSelect", (1720, 420), {"sampler_name": "dpmpp_2m"})
    sched = wf.add("BasicScheduler", (1720, 540), {"scheduler": "karras", "steps": 30, "denoise": 1.0})
    wf.link(apply_, sched, "model")
    latent = wf.add("EmptyLatentImage", (1720, 720), {"width": 512, "height": 512, "batch_size": 1})
    sca = wf.add("SamplerCustomAdvanced", (2100, 200))
    wf.link(noise, sca, "noise")
    wf.link(guider, sca, "guider")
    wf.link(ks, sca, "sampler")
    wf.link(sched, sca, "sigmas")
    wf.link(latent, sca, "latent_image")
    decode = wf.add("VAEDecode", (2460, 200))
    wf.link(sca.out(0), decode, "samples")
    wf.link(ckpt.out("VAE"), decode, "vae")
    save = wf.add("SaveImage", (2700, 200), {"filename_prefix": "dreamcache_custom"}, size=(420, 460))
    wf.link(decode, save, "images")
    wf.note("### Custom sampling\n**DreamCache Guider** gives SamplerCustomAdvanced the same two-scale guidance as "
            "Dual Guidance Sampler, "
            "so any sampler, scheduler or sigma schedule can be used.\n\n" + SCALES_NOTE, (1720, -330), size=(440, 300))
    return wf, [CKPT, ADAPTER, SAM]


def box_mask(wf, pos, x, y, width, height, feather=0, size=(512, 512), title=None):
    """A MASK that is 1 inside the box (x, y, width, height) of a size[0]×size[1] canvas, optionally feathered, from
    core nodes: SolidMask (canvas 0) + SolidMask (box 1) -> MaskComposite (add) [-> FeatherMask]."""
    px, py = pos
    canvas = wf.add(
        "SolidMask", (px, py), {"value": 0.0, "width": size[0], "height": size[1]}, title="Canvas (the image size)"
    )
    box = wf.add(
        "SolidMask", (px, py + 170), {"value": 1.0, "width": width, "height": height}, title=title or "Subject's box"
    )
    comp = wf.add("MaskComposite", (px + 340, py), {"x": x, "y": y, "operation": "add"})
    wf.link(canvas, comp, "destination")
    wf.link(box, comp, "source")
    if not feather:
        return comp
    soft = wf.add(
        "FeatherMask",
        (px + 340, py + 230),
        {"left": feather, "top": feather, "right": feather, "bottom": feather},
        title="Soft edge",
    )
    wf.link(comp, soft, "mask")
    return soft


def preview_mask(wf, mask_src, pos, title):
    img = wf.add("MaskToImage", pos)
    wf.link(mask_src, img, "mask")
    prev = wf.add("PreviewImage", (pos[0], pos[1] + 100), title=title, size=(260, 300))
    wf.link(img, prev, "images")
    return prev


def regional():
    wf = Workflow("dreamcache_regional")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    mask = box_mask(wf, (1260, -520), 40, 140, 240, 330, feather=40)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    wf.link(mask, apply_, "mask")
    preview_mask(wf, mask, (2000, -560), "Where the subject goes")
    pos, neg = prompts(
        wf,
        ckpt,
        1260,
        520,
        "a photo of a mug on the left of a wooden desk, a laptop and a plant on the right, morning light",
    )
    sample_and_save(wf, apply_.out(0), pos, neg, ckpt, 1720, 200, "dreamcache_regional")
    wf.note(
        "### Place the subject with a mask\nThe **mask** input of Apply DreamCache limits the subject to a region: "
        "1 = fully, 0 = not at all "
        "(there the model is the plain one at every patched layer), soft in between. Here core nodes draw a "
        "feathered box on the "
        "left; or right-click a **Load Image**, *Open in MaskEditor*, paint the region and wire its MASK. The mask "
        "must have the "
        "aspect of the image you generate (any resolution). Say in the prompt what goes where.",
        (2320, -560),
        size=(440, 250),
    )
    return wf, [CKPT, ADAPTER, SAM]


def subject_cache(wf, ckpt, adapter, sam, image_name, pos, title):
    """LoadImage -> SubjectMask (shared SAM) -> BuildFeatureCache with a shared adapter."""
    x, y = pos
    image = wf.add("LoadImage", (x, y), {"image": image_name}, title=title)
    mask = wf.add("DreamCacheSubjectMask", (x + 380, y), {"prompt_mode": "auto", "layout": "train", "size": 512})
    build = wf.add(
        "DreamCacheBuildFeatureCache",
        (x + 820, y),
        {"seed": 0, "resolution": 512, "fit": "pad", "batch_mode": "concat"},
    )
    wf.link(image.out("IMAGE"), mask, "image")
    wf.link(sam, mask, "sam")
    wf.link(mask.out(0), build, "image")
    for name in ("MODEL", "VAE", "CLIP"):
        wf.link(ckpt.out(name), build, name.lower())
    wf.link(adapter, build, "adapter")
    return build


def two_subjects():
    wf = Workflow("dreamcache_two_subjects")
    ckpt = checkpoint(wf, (0, 0))
    adapter = wf.add(
        "DreamCacheLoader", (0, 220), {"adapter_name": ADAPTER["name"], "base_family": "sd2"}, models=[ADAPTER]
    )
    sam = wf.add("DreamCacheSAMLoader", (0, 380), {"sam_name": SAM["name"]}, models=[SAM])
    build1 = subject_cache(wf, ckpt, adapter, sam, SUBJECT, (0, 560), "Subject 1 (left)")
    build2 = subject_cache(wf, ckpt, adapter, sam, SUBJECT2, (0, 1000), "Subject 2 (right)")
    left = box_mask(wf, (1260, -560), 0, 0, 256, 512, title="Left half")
    right = wf.add("InvertMask", (1600, -330), title="Right half")
    wf.link(left, right, "mask")
    apply1 = apply_subject(wf, ckpt.out("MODEL"), adapter, build1, pos=(1260, 560))
    wf.link(left, apply1, "mask")
    apply2 = apply_subject(wf, apply1.out(0), adapter, build2, pos=(1260, 1000))
    wf.link(right, apply2, "mask")
    pos, neg = prompts(
        wf, ckpt, 1720, 560, "a photo of a mug and a teapot side by side on a wooden table, soft window light"
    )
    regional_prompts = []
    for i, (text, mask) in enumerate((("a red mug with a white star", left), ("a round blue teapot", right))):
        enc = wf.add(
            "CLIPTextEncode",
            (1720, 960 + 230 * i),
            {"text": text},
            title=f"Prompt for the {'left' if i == 0 else 'right'}",
            size=(400, 130),
        )
        wf.link(ckpt.out("CLIP"), enc, "clip")
        cs = wf.add("ConditioningSetMask", (2160, 960 + 230 * i), {"strength": 1.0, "set_cond_area": "default"})
        wf.link(enc, cs, "conditioning")
        wf.link(mask, cs, "mask")
        regional_prompts.append(cs)
    comb1 = wf.add("ConditioningCombine", (2520, 760))
    wf.link(pos, comb1, "conditioning_1")
    wf.link(regional_prompts[0], comb1, "conditioning_2")
    comb2 = wf.add("ConditioningCombine", (2520, 900))
    wf.link(comb1, comb2, "conditioning_1")
    wf.link(regional_prompts[1], comb2, "conditioning_2")
    sample_and_save(wf, apply2.out(0), comb2.out(0), neg, ckpt, 2900, 200, "dreamcache_two_subjects")
    wf.note(
        "### Two subjects, one image\nEach **Apply DreamCache** brings its own cache and its own mask; chained, "
        "they act independently "
        "(each adapter reads the base model's features and its own subject) and their contributions add, so keep "
        "the masks apart "
        "(where they overlap the two subjects add up). **ConditioningSetMask** gives each half its own prompt, the "
        "scene prompt "
        "covers all. Guidance switches both subjects on and off together as the image condition.",
        (2000, -560),
        size=(460, 260),
    )
    return wf, [CKPT, ADAPTER, SAM]


def attention_maps():
    wf = Workflow("dreamcache_attention_maps")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    rec = wf.add("DreamCacheAttentionRecorder", (1260, -260), {"layer": "output_6", "step_percent": 0.5})
    wf.link(apply_, rec, "model")
    pos, neg = prompts(wf, ckpt, 1260, 520, "a photo of a mug on a beach, sunset")
    sampler, save = sample_and_save(wf, rec.out(0), pos, neg, ckpt, 1720, 200, "dreamcache_attention")
    decode = [n for n in wf.nodes if n.kind == "VAEDecode"][-1]
    show = wf.add(
        "DreamCacheShowAttention", (2440, 720), {"point_x": 0.5, "point_y": 0.55, "subject": 1, "opacity": 0.55}
    )
    wf.link(rec.out(1), show, "attention")
    wf.link(sampler, show, "latent")
    wf.link(decode, show, "image")
    wf.link(build.out(1), show, "reference")
    p1 = wf.add("PreviewImage", (2860, 720), title="Where the image draws on the subject", size=(360, 400))
    wf.link(show.out(0), p1, "images")
    p2 = wf.add("PreviewImage", (3260, 720), title="Where the marked point looks in the reference", size=(360, 400))
    wf.link(show.out(1), p2, "images")
    wf.note(
        "### Attention maps (paper Fig. 5)\n**Attention Recorder** makes the model remember, at one layer "
        "(`output_4` = 16×16, `output_6` "
        "= 32×32 tokens at 512²) and one step, how the image's locations attend to the cached reference; the image "
        "is unchanged. "
        "**Show Attention** draws it: red where the image draws most on the subject, and for the marked point "
        "(point_x/point_y) where it looks in the reference. Move the point and re-queue: only the show node runs "
        "again.",
        (1720, -420),
        size=(460, 270),
    )
    return wf, [CKPT, ADAPTER, SAM]


# ---- the subject into your own photo: inpainting, img2img, outpainting (issue 24) --------------------------------

PHOTO_PROMPT = "a photo of a mug on a wooden kitchen table, a window and a potted plant behind, soft daylight"


def photo_and_mask(wf, x, y, with_mask=True):
    """The photo to work on ("Photo") and, optionally, where the subject goes ("Mask": white = the subject's place);
    both titled, so ``python -m dreamcache run --set Photo.image=... --set Mask.image=...`` can replace them."""
    photo = wf.add("LoadImage", (x, y), {"image": PHOTO}, title="Photo", size=(320, 380))
    if not with_mask:
        return photo, None
    mask_image = wf.add("LoadImage", (x + 360, y), {"image": PHOTO_MASK}, title="Mask", size=(320, 380))
    mask = wf.add("ImageToMask", (x + 360, y + 420), {"channel": "red"}, title="Mask (white = subject)")
    wf.link(mask_image.out("IMAGE"), mask, "image")
    return photo, mask


def masked_latent(wf, ckpt, image_src, mask_src, pos):
    """VAE Encode of the photo with the mask as its noise mask: outside the mask the photo's latent is kept."""
    enc = wf.add("VAEEncode", pos)
    wf.link(image_src, enc, "pixels")
    wf.link(ckpt.out("VAE"), enc, "vae")
    snm = wf.add("SetLatentNoiseMask", (pos[0], pos[1] + 130))
    wf.link(enc, snm, "samples")
    wf.link(mask_src, snm, "mask")
    return snm


SUBJECT_NOTE = ("### 1 · Subject\nThe subject's photo: **Subject Mask** cuts it out, **Build Feature Cache** caches "
                "it once (as in the basic workflow).")


def inpaint():
    wf = Workflow("dreamcache_inpaint")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    photo, mask = photo_and_mask(wf, 1260, -560)
    dd = wf.add("DifferentialDiffusion", (1260, -100))
    wf.link(ckpt.out("MODEL"), dd, "model")
    apply_ = apply_subject(wf, dd.out(0), adapter, build)
    wf.link(mask.out(0), apply_, "mask")
    latent = masked_latent(wf, ckpt, photo.out("IMAGE"), mask.out(0), (1980, -560))
    pos, neg = prompts(wf, ckpt, 1260, 520, PHOTO_PROMPT)
    sample_latent_and_save(wf, apply_.out(0), pos, neg, ckpt, latent, 1980, 200, "dreamcache_inpaint")
    wf.note(SUBJECT_NOTE, (0, -230))
    wf.note("### 2 · Your photo and where the subject goes\n**Photo** is the picture to keep; **Mask** is white where "
            "the subject should appear (a black-and-white image of any size with the photo's aspect). Or paint it: "
            "right-click **Photo** → *Open in MaskEditor*, paint, and connect Photo's MASK output in place of "
            "the Mask (white = subject) node's. "
            "From the command line: `--set Photo.image=mine.png --set Mask.image=mine_mask.png`.",
            (1260, -900), size=(700, 200))
    wf.note("### 3 · One mask, two jobs\nThe same MASK limits **Apply DreamCache** (the subject only there) and is the "
            "latent's noise mask (**Set Latent Noise Mask**: only there is repainted; outside, the photo is kept up "
            "to the VAE's round trip). **Differential Diffusion** makes a soft (grey) mask edge blend gradually. A "
            "regular checkpoint works; for large areas an inpainting checkpoint blends better "
            "(`dreamcache_inpaint_model`).", (2400, -560), size=(460, 250))
    return wf, [CKPT, ADAPTER, SAM]


def inpaint_model():
    wf = Workflow("dreamcache_inpaint_model")
    ckpt = wf.add("CheckpointLoaderSimple", (0, 0), {"ckpt_name": CKPT_INPAINT["name"]}, models=[CKPT_INPAINT],
                  title="Inpainting checkpoint (SD 2.x inpainting)")
    adapter, build = subject_chain(wf, ckpt)
    photo, mask = photo_and_mask(wf, 1260, -560)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    wf.link(mask.out(0), apply_, "mask")
    pos, neg = prompts(wf, ckpt, 1260, 520, PHOTO_PROMPT)
    imc = wf.add("InpaintModelConditioning", (1980, -560), {"noise_mask": True})
    wf.link(pos, imc, "positive")
    wf.link(neg, imc, "negative")
    wf.link(ckpt.out("VAE"), imc, "vae")
    wf.link(photo.out("IMAGE"), imc, "pixels")
    wf.link(mask.out(0), imc, "mask")
    sample_latent_and_save(wf, apply_.out(0), imc.out(0), imc.out(1), ckpt, imc.out(2), 1980, 200,
                           "dreamcache_inpaint_model")
    wf.note(SUBJECT_NOTE + " The cache is built on the inpainting checkpoint itself: its extra channels get a mask "
            "over everything, as for a painted area.", (0, -230), size=(400, 190))
    wf.note("### 2 · Your photo and where the subject goes\nWhite in **Mask** = where the subject goes (or paint on "
            "**Photo** in the MaskEditor and connect its MASK). `--set Photo.image=... --set Mask.image=...` from the "
            "command line.", (1260, -820), size=(700, 160))
    wf.note("### 3 · Inpainting checkpoint\n**InpaintModelConditioning** gives the model the photo and the mask as "
            "its extra input channels and keeps the photo outside the mask; the same MASK limits **Apply "
            "DreamCache**. Use an inpainting checkpoint of the adapter's family: SD 2.x inpainting for the released "
            "adapter. It blends large areas and hard mask edges better than a regular checkpoint.", (2400, -560),
            size=(460, 240))
    return wf, [CKPT_INPAINT, ADAPTER, SAM]


def img2img():
    wf = Workflow("dreamcache_img2img")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    photo, _ = photo_and_mask(wf, 1260, -560, with_mask=False)
    apply_ = apply_subject(wf, ckpt.out("MODEL"), adapter, build)
    enc = wf.add("VAEEncode", (1660, -560))
    wf.link(photo.out("IMAGE"), enc, "pixels")
    wf.link(ckpt.out("VAE"), enc, "vae")
    pos, neg = prompts(wf, ckpt, 1260, 520, "an oil painting of a mug on a kitchen table by a window, warm light")
    sample_latent_and_save(wf, apply_.out(0), pos, neg, ckpt, enc, 1980, 200, "dreamcache_img2img", denoise=0.65)
    wf.note(SUBJECT_NOTE, (0, -230))
    wf.note("### 2 · Restyle your photo around the subject\n**Photo** is encoded and re-drawn at **denoise** 0.65: "
            "lower keeps more of its layout and colours, higher (0.8-0.9) lets the subject and the prompt change more. "
            "DreamCache acts on the whole picture; give Apply DreamCache a mask to keep the subject to one place. "
            "`--set Photo.image=mine.png` from the command line.", (1980, -330), size=(460, 220))
    return wf, [CKPT, ADAPTER, SAM]


def outpaint():
    wf = Workflow("dreamcache_outpaint")
    ckpt = checkpoint(wf, (0, 0))
    adapter, build = subject_chain(wf, ckpt)
    photo, _ = photo_and_mask(wf, 1260, -560, with_mask=False)
    pad = wf.add("ImagePadForOutpaint", (1620, -560), {"left": 0, "top": 0, "right": 256, "bottom": 0,
                                                       "feathering": 40}, title="Extend")
    wf.link(photo.out("IMAGE"), pad, "image")
    dd = wf.add("DifferentialDiffusion", (1260, -100))
    wf.link(ckpt.out("MODEL"), dd, "model")
    apply_ = apply_subject(wf, dd.out(0), adapter, build)
    wf.link(pad.out(1), apply_, "mask")
    latent = masked_latent(wf, ckpt, pad.out(0), pad.out(1), (1980, -560))
    pos, neg = prompts(wf, ckpt, 1260, 520, "a photo of a kitchen table by a window, a mug on the right end of the "
                                            "table, a potted plant, soft daylight")
    sample_latent_and_save(wf, apply_.out(0), pos, neg, ckpt, latent, 1980, 200, "dreamcache_outpaint")
    wf.note(SUBJECT_NOTE, (0, -230))
    wf.note("### 2 · Extend the canvas\n**Extend** (Pad Image for Outpainting) adds grey canvas around **Photo** "
            "(here 256 px on the right; multiples of 8) and a MASK of the new part, feathered into the photo. The "
            "new part is drawn from noise with the subject in it; the photo is kept. To extend a photo *of* the "
            "subject around it, load that photo in Photo and disconnect Apply DreamCache's mask.",
            (2400, -560), size=(460, 250))
    return wf, [CKPT, ADAPTER, SAM]


WORKFLOWS = [
    basic,
    official_sd21,
    lora,
    controlnet,
    cache_library,
    custom_sampling,
    regional,
    two_subjects,
    attention_maps,
    inpaint,
    inpaint_model,
    img2img,
    outpaint,
]


def main():
    out_dir = ROOT / "workflows"
    for make in WORKFLOWS:
        wf, models = make()
        data = wf.to_json(models)
        path = out_dir / f"{wf.name}.json"
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path.relative_to(ROOT)} ({len(data['nodes'])} nodes, {len(data['links'])} links)")


if __name__ == "__main__":
    main()
