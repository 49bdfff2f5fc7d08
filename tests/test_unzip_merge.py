"""UnZip Column Mask Merge on the real host: the merge formula on the patched weights, official
artifacts as they are, pack-trained files with their mergers, cross-image use, bad files."""

from __future__ import annotations

import base64
import pickle

import pytest
import torch
from safetensors.torch import save_file

import lora_namings
from devkit import tiny_models

MERGE = "UnZipColumnMaskMerge"


def official_run(folder, name, unet_weights, seed):
    """What the official train_unziplora.py writes for one image: ``<name>_content`` and
    ``<name>_style`` folders (unet.unet. keys, binary masks baked into B, no alpha) and the two
    ``<name>_merger_*.pth`` files (unet. keys, vectors in [0, 1])."""
    shapes = lora_namings.b_lora_shapes(unet_weights, blocks=None)
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for role in ("content", "style"):
        layers = lora_namings.random_layers(shapes, rank=4, seed=seed + len(role))
        masked = {}
        for path, (down, up, alpha) in layers.items():
            mask = (torch.rand(up.shape[0], generator=generator) < 0.3).float()
            masked[path] = (down, up * mask[:, None], alpha)
        (folder / f"{name}_{role}").mkdir()
        save_file(lora_namings.write_naming(masked, "official_double_unet"),
                  str(folder / f"{name}_{role}" / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
        mergers = {p: torch.rand(up.shape[0], generator=generator) for p, (_, up, _) in masked.items()}
        torch.save({f"unet.{lora_namings.diffusers_name(p)}.lora.merge_{role}": m for p, m in mergers.items()},
                   str(folder / f"{name}_merger_{role}.pth"))
        written[role] = (masked, mergers)
    return written


def expected_weights(before, parts):
    """W0 + sum of strength * diag(m) * up @ down over ``parts`` = [(layers, mergers or None, strength)]."""
    expected = {k: v.double() for k, v in before.items()}
    for layers, mergers, strength in parts:
        for path, (down, up, alpha) in layers.items():
            m = mergers[path].double() if mergers else torch.ones(up.shape[0], dtype=torch.float64)
            expected[path + ".weight"] += strength * m[:, None] * lora_namings.expected_delta(down, up, alpha)
    return expected


def assert_weights(actual, expected):
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_official_artifacts_merge_exactly(host, tiny_sdxl, loras_dir):
    before = tiny_models.unet_weights(tiny_sdxl)
    run = official_run(loras_dir, "sketch_cat", before, seed=1)
    output = host.run_node(MERGE, tiny_sdxl, "sketch_cat_content/pytorch_lora_weights.safetensors",
                           "sketch_cat_style/pytorch_lora_weights.safetensors", 0.9, 1.2,
                           "sketch_cat_merger_content.pth", "sketch_cat_merger_style.pth").result[0]
    weights = tiny_models.patched_unet_weights(output)
    assert_weights(weights, expected_weights(before, [(run["content"][0], run["content"][1], 0.9),
                                                      (run["style"][0], run["style"][1], 1.2)]))
    assert all(torch.equal(v, before[k]) for k, v in tiny_models.unet_weights(tiny_sdxl).items())


def test_without_mergers_it_is_a_plain_sum(host, tiny_sdxl, loras_dir):
    before = tiny_models.unet_weights(tiny_sdxl)
    run = official_run(loras_dir, "rose", before, seed=2)
    output = host.run_node(MERGE, tiny_sdxl, "rose_content/pytorch_lora_weights.safetensors",
                           "rose_style/pytorch_lora_weights.safetensors", 1.0, 1.0, "none", "none").result[0]
    assert_weights(tiny_models.patched_unet_weights(output),
                   expected_weights(before, [(run["content"][0], None, 1.0), (run["style"][0], None, 1.0)]))


def test_cross_image_recombination_keeps_each_loras_own_merger(host, tiny_sdxl, loras_dir):
    before = tiny_models.unet_weights(tiny_sdxl)
    a = official_run(loras_dir, "image_a", before, seed=3)
    b = official_run(loras_dir, "image_b", before, seed=4)
    output = host.run_node(MERGE, tiny_sdxl, "image_a_content/pytorch_lora_weights.safetensors",
                           "image_b_style/pytorch_lora_weights.safetensors", 1.0, 1.0,
                           "image_a_merger_content.pth", "image_b_merger_style.pth").result[0]
    assert_weights(tiny_models.patched_unet_weights(output),
                   expected_weights(before, [(a["content"][0], a["content"][1], 1.0), (b["style"][0], b["style"][1], 1.0)]))


def test_mergers_inside_a_pack_file_are_used(host, tiny_sdxl, loras_dir):
    column_masks = host.pack("core.column_masks")
    lora_format = host.pack("core.lora_format")
    before = tiny_models.unet_weights(tiny_sdxl)
    run = official_run(loras_dir, "packed", before, seed=5)
    for role in ("content", "style"):
        layers, mergers = run[role]
        weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, "official"))
        metadata = {column_masks.MERGERS_METADATA_KEY: column_masks.mergers_to_metadata(mergers)}
        save_file(lora_format.to_kohya_state_dict(weights), str(loras_dir / f"packed_{role}.safetensors"), metadata)
    output = host.run_node(MERGE, tiny_sdxl, "packed_content.safetensors", "packed_style.safetensors", 1.0, 0.5).result[0]
    assert_weights(tiny_models.patched_unet_weights(output),
                   expected_weights(before, [(run["content"][0], run["content"][1], 1.0),
                                             (run["style"][0], run["style"][1], 0.5)]))


@pytest.mark.parametrize("damage, cause", [
    (lambda column_masks, mergers: "not base64 at all!", "are damaged: not base64 text ("),
    (lambda column_masks, mergers: base64.b64encode(b"12345678 no safetensors header").decode(),
     "are damaged: not safetensors data (SafetensorError: "),
    (lambda column_masks, mergers: column_masks.mergers_to_metadata({p: torch.stack([m, m], 1) for p, m in mergers.items()}),
     ", 2); a merger is one vector per layer."),
])
def test_damaged_mergers_inside_a_pack_file_are_refused_naming_the_file(host, tiny_sdxl, loras_dir, damage, cause):
    column_masks = host.pack("core.column_masks")
    lora_format = host.pack("core.lora_format")
    run = official_run(loras_dir, "damaged", tiny_models.unet_weights(tiny_sdxl), seed=5)
    layers, mergers = run["style"]
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, "official"))
    save_file(lora_format.to_kohya_state_dict(weights), str(loras_dir / "damaged_style.safetensors"),
              {column_masks.MERGERS_METADATA_KEY: damage(column_masks, mergers)})
    with pytest.raises(ValueError) as refused:
        host.run_node(MERGE, tiny_sdxl, "damaged_content/pytorch_lora_weights.safetensors",
                      "damaged_style.safetensors", 1.0, 1.0)
    message = str(refused.value)
    assert type(refused.value).__name__ == "LoraFormatError", message
    assert message.startswith("damaged_style.safetensors: the merger vectors in its metadata ('unziplora.mergers') are "
                              "damaged: "), message
    assert cause in message and "Train the pair again, or give its merger files" in message, message


def test_a_merger_file_with_objects_is_refused(host, tiny_sdxl, loras_dir):
    official_run(loras_dir, "evil", tiny_models.unet_weights(tiny_sdxl), seed=6)

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    with open(loras_dir / "evil_merger_content.pth", "wb") as handle:
        pickle.dump({"unet.x.lora.merge_content": Payload()}, handle, protocol=2)
    with pytest.raises(ValueError, match="read weights-only; anything else is refused"):
        host.run_node(MERGE, tiny_sdxl, "evil_content/pytorch_lora_weights.safetensors",
                      "evil_style/pytorch_lora_weights.safetensors", 1.0, 1.0, "evil_merger_content.pth", "none")


def test_a_merger_of_another_lora_is_refused(host, tiny_sdxl, loras_dir):
    before = tiny_models.unet_weights(tiny_sdxl)
    official_run(loras_dir, "one", before, seed=7)
    torch.save({"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.merge_content": torch.ones(64)},
               str(loras_dir / "short_merger_content.pth"))
    with pytest.raises(ValueError, match="has 64 values but the layer has 128 output features"):
        host.run_node(MERGE, tiny_sdxl, "one_content/pytorch_lora_weights.safetensors",
                      "one_style/pytorch_lora_weights.safetensors", 1.0, 1.0, "short_merger_content.pth", "none")


def test_untrained_masks_lower_the_overlap_of_two_ordinary_loras(host, tiny_sdxl, loras_dir):
    column_masks = host.pack("core.column_masks")
    lora_format = host.pack("core.lora_format")
    before = tiny_models.unet_weights(tiny_sdxl)
    shapes = lora_namings.b_lora_shapes(before)
    first = lora_namings.random_layers(shapes, rank=4, alpha=4.0, seed=8)
    second = lora_namings.random_layers(shapes, rank=4, alpha=4.0, seed=9)
    save_file(lora_namings.write_naming(first, "kohya_ldm"), str(loras_dir / "first.safetensors"))
    save_file(lora_namings.write_naming(second, "kohya_diffusers"), str(loras_dir / "second.safetensors"))
    plain_c = {p: lora_namings.expected_delta(*first[p]) for p in shapes}
    plain_s = {p: lora_namings.expected_delta(*second[p]) for p in shapes}
    plain = sum(column_masks.row_overlap(plain_c[p], plain_s[p]) for p in shapes) / len(shapes)

    masks_c, masks_s = column_masks.untrained_column_masks(
        lora_format.read_lora_file(loras_dir / "first.safetensors"), lora_format.read_lora_file(loras_dir / "second.safetensors"))
    masked = sum(column_masks.row_overlap(masks_c[p][:, None] * plain_c[p], masks_s[p][:, None] * plain_s[p])
                 for p in shapes) / len(shapes)
    assert masked < 0.8 * plain, f"overlap {plain:.3f} -> {masked:.3f}"

    output = host.run_node(MERGE, tiny_sdxl, "first.safetensors", "second.safetensors", 1.0, 1.0, "none", "none",
                           untrained_masks=True).result[0]
    weights = tiny_models.patched_unet_weights(output)
    for path in shapes:
        expected = before[path + ".weight"].double() + masks_c[path][:, None] * plain_c[path] + masks_s[path][:, None] * plain_s[path]
        torch.testing.assert_close(weights[path + ".weight"].double(), expected, rtol=1e-5, atol=1e-6)
