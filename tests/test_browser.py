"""The basic workflow in ComfyUI's real frontend, in headless Chromium (runs where Chromium and ComfyUI exist).

Protects what a user sees when opening dreamcache_basic.json in the frontend the ComfyUI tree pins (1.27 for
0.3.64, 1.49 for 0.33): no missing-node dialog or error overlay, no alert (with the frontend's schema validation
on), every node drawn with its widgets. Two negative controls prove the checks can fail: an unknown node type is
reported missing, and a models entry without a url raises the frontend's alert.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cdp import INSPECT_JS, VALIDATE_WORKFLOWS_JS, find_chromium  # noqa: E402


@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    if find_chromium() is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set CHROMIUM)")
    from cdp import Browser
    from screenshot_workflows import open_comfy, prepare_base

    from dreamcache.apps.run.comfy_client import ComfyServer

    base = tmp_path_factory.mktemp("browser_base")
    workflows = [json.loads(p.read_text()) for p in (ROOT / "workflows").glob("*.json")]
    os.rmdir(base)
    os.makedirs(base)
    prepare_base(str(base), workflows)
    srv = ComfyServer(comfy, base_directory=str(base), cpu=True, log_path=str(base / "log.txt")).start()
    browser = Browser()
    try:
        open_comfy(browser, srv.client.url)
        assert browser.evaluate(VALIDATE_WORKFLOWS_JS) is True
        yield browser, base
    finally:
        browser.close()
        srv.stop()


def _load(browser, workflow):
    from cdp import dismiss_dialogs, load_workflow_js

    dismiss_dialogs(browser)
    time.sleep(0.5)
    browser.evaluate(load_workflow_js(workflow))
    time.sleep(2)
    return browser.evaluate(INSPECT_JS)


def test_basic_workflow_opens_cleanly(page):
    browser, base = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    report = _load(browser, wf)
    assert report["missing"] == [] and report["dialogs"] == [] and report["toasts"] == [], report
    assert report["overlays"] == [], report
    widgets = {n["type"]: n["widgets"] for n in report["nodes"]}
    assert len(report["nodes"]) == len(wf["nodes"])
    assert widgets["DreamCacheSubjectMask"] >= 14 and widgets["DreamCacheDualGuidanceSampler"] >= 9
    assert widgets["DreamCacheApply"] == 3 and widgets["DreamCacheLoader"] == 2
    assert widgets["DreamCacheBuildFeatureCache"] >= 4
    shot = browser.screenshot(str(base / "basic.png"))
    from PIL import Image, ImageStat

    img = Image.open(shot).convert("L")
    assert img.size[0] >= 800 and ImageStat.Stat(img).stddev[0] > 10  # a drawn graph, not a blank page


def test_unknown_node_type_is_reported(page):
    browser, _ = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    wf["nodes"][0]["type"] = "NoSuchNodeFromAnotherPack"
    report = _load(browser, wf)
    assert "NoSuchNodeFromAnotherPack" in report["missing"]
    # frontend 1.27: the "Some Nodes Are Missing" dialog; 1.49: an error overlay card naming the node
    shown = report["dialogs"] + report["toasts"] + report["overlays"]
    assert any("NoSuchNodeFromAnotherPack" in t or "Missing" in t for t in shown), report


def test_the_frontend_is_the_one_this_comfyui_pins(page, comfy):
    """The page runs the comfyui-frontend-package version that the ComfyUI tree's requirements.txt pins."""
    import re

    browser, _ = page
    pin = re.search(r"^comfyui-frontend-package==(\S+)", (comfy / "requirements.txt").read_text(), re.M)
    assert pin, "the ComfyUI tree pins no frontend package"
    assert browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == pin.group(1)


def test_models_entry_without_url_raises_the_frontend_alert(page):
    browser, _ = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    del wf["models"][0]["url"]
    report = _load(browser, wf)
    assert any("url" in t for t in report["toasts"]), report["toasts"]
