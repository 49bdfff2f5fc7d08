"""The method registry: every number has a source, every trained method its own memory peaks,
and the modules that use a method's facts read them from its record (no second copy)."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from blora_pack import methods
from blora_pack.methods import sdxl
from devkit import PACK_ROOT

TRAINED = [m for m in methods.METHODS if m.recipe is not None]


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda m: m.key)
def test_every_number_of_a_method_says_where_it_comes_from(method):
    if method.recipe is not None:
        assert method.recipe.unsourced() == []
    assert [name for name in method.defaults if not method.sources.get(name)] == []


def test_an_unsourced_number_is_found():
    recipe = dataclasses.replace(sdxl.B_LORA.recipe, sources={k: v for k, v in sdxl.B_LORA.recipe.sources.items()
                                                              if k != "learning_rate"})
    assert recipe.unsourced() == ["learning_rate"]


@pytest.mark.parametrize("method", TRAINED, ids=lambda m: m.key)
def test_every_trained_method_has_its_own_memory_peaks(method):
    from blora_pack.training import memory
    assert set(method.memory_peak_gib) == set(memory.RESOLVED)
    others = [m for m in TRAINED if m is not method and m.layers != method.layers]
    assert all(dict(m.memory_peak_gib) != dict(method.memory_peak_gib) for m in others)


def test_keys_recipe_names_and_node_ids_are_unique_and_found():
    assert len(methods.BY_KEY) == len(methods.METHODS)
    names = [m.recipe.name for m in TRAINED]
    assert len(set(names)) == len(names)
    for method in TRAINED:
        assert methods.by_recipe_name(method.recipe.name) is method
        assert method in methods.trained_by(method.nodes[0])
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        methods.by_key("nope")


def test_the_pack_version_is_the_one_in_pyproject():
    from blora_pack.training.job import PACK_VERSION
    project = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]
    assert PACK_VERSION == project["version"]


def test_unziplora_and_klora_and_rechar_read_their_numbers_from_the_registry():
    from blora_pack.core import glyph, klora
    from blora_pack.training import unziplora
    config = unziplora.UnZipConfig()
    published = dict(sdxl.UNZIPLORA.recipe.settings)
    # the official threshold applies to fp16 gradients scaled by the initial loss scale
    assert config.cone_threshold == published.pop("cone_threshold") / unziplora.OFFICIAL_INITIAL_LOSS_SCALE
    for name, value in published.items():
        assert getattr(config, name) == value
    assert klora.KLoRASettings().alpha == sdxl.K_LORA.defaults["alpha"]
    assert klora.default_beta("s*", 2.0) == pytest.approx(sdxl.K_LORA.defaults["beta_s*"] * 2.0)
    assert (glyph.RECHAR_SIZE, glyph.CANNY_LOW, glyph.CANNY_HIGH) == tuple(
        sdxl.RECHAR.defaults[k] for k in ("glyph_size", "canny_low", "canny_high"))


def test_the_registry_names_exactly_the_nodes_the_pack_defines(host):
    nodes = host.pack("nodes")
    defined = [c.define_schema().node_id for c in nodes.node_classes()]
    assert defined == list(dict.fromkeys(n for m in methods.METHODS for n in m.nodes))
