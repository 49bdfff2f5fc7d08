"""The front end in a real browser: headless Chromium (Debian's package, driven by Playwright)
against a real ComfyUI server on loopback with this pack and the tiny test model. A shipped
training workflow is loaded (loaders swapped for the tiny fixtures, steps scaled down) and
queued; the live loss chart must get one point per step, and this pack's script must log no
console error. The screenshot is kept in test-artifacts/. The editor's help for a pack node shows
the pack's page (js/docs), and with the editor in Chinese the pack's names and page are Chinese."""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from devkit import browser as browser_harness
from devkit import server as server_harness
from devkit.host import COMFYUI_PATH

ROOT = Path(__file__).resolve().parents[1]
from blora_pack.command_line import workflow_format  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"
STEPS = 4


def swap_loaders_ui(workflow: dict, object_info: dict) -> dict:
    """The UI-format workflow with the checkpoint and text encoder swapped for the tiny fixtures
    and the slow parts scaled down (what test_workflows does to the API format)."""
    scaled = {("BLoRATrain", "steps"): STEPS, ("KSampler", "steps"): 2, ("EmptyLatentImage", "width"): 64,
              ("EmptyLatentImage", "height"): 64, ("ImageScaleToTotalPixels", "megapixels"): 0.01}
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "TinySDXLCheckpointLoader", [0]
        elif node["type"] == "CLIPTextEncode":
            node["type"] = "TinyTextEncode"
        for (node_type, name), value in scaled.items():
            if node["type"] == node_type:
                node["widgets_values"][workflow_format.widget_index(node_type, name, object_info)] = value
    return workflow


FRONTEND = tuple(int(part) for part in importlib.metadata.version("comfyui-frontend-package").split(".")[:2])
NODES_2_FRONTEND = (1, 49)
"""The Vue node renderer ("Nodes 2.0", setting ``Comfy.VueNodes.Enabled``) as the frontend of
ComfyUI 0.33 (1.49.6) offers it. 0.3.64's frontend (1.27.10) has only an experimental preview of
it, in which this pack's chart does not show (README, "Front end"): not tested there."""
RENDERERS = {"litegraph": False, **({"nodes_2": True} if FRONTEND >= NODES_2_FRONTEND else {})}
"""The editor's default canvas renderer, and Nodes 2.0 where the frontend offers it."""
FRONTENDS = {"host": None, **({server_harness.NEWEST_FRONTEND: "newest"} if FRONTEND >= NODES_2_FRONTEND else {})}
"""The host's own frontend and, on the primary host (whose frontend is 1.49 or newer), the newest
frontend package (served with --front-end-root), each in every renderer."""
CASES = [(frontend, renderer) for frontend in FRONTENDS
         for renderer in (RENDERERS if frontend == "host" else ("litegraph", "nodes_2"))]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{r}" for f, r in CASES])
def browser_page(host, tmp_path_factory, request):
    frontend, renderer = request.param
    if browser_harness.CHROMIUM is None:
        pytest.skip("BROWSER TEST SKIPPED: no chromium on PATH (apt-get install chromium; .ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="BROWSER TEST SKIPPED: pip install playwright")
    root = None
    if frontend != "host":
        root = server_harness.NEWEST_FRONTEND_ROOT
        if not root or not Path(root, "index.html").is_file():
            pytest.skip(f"BROWSER TEST OF FRONTEND {frontend} SKIPPED: BLORA_NEWEST_FRONTEND_ROOT names no static "
                        f"folder of comfyui-frontend-package=={frontend} (.ci/run installs one)")
    workdir = tmp_path_factory.mktemp("browser")
    with server_harness.comfy_server(COMFYUI_PATH, workdir, frontend_root=Path(root) if root else None) as url:
        pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(workdir / "input" / "my_image.png")
        with browser_harness.editor(url) as (page, problems):
            if frontend != "host":
                served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
                assert served == frontend, f"the page runs frontend {served!r}"
            if renderer == "nodes_2":
                offered = page.evaluate("() => window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled') !== undefined")
                assert offered, "this frontend has no Vue node renderer setting"
                page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
            yield page, url, server_harness.get_json(url, "/object_info"), problems, f"{frontend}_{renderer}"


def test_live_loss_chart_fills_during_training(browser_page):
    page, url, object_info, problems, renderer = browser_page
    workflow = swap_loaders_ui(json.loads(workflow_format.shipped(ROOT / "workflows")["b-lora_train"].read_text()), object_info)
    browser_harness.load_workflow(page, workflow)
    train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "BLoRATrain")
    assert page.evaluate("(id) => document.body.contains(window.app.graph.getNodeById(id).bloraChart)", train_id)
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function(
        "([id, steps]) => { const n = window.app.graph.getNodeById(id);"
        " const run = n && n.properties && n.properties.blora_last_run;"
        " return run && run.losses.filter(Number.isFinite).length === steps; }",
        arg=[train_id, STEPS], timeout=180_000)
    run = page.evaluate("(id) => window.app.graph.getNodeById(id).properties.blora_last_run", train_id)
    assert run["step"] == STEPS and run["total"] == STEPS and run["done"]
    assert all(isinstance(v, (int, float)) and v > 0 for v in run["losses"])
    page.evaluate("(id) => { const c = window.app.canvas; c.centerOnNode(window.app.graph.getNodeById(id));"
                  " c.setDirty(true, true); }", train_id)
    time.sleep(1.0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser_training_{renderer}.png"))
    page.locator("canvas.blora-loss-chart").first.screenshot(path=str(ARTIFACTS / f"loss_chart_{renderer}.png"))
    ours = [p for p in problems if "blora" in p[0] or "blora" in p[1]]
    assert ours == [], ours

    page.reload()  # the editor restores the open workflow; the last run's chart comes with it
    browser_harness.wait_until_ready(page)
    page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id);"
                           " return n && n.bloraChart && n.properties.blora_last_run; }", arg=train_id, timeout=30_000)
    restored = page.evaluate("(id) => window.app.graph.getNodeById(id).properties.blora_last_run", train_id)
    assert restored["losses"] == run["losses"] and restored["done"]


def test_recipe_choice_fills_in_its_defaults(browser_page):
    page, _, _, problems, _ = browser_page
    values = page.evaluate("""async () => {
        const node = LiteGraph.createNode("BLoRATrain");
        window.app.graph.add(node);
        const recipe = node.widgets.find((w) => w.name === "recipe");
        recipe.value = "all attention layers (style LoRA)";
        await recipe.callback(recipe.value);
        const get = (name) => node.widgets.find((w) => w.name === name).value;
        return {rank: get("rank"), learning_rate: get("learning_rate")};
    }""")
    assert values == {"rank": 8, "learning_rate": 1e-5}
    assert not [p for p in problems if "blora" in p[0] or "blora" in p[1]]


def test_templates_show_the_packs_titles_and_pictures(browser_page):
    """The template browser lists the pack's workflows under its folder, by title, each with its
    picture (fetched from the pack's workflows/ folder)."""
    page, _, _, problems, _ = browser_page
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    title = "B-LoRA - train on one image"
    pictures = f"/workflow_templates/{server_harness.PACK_FOLDER_NAME}/"
    # Within the dialog: under Nodes 2.0 every node of the workflow an earlier test loaded wears a
    # badge with the pack's folder name too, behind the dialog.
    browser = page.get_by_role("dialog")
    # the first picture the browser asks for (which cards it draws first differs between frontends)
    with page.expect_response(lambda r: pictures in unquote(r.url) and unquote(r.url).endswith(".jpg"),
                              timeout=60_000) as fetched:
        browser.get_by_text(server_harness.PACK_FOLDER_NAME, exact=True).first.click(timeout=60_000)
    assert fetched.value.status == 200 and fetched.value.headers["content-type"] == "image/jpeg"
    browser.get_by_text(title, exact=True).first.wait_for(timeout=30_000)
    for _ in range(3):
        page.keyboard.press("Escape")
    assert not [p for p in problems if "blora" in p[0] or "blora" in p[1]]


HELP_NODE = "BLoRATrain"
"""The node whose help the editor is asked for (the pack ships its page in every language)."""


def help_page(locale: str | None = None) -> tuple[str, str, str, str]:
    """The pack's help page for ``HELP_NODE`` (English, or its ``locale`` translation) as the
    editor fetches it: ``(URL path, title, first paragraph, picture file name)``."""
    relative = f"{HELP_NODE}.md" if locale is None else f"{HELP_NODE}/{locale}.md"
    lines = [line for line in (ROOT / "js" / "docs" / relative).read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ") and not lines[1].startswith(("#", "!", "|", "**"))
    picture = re.search(r"!\[[^\]]*\]\(images/([^)]+)\)", "\n".join(lines)).group(1)
    return f"/extensions/{server_harness.PACK_FOLDER_NAME}/docs/{relative}", lines[0][2:], lines[1], picture


def open_node_help(page, node_type: str, doc_path: str):
    """Add a ``node_type`` node beside the graph, select it with the pointer and click the
    selection toolbox's Node Info button, as a user asks for a node's help (the frontend shows it
    in the node library sidebar on 1.27, in the properties panel's Info tab on 1.49 and later).
    Checks the page came from ``doc_path``; returns the node's id and the help's panel."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    node_id = page.evaluate("""(type) => {
        const graph = window.app.graph, node = LiteGraph.createNode(type);
        node.pos = [Math.max(0, ...graph._nodes.map((n) => n.pos[0] + n.size[0])) + 400, 0];
        graph.add(node);
        return node.id;
    }""", node_type)
    info_button = page.locator("[data-testid=info-button]")
    for attempt in range(3):  # on a loaded machine a click can land before the canvas has drawn the node
        browser_harness.click_node_title(page, node_id)
        try:
            info_button.wait_for(state="visible", timeout=15_000)
            break
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    with page.expect_response(lambda r: urlparse(r.url).path == doc_path, timeout=30_000) as fetched:
        info_button.click(timeout=30_000)
    assert fetched.value.status == 200, f"{doc_path}: {fetched.value.status}"
    return node_id, page.locator(".node-help-content")


def check_help_shows(page, panel, title: str, paragraph: str, picture: str) -> None:
    """The help panel shows the page's title, its first paragraph and its picture (loaded)."""
    panel.get_by_role("heading", name=title, exact=True).wait_for(timeout=30_000)
    panel.get_by_text(paragraph, exact=True).wait_for(timeout=30_000)
    image = panel.locator(f"img[src$='images/{picture}']")
    image.wait_for(state="attached", timeout=30_000)
    image.evaluate("(img) => img.complete ? null : new Promise((done) => { img.onload = img.onerror = done; })")
    assert image.evaluate("(img) => img.naturalWidth") > 0, f"the help's picture {picture} did not load"


def pack_problems(problems, locale_page: str) -> list:
    """The console errors that concern the pack, less the 404 of ``locale_page``: the frontend asks
    for a node's help in the editor's language first (``docs/<node>/<locale>.md``), then falls back
    to ``docs/<node>.md``; the pack ships no page named for English."""
    return [p for p in problems if ("blora" in p[0] or "blora" in p[1]) and not p[0].endswith(locale_page)]


def test_node_help_shows_the_packs_page(browser_page):
    """Node Info on one of the pack's nodes: the editor fetches the pack's help page from its web
    folder's docs/ and shows it, picture included."""
    page, _, _, problems, _ = browser_page
    doc_path, title, paragraph, picture = help_page()
    node_id, panel = open_node_help(page, HELP_NODE, doc_path)
    check_help_shows(page, panel, title, paragraph, picture)
    page.evaluate("(id) => window.app.graph.remove(window.app.graph.getNodeById(id))", node_id)
    assert pack_problems(problems, f"/docs/{HELP_NODE}/en.md") == []


def set_locale(page, locale: str) -> None:
    """The editor's language (setting Comfy.Locale), the page reloaded: the frontend names the
    node types it registers at start-up in the language it starts in."""
    page.evaluate("async (locale) => { await window.app.extensionManager.setting.set('Comfy.Locale', locale); }", locale)
    page.reload()
    browser_harness.wait_until_ready(page)


def test_chinese_editor_shows_the_packs_translations(browser_page):
    """With the editor in Chinese, the node library finds the pack's node by its Chinese name
    (locales/zh/nodeDefs.json), the node on the canvas bears it and its inputs' Chinese names, and
    Node Info shows the Chinese help page."""
    page, _, _, problems, _ = browser_page
    names = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text())[HELP_NODE]
    set_locale(page, "zh")
    try:
        library = page.locator(".side-bar-panel")
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
        library.locator("input").first.fill(names["display_name"])
        library.get_by_text(names["display_name"], exact=True).first.wait_for(timeout=30_000)
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")

        doc_path, title, paragraph, picture = help_page("zh")
        node_id, panel = open_node_help(page, HELP_NODE, doc_path)
        check_help_shows(page, panel, title, paragraph, picture)
        shown = page.evaluate("""(id) => { const node = window.app.graph.getNodeById(id);
            return {title: node.title, inputs: Object.fromEntries(node.inputs.map((i) => [i.name, i.localized_name]))}; }""",
                              node_id)
        assert shown["title"] == names["display_name"]
        assert shown["inputs"] == {name: names["inputs"][name]["name"] for name in shown["inputs"]}
        page.evaluate("(id) => window.app.graph.remove(window.app.graph.getNodeById(id))", node_id)
    finally:
        set_locale(page, "en")
    assert pack_problems(problems, f"/docs/{HELP_NODE}/en.md") == []
