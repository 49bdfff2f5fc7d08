"""Headless Chromium (Debian's package) on ComfyUI's editor, driven by Playwright."""

from __future__ import annotations

import contextlib
import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def editor(url: str, width: int = 1600, height: int = 1000):
    """Yields ``(page, problems)``: the editor loaded, and the console errors it logs as
    ``(source url, text)``. The user's first-run tour counts as done: the template browser the
    editor opens on a first run would cover the canvas whenever it came up."""
    from playwright.sync_api import sync_playwright

    from .server import post

    post(url, "/settings/Comfy.TutorialCompleted", True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems = []
            page.on("console", lambda m: m.type == "error" and problems.append((m.location.get("url", ""), m.text)))
            page.on("pageerror", lambda error: problems.append(("pageerror", str(error))))
            page.goto(url)
            wait_until_ready(page)
            yield page, problems
        finally:
            browser.close()


READY = ("() => window.app && window.app.graph && window.app.extensionManager"
         " && !document.getElementById('splash-loader')")
"""The editor is up and takes pointer input: the frontend (1.49 and later) removes its start-up
splash, which covers the canvas, once the app is set up; a click before then lands on the splash."""


def wait_until_ready(page) -> None:
    page.wait_for_function(READY, timeout=90_000)


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("async (graph) => { await window.app.loadGraphData(graph); }", workflow)
    for _ in range(3):  # close any dialog or menu left open
        page.keyboard.press("Escape")


def click_node_title(page, node_id) -> None:
    """Click the title bar of the node ``node_id`` on the canvas, as a user selects a node (the
    editor shows its selection toolbox only for a selection made with the pointer). The node is
    centred and drawn first: the canvas finds a node under the pointer by where it last drew it."""
    x, y = page.evaluate("""async (id) => {
        const node = window.app.graph.getNodeById(id), canvas = window.app.canvas;
        canvas.centerOnNode(node);
        canvas.setDirty(true, true);
        await new Promise((drawn) => requestAnimationFrame(() => requestAnimationFrame(drawn)));
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
        const box = canvas.canvas.getBoundingClientRect();
        return [box.left + x, box.top + y];
    }""", node_id)
    page.mouse.click(x, y)


FRAME_GRAPH = """() => {
  const canvas = window.app.canvas;
  let left = Infinity, top = Infinity, right = -Infinity, bottom = -Infinity;
  for (const node of window.app.graph._nodes) {
    left = Math.min(left, node.pos[0]); top = Math.min(top, node.pos[1] - 40);
    right = Math.max(right, node.pos[0] + node.size[0]); bottom = Math.max(bottom, node.pos[1] + node.size[1]);
  }
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.canvas.width / ratio, height = canvas.canvas.height / ratio;
  const scale = Math.min((width - 120) / (right - left), (height - 120) / (bottom - top), 1.2);
  canvas.ds.scale = scale;
  canvas.ds.offset = [(width / scale - (right - left)) / 2 - left, (height / scale - (bottom - top)) / 2 - top];
  canvas.setDirty(true, true);
}"""
"""Zoom and pan so the whole graph fills the canvas (the editor's fit view leaves wide margins)."""
