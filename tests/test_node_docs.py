"""The nodes' help pages and translations: generated from the schemas and the method registry
(``tools/node_docs.py``), complete in every language, served where the editor reads them."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from devkit import PACK_ROOT, server as server_harness
from devkit.host import COMFYUI_PATH

from tools import node_docs

LANGUAGES = ("en", *node_docs.LANGUAGES)


@pytest.fixture(scope="module")
def schemas(host):
    return node_docs.schemas(host)


def test_help_pages_and_english_names_are_what_the_schemas_and_registry_say(schemas):
    expected = node_docs.generated(schemas)
    for path, content in expected.items():
        assert path.is_file(), f"{path.relative_to(PACK_ROOT)} is missing: run python -m tools.node_docs"
        if isinstance(content, str):
            assert path.read_text() == content, f"{path.relative_to(PACK_ROOT)} is stale: run python -m tools.node_docs"
        else:
            assert path.read_bytes() == content.read_bytes(), f"{path.relative_to(PACK_ROOT)} is stale"
    shipped = {p for p in node_docs.DOCS.rglob("*") if p.is_file()}
    assert shipped == {p for p in expected if node_docs.DOCS in p.parents}, "files in js/docs that no help uses"
    assert not list(node_docs.DOCS.rglob("*.js")), "the host would load a .js under the web folder as an extension"


def test_every_help_page_names_its_paper_every_input_with_its_default_and_where_it_comes_from(schemas):
    from blora_pack import methods

    for schema in schemas:
        page = (node_docs.DOCS / f"{schema.node_id}.md").read_text()
        for method in (m for m in methods.METHODS if schema.node_id in m.nodes):
            assert method.paper in page
        rows = {row.split("|")[1].strip().split()[0].strip("`"): row for row in page.splitlines()
                if row.startswith("| `")}
        assert set(rows) == {i.id for i in schema.inputs}
        assert "## Errors and what to do" in page
    unzip = (node_docs.DOCS / "UnZipLoRATrain.md").read_text()
    row = next(r for r in unzip.splitlines() if r.startswith("| `content_learning_rate`"))
    assert methods.by_key("unziplora").recipe.sources["learning_rate"] in row
    splitflux = (node_docs.DOCS / "SplitFluxTrain.md").read_text()
    for input_id, key in (("learning_rate", "learning_rate"), ("prompt", "content_prompt")):
        row = next(r for r in splitflux.splitlines() if r.startswith(f"| `{input_id}`"))
        assert methods.by_key("splitflux").recipe.sources[key] in row


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_node_input_and_output_has_a_name_and_tooltip(schemas, lang):
    defs = json.loads((node_docs.LOCALES / lang / "nodeDefs.json").read_text())
    assert set(defs) == {s.node_id for s in schemas}, f"{lang}: nodes without an entry, or entries of no node"
    for schema in schemas:
        entry = defs[schema.node_id]
        assert entry["display_name"] and entry["description"], f"{lang} {schema.node_id}"
        assert set(entry["inputs"]) == {i.id for i in schema.inputs}, f"{lang} {schema.node_id}: inputs"
        for input_id, text in entry["inputs"].items():
            assert text.get("name") and text.get("tooltip"), f"{lang} {schema.node_id}.{input_id} has no name or tooltip"
        assert set(entry["outputs"]) == {str(n) for n in range(len(schema.outputs))}, f"{lang} {schema.node_id}"
        for text in entry["outputs"].values():
            assert text.get("name") and text.get("tooltip"), f"{lang} {schema.node_id}: an output"
    headings = json.loads((node_docs.LOCALES / lang / "main.json").read_text())["bloraHelp"]
    assert set(headings) == set(json.loads((node_docs.LOCALES / "en" / "main.json").read_text())["bloraHelp"])


@pytest.mark.parametrize("lang", LANGUAGES)
def test_translations_are_valid_frontend_messages(lang):
    """vue-i18n reads { } @ | $ as message syntax: each must be written as {'x'}."""
    for name in ("nodeDefs.json", "main.json"):
        text = json.dumps(json.loads((node_docs.LOCALES / lang / name).read_text()), ensure_ascii=False)
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
        for string in strings:
            bare = re.sub(r"\{'[{}@|$]'\}", "", string)
            assert not set(bare) & set(node_docs.I18N_SPECIAL), f"{lang}/{name}: {string!r}"


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    with server_harness.comfy_server(COMFYUI_PATH, tmp_path_factory.mktemp("docs")) as url:
        yield url


def test_every_node_is_found_by_the_packs_name_where_the_host_has_search_aliases(server, schemas):
    """The frontend's node search (1.49.6 and 1.58.1) matches ids, display names and
    ``search_aliases``; 0.3.64's schema has no aliases and loads the nodes without them."""
    import dataclasses

    from blora_pack import methods
    from comfy_api.latest import io

    info = server_harness.get_json(server, "/object_info")
    has_aliases = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    for schema in schemas:
        aliases = info[schema.node_id].get("search_aliases") or []
        if has_aliases:
            assert "B-LoRA" in aliases and "style transfer" in aliases, schema.node_id
            assert {m.title for m in methods.METHODS if schema.node_id in m.nodes} <= set(aliases)
        else:
            assert aliases == [], schema.node_id
        assert not info[schema.node_id].get("essentials_category"), "keeps the node in the library's Extensions"


def test_the_host_serves_the_translations_and_help_pages(server):
    url = server
    served = server_harness.get_json(url, "/i18n")
    for lang in LANGUAGES:
        assert served[lang]["nodeDefs"]["BLoRATrain"]["inputs"]["steps"]["name"]
    assert served["zh"]["nodeDefs"]["BLoRATrain"]["display_name"] == "训练 B-LoRA"
    folder = server_harness.PACK_FOLDER_NAME
    for path in (f"/extensions/{folder}/docs/BLoRATrain.md", f"/extensions/{folder}/docs/BLoRATrain/zh.md",
                 f"/extensions/{folder}/docs/images/b-lora_train.jpg"):
        with urllib.request.urlopen(url + path) as response:
            assert response.status == 200 and response.read()
