"""A real ComfyUI server on loopback with this pack and the tiny test fixtures, and a client.

The server runs ComfyUI's own ``main.py --cpu`` in a subprocess with a temporary folder as its
base directory: custom nodes come from its custom_nodes folder, holding links to this pack and to
the fixture nodes (devkit/fixture_nodes: tiny SDXL and tiny FLUX), never from the host's own
(where a user's install has this pack and others);
models, inputs, outputs, user files and the database are there too, and an extra_model_paths
file points the loras folder at a temporary one. Nothing is written into the host's folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from . import host as host_harness

FIXTURE_NODES = Path(__file__).resolve().parent / "fixture_nodes" / "tiny_sdxl_fixtures"
FLUX_FIXTURE_NODES = FIXTURE_NODES.parent / "tiny_flux_fixtures"
PACK_FOLDER_NAME = "blora_pack"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_processes: dict[str, subprocess.Popen] = {}
"""The running servers' processes by URL (``kill``)."""


@contextlib.contextmanager
def comfy_server(comfy_path: Path, workdir: Path, timeout: float = 120.0, extra_packs: tuple[Path, ...] = (),
                 frontend_root: Path | None = None):
    """Yields the server's base URL; the server and its folders live under ``workdir``.
    ``extra_packs``: other custom-node folders to load too (e.g. the IP-Adapter pack);
    ``frontend_root``: another frontend's static folder to serve (``--front-end-root``). A
    ``workdir`` an earlier server used is used again as it is: a restart finds its files."""
    custom_nodes = workdir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    links = [(PACK_FOLDER_NAME, host_harness.PACK_ROOT), (FIXTURE_NODES.name, FIXTURE_NODES),
             (FLUX_FIXTURE_NODES.name, FLUX_FIXTURE_NODES)]
    for name, pack in links + [(Path(pack).name, pack) for pack in extra_packs]:
        if not (custom_nodes / name).is_symlink():
            (custom_nodes / name).symlink_to(Path(pack).resolve(), target_is_directory=True)
    for folder in ("loras", "output", "input", "user", "temp"):
        (workdir / folder).mkdir(exist_ok=True)
    config = workdir / "extra_model_paths.yaml"
    config.write_text(f"blora_tests:\n  base_path: {workdir}\n  loras: loras\n  is_default: true\n")
    port = free_port()
    log = open(workdir / "server.log", "a")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--use-pytorch-cross-attention", "--disable-api-nodes", "--extra-model-paths-config", str(config),
         "--base-directory", str(workdir), "--database-url", f"sqlite:///{workdir / 'comfyui.db'}",
         "--output-directory", str(workdir / "output"), "--input-directory", str(workdir / "input"),
         "--user-directory", str(workdir / "user"), "--temp-directory", str(workdir / "temp"),
         *(["--front-end-root", str(frontend_root)] if frontend_root else [])],
        cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    _processes[url] = process
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{(workdir / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ComfyUI did not start in time:\n" + (workdir / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        _processes.pop(url, None)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def kill(url: str) -> None:
    """SIGKILL the server at ``url`` (as a crash or the OOM killer ends it: no handler runs)."""
    process = _processes[url]
    process.kill()
    process.wait(timeout=30)


def get_json(url: str, path: str):
    return json.loads(urllib.request.urlopen(url + path, timeout=30).read())


def run_prompt(url: str, prompt: dict, timeout: float = 300.0) -> tuple[dict, list[dict]]:
    """Queue an API-format prompt, collect every websocket message until it finishes; returns
    the history entry and the messages (JSON ones only)."""
    with client(url, timeout) as (ws, client_id):
        prompt_id = queue_prompt(url, prompt, client_id)
        messages = receive_until(ws, lambda message: is_end_of(message, prompt_id), timeout)
    return get_json(url, f"/history/{prompt_id}").get(prompt_id, {}), messages


@contextlib.contextmanager
def client(url: str, timeout: float = 300.0):
    """A websocket connected to the server as one client: ``(websocket, client id)``."""
    import websocket

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://{url.removeprefix('http://')}/ws?clientId={client_id}", timeout=timeout)
    try:
        yield ws, client_id
    finally:
        ws.close()


def queue_prompt(url: str, prompt: dict, client_id: str) -> str:
    """Put an API-format prompt in the server's queue; its prompt id."""
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    request = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        return json.loads(urllib.request.urlopen(request, timeout=30).read())["prompt_id"]
    except urllib.error.HTTPError as error:
        raise AssertionError(f"prompt refused: {error.read().decode()}") from error


def receive_until(ws, last, timeout: float = 300.0, texts: list | None = None) -> list[dict]:
    """The JSON messages the websocket receives, up to and including the first for which
    ``last(message)`` is true; ``texts`` gets the status lines shown on nodes meanwhile, as
    ``(node id, text)``."""
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = ws.recv()
        if not isinstance(frame, str):
            if texts is not None:
                texts.extend(node_text(frame))
            continue
        messages.append(json.loads(frame))
        if last(messages[-1]):
            return messages
    raise TimeoutError(f"no message ended the wait in {timeout} s (last: {messages[-1:]})")


def node_text(frame: bytes) -> list[tuple[str, str]]:
    """The ``(node id, text)`` a binary frame carries when it is a node's status line (the host's
    ``send_progress_text``: event type, node id length, node id, text); else nothing."""
    from protocol import BinaryEventTypes

    (event,) = struct.unpack(">I", frame[:4])
    if event != BinaryEventTypes.TEXT:
        return []
    (length,) = struct.unpack(">I", frame[4:8])
    return [(frame[8:8 + length].decode(), frame[8 + length:].decode())]


def is_end_of(message: dict, prompt_id: str) -> bool:
    """Whether ``message`` says the prompt finished: an error, Cancel, or the end of its run."""
    data = message.get("data", {})
    if data.get("prompt_id") != prompt_id:
        return False
    return message["type"] in ("execution_error", "execution_interrupted") or (
        message["type"] == "executing" and data.get("node") is None)


def post(url: str, path: str, data: object = None) -> None:
    request = urllib.request.Request(url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def ipadapter_pack() -> Path | None:
    """cubiq/ComfyUI_IPAdapter_plus, where $IPADAPTER_PACK_PATH names a copy of it."""
    path = os.environ.get("IPADAPTER_PACK_PATH")
    return Path(path) if path and (Path(path) / "IPAdapterPlus.py").is_file() else None


NEWEST_FRONTEND = "1.58.1"
NEWEST_FRONTEND_ROOT = os.environ.get("BLORA_NEWEST_FRONTEND_ROOT")
"""The static folder of comfyui-frontend-package 1.58.1, the newest frontend the browser test also
runs against on the primary host (``.ci/run``: ``pip install --no-deps --target``)."""
