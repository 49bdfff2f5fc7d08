"""Screenshots of every shipped workflow in the graph editor, for the README (docs/images/).

Uses the browser test's machinery: a real ComfyUI server on loopback with this pack, Debian's
headless Chromium driven by Playwright. Each picture is named by the workflow's short name
(``extra.blora.key``, the ``cli.py run`` name: ``docs/images/b-lora_train.png`` for
``workflows/B-LoRA - train on one image.json``) and kept small: a palette PNG (the editor's flat
colours survive 256 of them). Run after changing a workflow, with ``IPADAPTER_PACK_PATH`` naming
a copy of ComfyUI_IPAdapter_plus (the IP-Adapter variants show their nodes only with it):

    python -m tools.screenshot_workflows [splitflux_train ...]   # only those workflows
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

from devkit import PACK_ROOT as ROOT

IMAGES = ROOT / "docs" / "images"
SIZE = (2000, 1250)
"""The editor's viewport: wide enough for the largest workflow's text to stay readable."""
OPEN_ALONE = """async ([graph, title]) => {
  await window.app.loadGraphData(graph, true, true, title);
  const tabs = window.app.extensionManager.workflow;
  for (const open of [...tabs.openWorkflows]) if (open !== tabs.activeWorkflow) await tabs.closeWorkflow(open);
}"""
"""Open the workflow in a tab named by its title (as the template browser does) and close the
other tabs, which would otherwise pile up in the picture as "Unsaved Workflow (N)"."""


def pictures() -> dict[str, Path]:
    """The README's picture of each shipped workflow, by the workflow's file."""
    from blora_pack.command_line import workflow_format

    return {path: IMAGES / f"{key}.png" for key, path in workflow_format.shipped(ROOT / "workflows").items()}


def small_png(screenshot: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(screenshot)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    from devkit import browser as browser_harness, host, server as server_harness

    if host.COMFYUI_PATH is None:
        sys.exit(host.NO_HOST_REASON)
    IMAGES.mkdir(parents=True, exist_ok=True)
    ipadapter = server_harness.ipadapter_pack()
    if ipadapter is None:
        print("IPADAPTER_PACK_PATH names no copy of ComfyUI_IPAdapter_plus: the IP-Adapter variants' nodes "
              "will show as missing")
    only = set(sys.argv[1:])  # the workflows' command-line names (e.g. splitflux_train); none: every one
    wanted = {workflow: image for workflow, image in pictures().items() if not only or image.stem in only}
    with server_harness.comfy_server(host.COMFYUI_PATH, Path(tempfile.mkdtemp()),
                                     extra_packs=(ipadapter,) if ipadapter else ()) as url:
        with browser_harness.editor(url, *SIZE) as (page, _):
            page.evaluate("async () => { await window.app.extensionManager.setting.set("
                          "'LiteGraph.Canvas.MinFontSizeForLOD', 1); }")  # keep text at small zoom
            for workflow, image in sorted(wanted.items()):
                page.evaluate(OPEN_ALONE, [json.loads(workflow.read_text()), workflow.stem])
                for _ in range(3):  # close any dialog or menu left open
                    page.keyboard.press("Escape")
                page.evaluate(browser_harness.FRAME_GRAPH)
                time.sleep(1.0)
                image.write_bytes(small_png(page.screenshot()))
                print(f"wrote {image.relative_to(ROOT)} ({image.stat().st_size // 1024} KB): {workflow.name}")


if __name__ == "__main__":
    main()
