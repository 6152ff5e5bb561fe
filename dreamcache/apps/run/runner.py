"""``python -m dreamcache run WORKFLOW.json``: run a shipped or user workflow headless against a real ComfyUI.

Starts ComfyUI (``--comfyui PATH``, ``COMFYUI_PATH``, or the ComfyUI this pack is installed in) on 127.0.0.1 for
the run, or uses a running one (``--server http://127.0.0.1:8188``). UI-format workflows are converted through
the server's ``/object_info``; ``--set NODE.INPUT=VALUE`` overrides inputs (checked against the node's inputs);
``--list`` shows what can be set; images a LoadImage node needs are uploaded from the workflow's folder when the
server does not have them. Progress is printed; the images this prompt made are saved to ``--output`` (default: a
new temporary folder), next to ComfyUI's log when the runner started ComfyUI. Exit code 0 when every output node
ran, 1 when ComfyUI refused or failed any of them, 2 for a bad workflow or option.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
import urllib.parse

from ...core.errors import DreamCacheError
from . import workflow as wf
from .comfy_client import Client, ComfyServer, ServerError, describe_rejection


def _log(msg: str):
    print(msg, flush=True)


def prepare_prompt(client: Client, data: dict, workflow_dir: str | None, overrides: list[str],
                   object_info: dict | None = None, upload: bool = True) -> dict:
    object_info = object_info if object_info is not None else client.object_info()
    if wf.is_ui_workflow(data):
        prompt = wf.ui_to_api(data, object_info)
    elif wf.is_api_prompt(data):
        prompt = data
    else:
        raise wf.WorkflowError("This JSON is neither a UI-format workflow nor an API-format prompt.")
    prompt = wf.apply_overrides(prompt, overrides, object_info)
    if not upload:
        return prompt
    load_image = object_info.get("LoadImage", {}).get("input", {}).get("required", {}).get("image")
    available = set(wf.combo_options(load_image))
    for node in prompt.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            name = node["inputs"].get("image")
            if isinstance(name, str) and name not in available and workflow_dir:
                local = os.path.join(workflow_dir, name)
                if os.path.isfile(local):
                    node["inputs"]["image"] = client.upload_image(local)
                    _log(f"uploaded {name}")
    return prompt


def _progress_printer(prompt: dict):
    state = {"t": time.monotonic()}

    def on_event(msg):
        kind, data = msg.get("type"), msg.get("data", {})
        if kind == "executing" and data.get("node") is not None:
            node = prompt.get(str(data["node"]), {})
            _log(f"  running {data['node']} {node.get('_meta', {}).get('title', node.get('class_type', ''))}")
        elif kind == "progress":
            now = time.monotonic()
            if now - state["t"] > 1.0 or data.get("value") == data.get("max"):
                state["t"] = now
                _log(f"    step {data.get('value')}/{data.get('max')}")
        elif kind == "execution_cached" and data.get("nodes"):
            _log(f"  cached: {', '.join(map(str, data['nodes']))}")

    return on_event


def cached_nodes(entry: dict) -> set[str]:
    """Nodes whose results ComfyUI reused from an earlier prompt (their images are not this prompt's)."""
    out = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            out.update(map(str, data.get("nodes") or []))
    return out


def save_outputs(client: Client, entry: dict, out_dir: str) -> list[str]:
    """Save the images of the nodes that ran in this prompt. ComfyUI's history also lists the outputs of nodes
    it took from its cache (an earlier prompt's images): those are named, not saved."""
    os.makedirs(out_dir, exist_ok=True)
    paths, stale = [], cached_nodes(entry)
    for node_id, out in (entry.get("outputs") or {}).items():
        node_id = str(node_id)
        if node_id in stale:
            if out.get("images"):
                _log(f"  node {node_id}: cached from an earlier prompt, its images are not this run's (not saved)")
            continue
        for item in out.get("images", []):  # SaveImage ("output") and PreviewImage ("temp") results alike
            q = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
            data = client.get_bytes(f"/view?{q}")
            path = os.path.join(out_dir, f"{node_id}_{os.path.basename(item['filename'])}")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        for text in out.get("text", []):
            _log(f"  node {node_id}: {text}")
    return paths


PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def check_base_directory(base: str) -> None:
    """ComfyUI started with --base-directory loads custom nodes (this pack too) from BASE/custom_nodes only, and
    exits with a traceback when that folder is missing: say so before starting it."""
    nodes_dir = os.path.join(base, "custom_nodes")
    if not os.path.isdir(nodes_dir):
        raise DreamCacheError(f"--base-directory {base} has no custom_nodes folder; ComfyUI then loads no custom nodes "
                              f"(not this pack either): create it and link this pack into it "
                              f"(ln -s {PACK_ROOT} {nodes_dir}/), or leave --base-directory out.")
    here = os.path.realpath(PACK_ROOT)
    if not any(os.path.realpath(os.path.join(nodes_dir, n)) == here for n in os.listdir(nodes_dir)):
        raise DreamCacheError(f"{nodes_dir} does not hold this pack, so ComfyUI would not know its nodes: link it "
                              f"there (ln -s {PACK_ROOT} {nodes_dir}/), or leave --base-directory out.")


def run_workflow(path: str, overrides: list[str] | None = None, comfyui: str | None = None, server: str | None = None,
                 output: str | None = None, timeout: float = 3600, cpu: bool | None = None,
                 base_directory: str | None = None, list_inputs: bool = False) -> list[str]:
    data = wf.load(path)
    workflow_dir = os.path.dirname(os.path.abspath(path))
    started = None
    log, log_note = None, ""
    try:
        if server:
            client = Client(server)
        else:
            from ...comfy.env import find_comfyui

            root = find_comfyui(comfyui)
            if root is None:
                raise DreamCacheError("ComfyUI was not found; pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or "
                                      "--server URL.")
            if importlib.util.find_spec("torch") is None:
                raise DreamCacheError(f"Starting ComfyUI needs ComfyUI's Python, and {sys.executable} has no torch: "
                                      "run this command with ComfyUI's Python, or pass --server URL of a running "
                                      "ComfyUI.")
            if base_directory:
                check_base_directory(base_directory)
            if list_inputs:
                log = os.path.join(tempfile.gettempdir(), f"dreamcache-list-{os.getpid()}.log")
            else:
                output = output or tempfile.mkdtemp(prefix="dreamcache-run-")
                os.makedirs(output, exist_ok=True)
                log = os.path.join(output, "comfyui.log")
            log_note = f" (ComfyUI's log: {log})"
            _log(f"starting ComfyUI from {root} (log: {log}) ...")
            started = ComfyServer(root, base_directory=base_directory, cpu=cpu, log_path=log).start()
            client = started.client
            _log(f"ComfyUI is up at {client.url}")
        if list_inputs:
            info = client.object_info()
            prompt = prepare_prompt(client, data, workflow_dir, overrides or [], info, upload=False)
            print(f"{os.path.basename(path)}: {len(prompt)} nodes; set an input with --set NODE.INPUT=VALUE "
                  "(NODE: id, title or a class type that occurs once)")
            print("\n".join(wf.describe_inputs(prompt, info)))
            if started is not None:  # nothing went wrong: the temporary log is not worth keeping
                started.stop()
                started = None
                os.remove(log)
            return []
        output = output or tempfile.mkdtemp(prefix="dreamcache-run-")
        prompt = prepare_prompt(client, data, workflow_dir, overrides or [])
        try:
            prompt_id = client.queue(prompt)
        except ServerError as e:
            if not e.details.get("node_errors"):
                raise
            raise ServerError(describe_rejection(e.details, prompt) + "\nNothing was run.", e.details) from None
        _log(f"queued {os.path.basename(path)} as {prompt_id} ({len(prompt)} nodes); outputs go to {output}")
        t0 = time.monotonic()
        entry = client.wait(prompt_id, timeout=timeout, on_event=_progress_printer(prompt))
        paths = save_outputs(client, entry, output)
        _log(f"done in {time.monotonic() - t0:.1f} s; {len(paths)} output file(s):")
        for p in paths:
            _log(f"  {p}")
        return paths
    except ServerError as e:
        raise ServerError(f"{e}{log_note}", e.details) from None
    finally:
        if started is not None:
            started.stop()


def add_parser(sub):
    p = sub.add_parser("run", help="run a workflow headless against a real ComfyUI and save its outputs",
                       description="Run a workflow headless. Exit code 0 when every output node ran, 1 when ComfyUI "
                                   "refused or failed one, 2 for a bad workflow or option.")
    p.add_argument("workflow", help="workflow JSON (UI format as saved by ComfyUI, or API format)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id, title or unique class type (repeatable; see --list)")
    p.add_argument("--list", dest="list_inputs", action="store_true",
                   help="print each node's id, title, type and settable inputs with their values, and run nothing")
    p.add_argument("--comfyui", help="ComfyUI folder to start (default: COMFYUI_PATH or the ComfyUI this pack is in)")
    p.add_argument("--server", help="use a running ComfyUI instead, e.g. http://127.0.0.1:8188")
    p.add_argument("--output", help="folder for the output images and ComfyUI's log (default: a new temporary folder)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the prompt")
    p.add_argument("--cpu", action="store_true", default=None, help="start ComfyUI with --cpu")
    p.add_argument("--base-directory", help="start ComfyUI with this --base-directory (models, input, output)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        run_workflow(args.workflow, args.overrides, args.comfyui, args.server, args.output, args.timeout, args.cpu,
                     args.base_directory, list_inputs=args.list_inputs)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
