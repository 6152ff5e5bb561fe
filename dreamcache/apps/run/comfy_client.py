"""Talk to a ComfyUI server over HTTP (stdlib only), or start one for the duration of a run.

Used by ``python -m dreamcache run`` and by the end-to-end tests. A started server listens on 127.0.0.1 only,
on a free port, with its own base directory if one is given.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ...core.errors import DreamCacheError


class ServerError(DreamCacheError):
    """The server is unreachable, refused a prompt, or a prompt failed."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


ServerError.__module__ = "dreamcache"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                 timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            raise ServerError(f"ComfyUI at {self.url} is not reachable ({getattr(e, 'reason', e)}).") from None

    def get_json(self, path: str, timeout: float = 60):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} answered HTTP {status}.")
        return json.loads(body)

    def get_bytes(self, path: str) -> bytes:
        status, body = self._request("GET", path)
        if status != 200:
            raise ServerError(f"GET {path} answered HTTP {status}.")
        return body

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=300)

    def queue(self, prompt: dict, extra: dict | None = None, partial: bool = False) -> str:
        """Queue a prompt and return its id. ComfyUI answers HTTP 200 even when it refused some output nodes
        (``node_errors``: "Output will be ignored") and runs the rest; unless ``partial``, such a prompt is taken
        off the queue again (or interrupted) and a ServerError names each refused node once."""
        payload = {"prompt": prompt, "client_id": self.client_id, **(extra or {})}
        status, body = self._request("POST", "/prompt", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            answer = {"error": {"message": body.decode(errors="replace")[:500]}}
        if status != 200:
            raise ServerError(describe_rejection(answer), answer)
        if answer.get("node_errors") and not partial:
            self.cancel(answer["prompt_id"])
            message = describe_rejection(answer) + "\nThe prompt was taken off the queue: nothing was run."
            raise ServerError(message, answer)
        return answer["prompt_id"]

    def cancel(self, prompt_id: str):
        """Take a queued prompt off the queue, or interrupt it if it is already running (only that prompt)."""
        body = json.dumps({"delete": [prompt_id]}).encode()
        self._request("POST", "/queue", body, {"Content-Type": "application/json"})
        body = json.dumps({"prompt_id": prompt_id}).encode()
        self._request("POST", "/interrupt", body, {"Content-Type": "application/json"})

    def upload_image(self, path: str, overwrite: bool = False) -> str:
        boundary = uuid.uuid4().hex
        name = os.path.basename(path)
        with open(path, "rb") as f:
            content = f.read()
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: "
            "application/octet-stream\r\n\r\n".encode() + content + b"\r\n",
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f"name=\"overwrite\"\r\n\r\n{'true' if overwrite else 'false'}\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        status, body = self._request("POST", "/upload/image", b"".join(parts),
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise ServerError(f"Uploading {name} failed with HTTP {status}.")
        return json.loads(body)["name"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def interrupt(self):
        self._request("POST", "/interrupt", b"")

    def wait(self, prompt_id: str, timeout: float = 3600, on_event=None) -> dict:
        """Block until the prompt finishes; ``on_event(msg)`` gets the server's progress messages. Returns the
        history entry; raises ServerError with the node's exception message if execution failed."""
        deadline = time.monotonic() + timeout
        ws = None
        try:
            ws = WebSocket(self.url, f"/ws?clientId={self.client_id}") if on_event else None
        except OSError:
            ws = None
        try:
            while time.monotonic() < deadline:
                if ws is not None:
                    msg = ws.receive(timeout=0.5)
                    if msg is not None and on_event is not None and msg.get("data", {}).get("prompt_id",
                                                                                            prompt_id) == prompt_id:
                        on_event(msg)
                else:
                    time.sleep(0.3)
                entry = self.history(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None:
                    status = entry["status"]
                    if status.get("status_str") == "error" or not status.get("completed"):
                        raise ServerError(describe_failure(entry), entry)
                    return entry
            raise ServerError(f"Prompt {prompt_id} did not finish within {timeout:.0f} s.")
        finally:
            if ws is not None:
                ws.close()


def node_error_lines(node_errors: dict, prompt: dict | None = None) -> list[str]:
    """One line per refused node, each distinct message once (ComfyUI repeats a failed ``validate_inputs`` under
    every input the function takes, and lists the same errors again in the top-level message)."""
    lines = []
    for nid, ne in (node_errors or {}).items():
        seen = []
        for e in ne.get("errors", []):
            details = str(e.get("details") or "")
            name = (e.get("extra_info") or {}).get("input_name")
            if e.get("type") == "custom_validation_failed" and name and details.startswith(f"{name} - "):
                text = details[len(name) + 3:]  # "<input> - <the node's own message>": the message alone
            else:
                text = e.get("message", "error") + (f": {details}" if details else "")
            if text not in seen:
                seen.append(text)
        title = ((prompt or {}).get(str(nid), {}).get("_meta") or {}).get("title")
        kind = ne.get("class_type") or ""
        label = f"{title}, {kind}" if title and title != kind else kind
        lines.append(f"node {nid} ({label}): " + "; ".join(seen))
    return lines


def describe_rejection(answer: dict, prompt: dict | None = None) -> str:
    err = answer.get("error") or {}
    node_lines = node_error_lines(answer.get("node_errors") or {}, prompt)
    if node_lines:  # the top-level details repeat the node errors: name each node once instead
        head = err.get("message") or "ComfyUI refused output node(s) " + ", ".join(
            sorted({o for ne in answer["node_errors"].values() for o in ne.get("dependent_outputs", [])}))
        return head + ":\n  " + "\n  ".join(node_lines)
    return err.get("message", "The prompt was rejected") + (f": {err['details']}" if err.get("details") else "")


def describe_failure(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return "The prompt was interrupted."
    return "The prompt failed."


class WebSocket:
    """Just enough of RFC 6455 for ComfyUI's progress messages and Chromium's DevTools protocol: JSON text frames
    both ways, pings answered. ``url`` is http(s)/ws base URL; ``path`` the resource (``/ws?clientId=...``)."""

    def __init__(self, url: str, path: str, timeout: float = 10):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1024)
            if not chunk:
                raise OSError("websocket handshake closed")
            head += chunk
        header, self.buf = head.split(b"\r\n\r\n", 1)
        digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        accept = base64.b64encode(digest).decode()
        if b" 101 " not in header.split(b"\r\n", 1)[0] or accept.encode() not in header:
            raise OSError("websocket handshake refused")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b""):
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        mixed = int.from_bytes(payload, "little") ^ int.from_bytes(mask * (n // 4 + 1), "little")
        masked = mixed.to_bytes(n + 4, "little")[:n] if n else b""
        self.sock.sendall(head + mask + masked)

    def send_json(self, obj):
        self._send(1, json.dumps(obj).encode())

    def receive(self, timeout: float = 1.0) -> dict | None:
        """The next JSON text message, or None if none arrived within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                b0, b1 = self._read(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 1:
                    return json.loads(payload)
                if opcode == 9:
                    self._send(10, payload)
                elif opcode == 8:
                    raise OSError("websocket closed by the server")
        except socket.timeout:
            return None

    def close(self):
        try:
            self._send(8)
        except OSError:
            pass
        self.sock.close()


class ComfyServer:
    """A ComfyUI server started for a run: ``with ComfyServer(comfyui_dir) as server: server.client.queue(...)``."""

    def __init__(self, comfyui: str | os.PathLike, base_directory: str | None = None, cpu: bool | None = None,
                 extra_args: list[str] | None = None, python: str | None = None, log_path: str | None = None,
                 startup_timeout: float = 600):
        self.comfyui = Path(comfyui)
        self.base_directory = base_directory
        self.cpu = cpu
        self.extra_args = list(extra_args or [])
        self.python = python or sys.executable
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc = None
        self.port = None
        self.client: Client | None = None

    def start(self):
        if not (self.comfyui / "main.py").is_file():
            raise ServerError(f"'{self.comfyui}' is not a ComfyUI folder (no main.py).")
        self.port = free_port()
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
        if self.cpu is None:
            try:
                import torch

                self.cpu = not torch.cuda.is_available()
            except ImportError:
                self.cpu = True
        if self.cpu:
            cmd.append("--cpu")
        if self.base_directory:
            cmd += ["--base-directory", str(self.base_directory)]
        cmd += self.extra_args
        if self.log_path is None:  # never the current folder
            folder = self.base_directory or tempfile.gettempdir()
            self.log_path = os.path.join(folder, f"comfyui-{self.port}.log")
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.client = Client(f"http://127.0.0.1:{self.port}")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited during start-up (code {self.proc.returncode}); its log "
                                  f"({self.log_path}) ends: {self.log_tail()}")
            try:
                self.client.get_json("/system_stats", timeout=5)
                return self
            except ServerError:
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not start within {self.startup_timeout:.0f} s; its log ({self.log_path}) ends: "
                          f"{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
