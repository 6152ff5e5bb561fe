"""Opens every shipped workflow in ComfyUI's real frontend (headless Chromium) and saves its thumbnail
(workflows/<name>.jpg), failing if a node is missing or a dialog complains.

    COMFYUI_PATH=/path/to/ComfyUI python tools/screenshot_workflows.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from build_workflows import VIEW_SCALE, bounding_box  # noqa: E402
from cdp import INSPECT_JS, Browser, dismiss_dialogs, load_workflow_js  # noqa: E402
from PIL import Image  # noqa: E402

from dreamcache.apps.run.comfy_client import ComfyServer  # noqa: E402
from dreamcache.comfy.env import find_comfyui  # noqa: E402


def prepare_base(base: str, workflows: list[dict]):
    """A ComfyUI base directory with this pack, the example images, and empty placeholder files for the models the
    workflows name (so the frontend shows them as present; nothing is ever loaded)."""
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "ComfyUI-DreamCache"))
    os.makedirs(os.path.join(base, "input"))
    for img in (ROOT / "workflows").glob("*.png"):
        (Path(base) / "input" / img.name).write_bytes(img.read_bytes())
    for wf in workflows:
        for m in wf.get("models", []):
            folder = Path(base) / "models" / m["directory"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / m["name"]).touch()


def open_comfy(browser: Browser, url: str):
    browser.goto(url)
    browser.wait_for("!!(window.app && window.app.graph && (window.LiteGraph || window.comfyAPI))", timeout=180)
    time.sleep(2)
    dismiss_dialogs(browser)


def capture(browser: Browser, workflow: dict, png: str) -> dict:
    """Load the workflow with a viewport that holds the whole graph at the saved (readable) zoom, then shoot."""
    dismiss_dialogs(browser)
    x0, y0, x1, y1 = bounding_box(workflow["nodes"], workflow.get("groups", []))
    width = min(3200, int((x1 - x0 + 80) * VIEW_SCALE) + 100)
    height = min(2200, int((y1 - y0 + 80) * VIEW_SCALE) + 130)
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    browser.evaluate("(() => { window.dispatchEvent(new Event('resize')); return true; })()")
    time.sleep(0.5)
    browser.evaluate(load_workflow_js(workflow))
    time.sleep(1.5)
    report = browser.evaluate(INSPECT_JS)
    browser.screenshot(png)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui")
    ap.add_argument("--out", default=str(ROOT / "workflows"))
    args = ap.parse_args(argv)
    root = find_comfyui(args.comfyui)
    paths = sorted((ROOT / "workflows").glob("*.json"))
    workflows = [json.loads(p.read_text()) for p in paths]
    failures = []
    with tempfile.TemporaryDirectory() as base:
        prepare_base(base, workflows)
        server = ComfyServer(root, base_directory=base, cpu=True, log_path=os.path.join(base, "log.txt"))
        with server as srv, Browser() as browser:
            open_comfy(browser, srv.client.url)
            for path, wf in zip(paths, workflows):
                png = os.path.join(base, path.stem + ".png")
                report = capture(browser, wf, png)
                if report["missing"] or report["dialogs"] or report["toasts"]:
                    failures.append((path.stem, report["missing"], report["dialogs"], report["toasts"]))
                img = Image.open(png).convert("RGB")
                img.thumbnail((960, 960))
                img.save(os.path.join(args.out, path.stem + ".jpg"), quality=85, optimize=True)
                print(f"{path.stem}: {len(report['nodes'])} nodes, missing {report['missing']}, dialogs "
                      f"{report['dialogs']}, alerts {report['toasts']}")
    if failures:
        for f in failures:
            print("PROBLEM", f)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
