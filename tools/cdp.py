"""A headless Chromium driven over the DevTools protocol, with nothing but the standard library and the pack's
small WebSocket client. Used by tools/screenshot_workflows.py and tests/test_browser.py.

Chromium starts with the flags this machine's network needs (no background networking, no sync, no first run)
and a throw-away profile; it only ever loads 127.0.0.1.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

from dreamcache.apps.run.comfy_client import WebSocket, free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and os.path.isfile(env):
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, binary: str | None = None, width: int = 1600, height: int = 1000):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise RuntimeError("Chromium not found (apt-get install chromium, or set CHROMIUM)")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="dreamcache-chromium-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--remote-allow-origins=*", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.3)
        path = pages[0]["webSocketDebuggerUrl"].split(str(self.port), 1)[1]
        self.ws = WebSocket(f"http://127.0.0.1:{self.port}", path, timeout=30)
        self._id = 0
        #: what the page's console shows as errors (console.error, uncaught exceptions, failed requests such as a
        #: 404), in order, since the last clear_console()
        self.console_errors: list[str] = []
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params):
        self._id += 1
        my = self._id
        self.ws.send_json({"id": my, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.ws.receive(timeout=1.0)
            if msg and msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if msg and "method" in msg:
                self._event(msg)
        raise TimeoutError(f"{method} got no answer in {timeout} s")

    def _event(self, msg: dict):
        method, params = msg["method"], msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.console_errors.append(f"{d.get('text', '')} {d.get('exception', {}).get('description', '')}".strip())
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.console_errors.append(f"{e.get('text', '')} {e.get('url', '')}".strip())

    def pump(self, seconds: float = 0.5):
        """Read the page's events for ``seconds`` (console errors are collected while commands run, too)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            if msg and "method" in msg:
                self._event(msg)

    def clear_console(self):
        self.pump(0.2)
        self.console_errors = []

    def evaluate(self, expression: str, timeout: float = 60):
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if r.get("exceptionDetails"):
            details = r["exceptionDetails"]
            raise RuntimeError(f"page error: {details.get('exception', {}).get('description') or details}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 120, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(expression, timeout=10):
                    return True
            except (RuntimeError, TimeoutError):
                pass
            time.sleep(interval)
        raise TimeoutError(f"page never satisfied: {expression}")

    def goto(self, url: str):
        self.call("Page.navigate", url=url)

    def screenshot(self, path: str):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: JavaScript run in ComfyUI's page after a workflow is loaded: what a user would see go wrong.
INSPECT_JS = """
(() => {
  const LG = window.LiteGraph || (window.comfyAPI && window.comfyAPI.litegraph && window.comfyAPI.litegraph.LiteGraph);
  const nodes = app.graph._nodes || app.graph.nodes;
  const missing = nodes.filter(n => !LG.registered_node_types[n.type]).map(n => n.type);
  const visible = sel => [...document.querySelectorAll(sel)].filter(d => d.offsetParent !== null)
    .map(d => d.innerText.slice(0, 300));
  const dialogs = visible('[role=dialog], .p-dialog, .comfy-modal');
  // PrimeVue toasts up to frontend 1.49; 1.58: <li data-testid=toast data-toast-kind=warning|error>
  const toasts = visible('.p-toast-message-error, .p-toast-message-warn, ' +
    '[data-testid=toast][data-toast-kind=error], [data-testid=toast][data-toast-kind=warning]');
  // frontend 1.3x+: missing nodes and models are reported in an error overlay card instead of a dialog
  const overlays = visible('[data-testid=error-overlay]');
  return {missing, dialogs, toasts, overlays, version: window.__COMFYUI_FRONTEND_VERSION__ || null,
          nodes: nodes.map(n => ({type: n.type, widgets: (n.widgets || []).length, mode: n.mode}))};
})()
"""


#: Turns on the frontend's schema validation of loaded workflows (on by default in frontend 1.27, off in 1.49), so
#: a workflow the schema rejects raises its alert on every frontend.
VALIDATE_WORKFLOWS_JS = """
(async () => {
  const s = app.extensionManager && app.extensionManager.setting;
  if (s && s.set) { await s.set('Comfy.Validation.Workflows', true); return s.get('Comfy.Validation.Workflows'); }
  await app.ui.settings.setSettingValueAsync('Comfy.Validation.Workflows', true);
  return app.ui.settings.getSettingValue('Comfy.Validation.Workflows');
})()
"""


def load_workflow_js(workflow: dict) -> str:
    return f"(async () => {{ await app.loadGraphData({json.dumps(workflow)}); return true; }})()"


def dismiss_dialogs(browser: Browser):
    """Close dialogs and toasts (start-up templates browser, what's new, earlier alerts) so the canvas is visible."""
    browser.evaluate("""(() => { document.querySelectorAll(
        '.p-dialog-close-button, [aria-label=Close], .p-toast-close-button').forEach(b => b.click());
                       document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); return true; })()""")
