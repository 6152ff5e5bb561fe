"""Every shipped workflow in ComfyUI's real frontend, in headless Chromium (runs where Chromium and ComfyUI exist).

Protects what a user sees when opening a shipped workflow in the frontend the test Python has installed: the one the
ComfyUI tree pins (1.27.10 for 0.3.64, 1.49.6 for 0.33.0), or the newest one CI pairs with the newest tree (1.58.1 on
0.33.0, named by DREAMCACHE_EXPECT_FRONTEND): with the frontend's schema validation on, every workflow (whatever
workflows/ holds) opens with 0 missing nodes, 0 dialogs, 0 error or warning toasts, 0 error overlays and 0 console
errors, every node drawn. Negative controls prove the checks can fail: an unknown node type is reported missing, a
`models` entry without a url raises the validation alert, and the console check sees a page error. On 1.58, a
workflow whose models are missing gets the Download button for every entry the frontend's allow-list admits. With
ComfyUI 0.33's search aliases, the node search box finds the nodes by the words artists use.

Behaviour that changed between frontends, and what each test expects where:
* missing nodes: 1.27 opens the "Some Nodes Are Missing" dialog; 1.49 and 1.58 show an error overlay card.
* toasts (the validation alert among them): PrimeVue's up to 1.49; 1.58's own (``[data-testid=toast]``), which
  the older check did not see; INSPECT_JS reads both.
* a placeholder file that the workflow asks the user to replace (the LoRA): 1.58 reports it in a warning card.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cdp import INSPECT_JS, VALIDATE_WORKFLOWS_JS, find_chromium  # noqa: E402

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
#: Placeholder files the shipped workflows name on purpose (a note says to pick your own): the frontend reports them
#: missing, as it should.
PLACEHOLDERS = {"your_sd21_lora.safetensors"}


@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    if find_chromium() is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set CHROMIUM)")
    from cdp import Browser
    from screenshot_workflows import open_comfy, prepare_base

    from dreamcache.apps.run.comfy_client import ComfyServer

    base = tmp_path_factory.mktemp("browser_base")
    workflows = [json.loads(p.read_text()) for p in WORKFLOWS]
    os.rmdir(base)
    os.makedirs(base)
    prepare_base(str(base), workflows)
    srv = ComfyServer(comfy, base_directory=str(base), cpu=True, log_path=str(base / "log.txt")).start()
    browser = Browser()
    try:
        open_comfy(browser, srv.client.url)
        assert browser.evaluate(VALIDATE_WORKFLOWS_JS) is True
        browser.pump(2)  # the start-up graph's own requests settle before the first workflow
        yield browser, base
    finally:
        browser.close()
        srv.stop()


def console_errors(browser, workflow: dict) -> list[str]:
    """The page's console errors while the workflow loaded, less one kind it did not cause: frontend 1.58 fetches
    the size of the models its start-up graph lacks from huggingface.co, which ComfyUI's Content-Security-Policy
    (connect-src 'self') refuses; such a refusal counts only for a URL of this workflow's own models list."""
    own = {m.get("url") for m in workflow.get("models") or [] if isinstance(m, dict)}

    def other_graphs(e: str) -> bool:
        url = re.search(r"https?://\S+?(?='|\s|$)", e)
        return ("Content Security Policy" in e and url is not None and not url.group(0).startswith("http://127.0.0.1")
                and url.group(0) not in own)

    return [e for e in browser.console_errors if not other_graphs(e)]


def _load(browser, workflow):
    from cdp import dismiss_dialogs, load_workflow_js

    dismiss_dialogs(browser)
    time.sleep(0.5)
    browser.clear_console()
    browser.evaluate(load_workflow_js(workflow))
    time.sleep(2)
    browser.pump(0.5)
    report = browser.evaluate(INSPECT_JS)
    report["console"] = console_errors(browser, workflow)
    return report


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_shipped_workflow_opens_cleanly(page, path):
    browser, _ = page
    wf = json.loads(path.read_text())
    report = _load(browser, wf)
    assert report["missing"] == [] and report["dialogs"] == [] and report["toasts"] == [], report
    assert report["console"] == [], report["console"]
    placeholders = [p for p in PLACEHOLDERS if any(p in json.dumps(n) for n in wf["nodes"])]
    for card in report["overlays"]:  # only a placeholder the workflow asks the user to replace may be reported
        assert placeholders and any(p in card for p in placeholders), report["overlays"]
    assert len(report["nodes"]) == len(wf["nodes"])
    assert all(n["widgets"] > 0 for n in report["nodes"] if n["type"].startswith("DreamCache")), report["nodes"]


def test_basic_workflow_draws_every_widget(page):
    browser, base = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    report = _load(browser, wf)
    assert report["overlays"] == [], report
    widgets = {n["type"]: n["widgets"] for n in report["nodes"]}
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
    # frontend 1.27: the "Some Nodes Are Missing" dialog; 1.49 and 1.58: an error overlay card naming the node
    shown = report["dialogs"] + report["toasts"] + report["overlays"]
    assert any("NoSuchNodeFromAnotherPack" in t or "Missing" in t for t in shown), report


def test_the_frontend_is_the_one_this_configuration_expects(page, comfy):
    """The page runs DREAMCACHE_EXPECT_FRONTEND when set (CI's newest-frontend configuration), else the
    comfyui-frontend-package version that the ComfyUI tree's requirements.txt pins."""
    browser, _ = page
    expected = os.environ.get("DREAMCACHE_EXPECT_FRONTEND")
    if not expected:
        pin = re.search(r"^comfyui-frontend-package==(\S+)", (comfy / "requirements.txt").read_text(), re.M)
        assert pin, "the ComfyUI tree pins no frontend package"
        expected = pin.group(1)
    assert browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == expected


def test_models_entry_without_url_raises_the_frontend_alert(page):
    """Negative control for the validation check (every frontend: 1.27, 1.49 and 1.58 require a url on each models
    entry and say so in an alert naming it)."""
    browser, _ = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    del wf["models"][0]["url"]
    report = _load(browser, wf)
    assert any("url" in t for t in report["toasts"]), report["toasts"]


def test_the_console_check_sees_a_page_error(page):
    """Negative control for the console check: an error the page logs while a workflow loads is reported."""
    browser, _ = page
    wf = json.loads((ROOT / "workflows" / "dreamcache_basic.json").read_text())
    browser.clear_console()
    browser.evaluate("(() => { console.error('dreamcache negative control'); return true; })()")
    browser.pump(0.3)
    assert any("dreamcache negative control" in e for e in console_errors(browser, wf))


#: The buttons frontend 1.58's Issues panel shows for each missing model of a workflow (read from its row).
MISSING_MODEL_BUTTONS_JS = """
((names) => names.map(name => {
  const leaf = [...document.querySelectorAll('body *')].find(e => e.children.length === 0 && e.offsetParent !== null
    && (e.innerText || '').trim() === name);
  let row = leaf;
  const label = b => (b.innerText || b.getAttribute('aria-label') || '').trim();
  // the row: the smallest ancestor holding the row's last button (locate the node)
  while (row && ![...row.querySelectorAll('button')].some(b => /^Locate node/.test(label(b)))) row = row.parentElement;
  return [name, row ? [...row.querySelectorAll('button')].map(label) : null];
}))(%s)
"""


def test_the_download_button_is_offered_where_the_frontend_allows_it(page):
    """Frontend 1.58: with the basic workflow's models missing, its Issues panel offers Download for every entry on
    huggingface.co (checkpoint, and SAM through its Hugging Face copy) and only Copy URL for the adapter, whose only
    source is a Google Drive folder (the allow-lists per frontend: tests/test_workflows.py, DOWNLOAD_RULES)."""
    browser, _ = page
    if tuple(int(x) for x in browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__").split(".")[:2]) < (1, 58):
        pytest.skip("the Issues panel with a Download button per model is frontend 1.58's; older frontends' rules "
                    "are checked in tests/test_workflows.py")
    text = (ROOT / "workflows" / "dreamcache_basic.json").read_text()
    names = [m["name"] for m in json.loads(text)["models"]]
    for name in names:  # names no file has, so the frontend reports them missing (with the same url host, suffix)
        text = text.replace(name, "missing_" + name)
    report = _load(browser, json.loads(text))
    assert report["missing"] == [] and any("issue" in card.lower() for card in report["overlays"]), report
    browser.evaluate("(() => { const b = [...document.querySelectorAll('button')].find(e => "
                     "/View details/i.test(e.innerText || '')); b && b.click(); return !!b; })()")
    time.sleep(2)
    rows = dict(browser.evaluate(MISSING_MODEL_BUTTONS_JS % json.dumps(["missing_" + n for n in names])))
    from cdp import dismiss_dialogs

    dismiss_dialogs(browser)
    for name in names:
        buttons = rows["missing_" + name]
        assert buttons is not None and buttons.count("Copy URL") == 1, (name, rows)  # one row, with its link
        assert ("Download" in buttons) == (name != "cross_attention-199999.pt"), (name, buttons)


def press(browser, key: str, code: int, modifiers: int = 0):
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key=key, code=key if len(key) > 1 else f"Key{key.upper()}",
                     windowsVirtualKeyCode=code, modifiers=modifiers)


def search_nodes(browser, words: str) -> list[str]:
    """What the frontend's node search box lists for ``words`` (typed as a user would: the box opened, any earlier
    query selected and replaced, then closed with Escape)."""
    browser.evaluate("(async () => { await app.extensionManager.command.execute('Workspace.SearchBox.Toggle'); "
                     "return true; })()")
    time.sleep(1)
    press(browser, "a", 65, modifiers=2)  # Ctrl+A
    browser.call("Input.insertText", text=words)
    time.sleep(1.5)
    found = browser.evaluate("(() => [...document.querySelectorAll('[role=option], li')].filter(e => "
                             "e.offsetParent !== null).map(e => e.innerText.replace(/\\s+/g, ' ').trim()))()")
    press(browser, "Escape", 27)
    time.sleep(0.5)
    return found


def test_artists_find_the_nodes_by_their_words(page):
    """With ComfyUI 0.33's search_aliases (frontends 1.49 and 1.58 search them with the node names), searching
    "personalize", "subject", "reference" or "IP adapter alternative" lists Apply DreamCache. On 0.3.64 (no aliases
    in /object_info) "IP adapter alternative" finds none of the pack's nodes: the aliases are what finds them."""
    browser, _ = page
    info = browser.evaluate("fetch('/object_info/DreamCacheApply').then(r => r.json())")["DreamCacheApply"]
    if not info.get("search_aliases"):
        assert not any(t.startswith("Apply DreamCache") for t in search_nodes(browser, "IP adapter alternative"))
        return
    for words in ("personalize", "subject", "reference", "IP adapter alternative"):
        found = search_nodes(browser, words)
        assert any(t.startswith("Apply DreamCache") for t in found), (words, found)
