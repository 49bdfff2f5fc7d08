"""Screenshots of every shipped workflow in the graph editor, for the README (docs/images/).

Uses the browser test's machinery: a real ComfyUI server on loopback with this pack, Debian's
headless Chromium driven by Playwright. Run after changing a workflow:

    python -m tools.screenshot_workflows
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from devkit import PACK_ROOT as ROOT


def main() -> None:
    from devkit import browser as browser_harness, host, server as server_harness

    if host.COMFYUI_PATH is None:
        sys.exit(host.NO_HOST_REASON)
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    ipadapter = server_harness.ipadapter_pack()  # the _ipadapter variants show their nodes only with it
    with server_harness.comfy_server(host.COMFYUI_PATH, Path(tempfile.mkdtemp()),
                                     extra_packs=(ipadapter,) if ipadapter else ()) as url:
        with browser_harness.editor(url, 2200, 1400) as (page, _):
            page.evaluate("async () => { await window.app.extensionManager.setting.set("
                          "'LiteGraph.Canvas.MinFontSizeForLOD', 1); }")  # keep text at small zoom
            for workflow in sorted((ROOT / "workflows").glob("*.json")):
                browser_harness.load_workflow(page, json.loads(workflow.read_text()))
                page.evaluate(browser_harness.FRAME_GRAPH)
                time.sleep(1.0)
                page.screenshot(path=str(images / f"{workflow.stem}.png"))
                print("wrote", images / f"{workflow.stem}.png")


if __name__ == "__main__":
    main()
