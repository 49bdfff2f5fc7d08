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
    ``(source url, text)``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems = []
            page.on("console", lambda m: m.type == "error" and problems.append((m.location.get("url", ""), m.text)))
            page.on("pageerror", lambda error: problems.append(("pageerror", str(error))))
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=90_000)
            yield page, problems
        finally:
            browser.close()


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("async (graph) => { await window.app.loadGraphData(graph); }", workflow)
    for _ in range(3):  # close the first-run template browser
        page.keyboard.press("Escape")


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
