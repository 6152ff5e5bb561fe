"""ComfyUI workflow files: UI format (what the frontend saves, version 0.4) to API format (what /prompt runs).

The conversion follows the frontend's own rules, driven by ``/object_info``:

* widget values are stored in ``widgets_values`` in the order of the node's inputs (required, then optional) that
  are widgets (INT, FLOAT, STRING, BOOLEAN, COMBO, not ``forceInput``); an INT with ``control_after_generate``
  stores one more value (the control mode: fixed / increment / randomize), a COMBO with ``image_upload`` (or
  another ``*_upload``) one more (the upload button);
* a widget input connected to a link takes the link, its stored value is skipped;
* muted nodes (mode 2) are left out and their outputs feed nothing; bypassed nodes (mode 4) are left out and each
  of their outputs is wired to their first input of the same type; ``Reroute`` passes its input through;
  ``PrimitiveNode`` gives its value to the widgets it feeds; ``Note`` / ``MarkdownNote`` are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ...core.errors import DreamCacheError

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(DreamCacheError):
    """A workflow that cannot be converted or run (missing node type, unconnected input, bad override)."""


WorkflowError.__module__ = "dreamcache"


@dataclass(frozen=True)
class Link:
    id: int
    origin: int
    origin_slot: int
    target: int
    target_slot: int
    type: str


def is_ui_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_prompt(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v,
                                                                    dict) and "class_type" in v for v in data.values())


def load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"Workflow file '{path}' does not exist.") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"Workflow file '{path}' is not valid JSON ({e.msg} at line {e.lineno}).") from None


def links_of(workflow: dict) -> dict[int, Link]:
    out = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):  # newer serialisation
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"],
                        str(raw.get("type", "*")))
        else:
            link = Link(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]), str(raw[5]))
        out[link.id] = link
    return out


def input_specs(info: dict):
    """(name, spec, section) for a node's inputs in /object_info order (required then optional)."""
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            yield name, spec, section


def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_slots(spec) -> tuple[bool, int]:
    """(is a widget, how many extra values the frontend stores right after it: the control of a seed)."""
    typ = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = _options(spec)
    is_widget = (isinstance(typ,
                            list) or typ in WIDGET_TYPES) and not opts.get("forceInput") and not opts.get("rawLink")
    if not is_widget:
        return False, 0
    return True, 1 if opts.get("control_after_generate") else 0


def upload_values(info: dict) -> list[str]:
    """The values of a node's upload buttons (``image_upload`` -> ``"image"``). The frontend adds each as one more
    *required* input after the node's own (``required.upload``), so they are stored after the last required widget:
    LoadImageMask stores ``[image, channel, "image"]``, not ``[image, "image", channel]``."""
    return [k.split("_")[0] for _n, spec, section in input_specs(info) if section == "required"
            for k, v in _options(spec).items() if k.endswith("_upload") and v is True]


def combo_options(spec) -> list:
    """The choices of a COMBO input spec, in either /object_info form (V1 ``[[...], opts]`` or
    V3 ``["COMBO", {"options": [...]}]``)."""
    if isinstance(spec, (list, tuple)) and spec:
        if isinstance(spec[0], list):
            return list(spec[0])
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return list(spec[1].get("options", []))
    return []


def widget_value_count(info: dict) -> int:
    return (sum(1 + widget_slots(spec)[1] for _n, spec, _s in input_specs(info) if widget_slots(spec)[0])
            + len(upload_values(info)))


def _title(node: dict) -> str:
    return f"node {node['id']} ({node.get('title') or node.get('type')})"


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt ``{id: {"class_type", "inputs", "_meta"}}``."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("This is not a UI-format workflow (no 'nodes' and 'links'); API-format prompts need no "
                            "conversion.")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = links_of(workflow)

    def resolve(link_id, seen=()):
        """The (node id, slot) or ('value', v) that really feeds ``link_id``; None if it comes from a muted node."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        link = links[link_id]
        origin = nodes.get(link.origin)
        if origin is None:
            raise WorkflowError(f"Link {link_id} comes from node {link.origin}, which is not in the workflow.")
        kind, mode = origin.get("type"), origin.get("mode", MODE_ALWAYS)
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, seen + (link_id,))
        if kind == "PrimitiveNode":
            vals = origin.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            for inp in origin.get("inputs") or []:
                if inp.get("type") == link.type and inp.get("link") is not None:
                    return resolve(inp["link"], seen + (link_id,))
            return None
        return (link.origin, link.origin_slot)

    prompt = {}
    for nid in sorted(nodes):
        node = nodes[nid]
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"{_title(node)}: node type '{kind}' is not installed in this ComfyUI; install the "
                                "pack that provides it.")
        values = node.get("widgets_values")
        by_name = values if isinstance(values, dict) else None
        values = list(values or []) if by_name is None else []
        linked = {inp["name"]: inp.get("link") for inp in node.get("inputs") or [] if "name" in inp}
        inputs, idx, uploads = {}, 0, len(upload_values(info))
        for name, spec, section in input_specs(info):
            if section != "required":  # the upload buttons' values stand between the required and optional widgets
                idx, uploads = idx + uploads, 0
            is_widget, extra = widget_slots(spec)
            value, has_value = None, False
            if is_widget:
                if by_name is not None and name in by_name:
                    value, has_value = by_name[name], True
                elif idx < len(values):
                    value, has_value = values[idx], True
                idx += 1 + extra
            if linked.get(name) is not None:
                src = resolve(linked[name])
                if src is not None:
                    inputs[name] = src[1] if src[0] == "value" else [str(src[0]), src[1]]
                    continue
            if has_value:
                inputs[name] = value
            elif section == "required":
                raise WorkflowError(f"{_title(node)}: required input '{name}' is not connected and has no value.")
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


def check_structure(workflow: dict, object_info: dict) -> list[str]:
    """Problems a saved workflow should never have: unknown types, dangling or mistyped links, widget counts that
    do not match the node's schema. Empty list = fine."""
    problems = []
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    for link in links_of(workflow).values():
        o, t = nodes.get(link.origin), nodes.get(link.target)
        if o is None or t is None:
            problems.append(f"link {link.id} joins missing nodes {link.origin} -> {link.target}")
            continue
        outs, ins = o.get("outputs") or [], t.get("inputs") or []
        if link.origin_slot >= len(outs) or link.id not in (outs[link.origin_slot].get("links") or []):
            problems.append(f"link {link.id} is not listed on output {link.origin_slot} of {_title(o)}")
        if link.target_slot >= len(ins) or ins[link.target_slot].get("link") != link.id:
            problems.append(f"link {link.id} is not the link of input {link.target_slot} of {_title(t)}")
        elif link.type != "*" and ins[link.target_slot].get("type") not in (link.type, "*") \
                and link.type not in str(ins[link.target_slot].get("type")).split(","):
            problems.append(f"link {link.id} carries {link.type} into input '{ins[link.target_slot].get('name')}' "
                            f"({ins[link.target_slot].get('type')}) of {_title(t)}")
    for nid, node in nodes.items():
        kind = node.get("type")
        if kind in FRONTEND_ONLY:
            continue
        info = object_info.get(kind)
        if info is None:
            problems.append(f"{_title(node)}: unknown node type '{kind}'")
            continue
        values = node.get("widgets_values")
        if isinstance(values, list) and len(values) != widget_value_count(info):
            problems.append(f"{_title(node)}: {len(values)} widget values, the schema has {widget_value_count(info)}")
        for slot, out in enumerate(node.get("outputs") or []):
            declared = info.get("output", [])
            if slot < len(declared) and out.get("type") not in (declared[slot], "*") and not isinstance(declared[slot],
                                                                                                        list):
                problems.append(f"{_title(node)}: output {slot} is {out.get('type')}, the schema says {declared[slot]}")
    for dep in workflow.get("models", []):
        if not {"name", "directory"} <= set(dep):
            problems.append(f"models entry {dep} needs 'name' and 'directory'")
    return problems


def input_names(info: dict) -> list[str]:
    """A node class's input names in /object_info order (required, then optional)."""
    return [name for name, _spec, _section in input_specs(info)]


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict | None = None) -> dict:
    """``--set NODE.INPUT=VALUE``: NODE is a node id, its title or a class type that occurs once; VALUE is JSON
    (numbers, true/false, quoted strings) or a bare string. With ``object_info``, INPUT must be one of the node
    class's inputs (a misspelt name would otherwise be ignored by ComfyUI without a word)."""
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"Override '{item}' must look like NODE.INPUT=VALUE (e.g. 3.seed=7 or "
                                "KSampler.steps=20).")
        key, raw = item.split("=", 1)
        node_ref, name = key.rsplit(".", 1)
        matches = [k for k, v in out.items() if node_ref in (k, v.get("_meta", {}).get("title"))]
        if not matches:
            matches = [k for k, v in out.items() if v["class_type"] == node_ref]
        if len(matches) != 1:
            which = f" ({', '.join(matches)})" if matches else ""
            raise WorkflowError(f"Override '{item}': '{node_ref}' matches {len(matches)} nodes{which}; use the node id "
                                "(`python -m dreamcache run WORKFLOW --list` shows ids, titles and inputs).")
        node = out[matches[0]]
        info = (object_info or {}).get(node["class_type"])
        if info is not None and name not in input_names(info):
            title = node.get("_meta", {}).get("title") or node["class_type"]
            label = f"{title}, {node['class_type']}" if title != node["class_type"] else title
            raise WorkflowError(f"Override '{item}': node {matches[0]} ({label}) has no input '{name}'; its inputs are "
                                f"{', '.join(input_names(info)) or 'none'}.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node["inputs"][name] = value
    return out


def describe_inputs(prompt: dict, object_info: dict) -> list[str]:
    """``run WORKFLOW --list``: per node its id, title and type, then each settable (widget) input with its
    current value; inputs fed by a link say where from."""
    lines = []
    for nid in sorted(prompt, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        node = prompt[nid]
        kind = node["class_type"]
        title = node.get("_meta", {}).get("title") or kind
        lines.append(f"{nid}  {title}  ({kind})" if title != kind else f"{nid}  {kind}")
        info = object_info.get(kind)
        if info is None:
            lines.append("    (not installed in this ComfyUI)")
            continue
        for name, spec, section in input_specs(info):
            if not widget_slots(spec)[0]:
                continue
            value = node["inputs"].get(name)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                shown = f"<- node {value[0]}"
            elif name not in node["inputs"]:
                shown = "(not set)" if section == "optional" else "(missing)"
            else:
                shown = json.dumps(value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
            choices = combo_options(spec)
            hint = f"   [{len(choices)} choices]" if len(choices) > 1 else ""
            lines.append(f"    {name} = {shown}{hint}")
    return lines
