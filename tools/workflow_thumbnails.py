"""The template browser's picture of a shipped workflow: a diagram of its graph, drawn from the
workflow file itself (no model runs here, so it shows what the workflow does, not a result).

ComfyUI's frontend shows ``<workflow name>.jpg`` beside each of a pack's templates as a square
card. Each node is a box where the editor places it, titled as the editor titles it, the pack's
nodes in the pack's colour, links as lines; the workflow's title and one-line description on top.
Written by ``tools.build_workflows``; ``tests/test_workflow_templates.py`` redraws and compares.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

SIZE = 512
BANNER = 104
"""The title and description, at the bottom (the template browser's card covers the top left with a badge)."""
TOP = 48
PACK_COLOUR, CORE_COLOUR, NOTE_COLOUR = (86, 62, 140), (58, 64, 74), (100, 80, 50)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def draw(workflow: dict, title: str, description: str, pack_nodes: set[str], display_names: dict[str, str]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (30, 32, 36))
    canvas = ImageDraw.Draw(image)
    title_font, text_font, node_font = (ImageFont.load_default(size) for size in (24, 15, 11))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    scale = min((SIZE - 24) / (right - left), (SIZE - BANNER - TOP - 8) / (bottom - top))

    def box(node) -> tuple[float, float, float, float]:
        x, y = 12 + (node["pos"][0] - left) * scale, TOP + (node["pos"][1] - top) * scale
        return x, y, x + node["size"][0] * scale, y + node["size"][1] * scale

    for link in workflow["links"]:
        source, target = box(nodes[link[1]]), box(nodes[link[3]])
        canvas.line([(source[2], source[1] + 8), (target[0], target[1] + 8)], fill=(120, 160, 200), width=1)
    for node in nodes.values():
        x0, y0, x1, y1 = box(node)
        colour = NOTE_COLOUR if node["type"] == "Note" else PACK_COLOUR if node["type"] in pack_nodes else CORE_COLOUR
        canvas.rectangle([x0, y0, x1, y1], fill=colour, outline=(160, 160, 170))
        label = "Note" if node["type"] == "Note" else node.get("title") or display_names.get(node["type"]) or node["type"]
        for index, line in enumerate(_wrap(canvas, label, node_font, int(x1 - x0) - 4)[:2]):
            canvas.text((x0 + 3, y0 + 2 + 12 * index), line, font=node_font, fill=(235, 235, 235))
    canvas.rectangle([0, SIZE - BANNER, SIZE, SIZE], fill=(20, 20, 24))
    canvas.text((12, SIZE - BANNER + 8), title, font=title_font, fill=(255, 255, 255))
    for index, line in enumerate(_wrap(canvas, description, text_font, SIZE - 24)[:3]):
        canvas.text((12, SIZE - BANNER + 42 + 19 * index), line, font=text_font, fill=(200, 200, 210))
    return image
