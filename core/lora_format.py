"""LoRA files of every naming in the wild, read into one canonical form.

Canonical form: a :class:`LoraWeights` maps ldm module paths of the SDXL UNet
(``output_blocks.0.1.transformer_blocks.0.attn1.to_q``) to a ``lora_layer.LoraLayer`` holding the
file's two factors in PEFT's terms, ``down`` = A (rank x in) and ``up`` = B (out x rank), and the
alpha, if the file stored one, as its one (default) adapter.

Each key is parsed on its own (a prefix naming a module, a suffix naming a factor), so a file
mixing namings still reads, and no format is guessed from the first key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import sdxl_unet
from .lora_layer import LoraLayer

FACTOR_SUFFIXES = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".alpha", "alpha"),
)
"""(key suffix, role) for every LoRA naming the reader understands."""

UNSUPPORTED_SUFFIXES = {
    ".lora_mid.weight": "a LoCon Tucker middle factor",
    ".dora_scale": "a DoRA magnitude",
    ".hada_w1_a": "a LoHa factor",
    ".lokr_w1": "a LoKr factor",
    ".diff": "a full weight difference",
    ".diff_b": "a bias difference",
}

MODULE_PREFIXES_TO_STRIP = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
KOHYA_UNET_PREFIXES = ("lora_unet_", "lycoris_")
TEXT_ENCODER_PREFIXES = (
    "lora_te", "text_encoder", "te1.", "te2.", "te.", "clip_l.", "clip_g.", "lycoris_te",
)

KNOWN_NAMINGS = (
    "official B-LoRA / diffusers: unet.up_blocks.0.attentions.0....to_q.lora.down.weight",
    "PEFT: [unet.]up_blocks....to_q.lora_A[.default].weight",
    "kohya: lora_unet_up_blocks_0_attentions_0_..._to_q.lora_down.weight (+ .alpha)",
    "kohya ldm: lora_unet_output_blocks_0_1_..._to_q.lora_down.weight (+ .alpha)",
    "ComfyUI: diffusion_model.output_blocks.0.1....to_q.lora_up.weight (+ .alpha)",
)

SAFE_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class LoraFormatError(ValueError):
    """A file that is not a LoRA this pack can read; the message says what was found."""


@dataclass
class LoraWeights:
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)
    """Keys for parts other than the UNet (text encoders): kept out of ``layers``."""

    def block_sizes(self) -> dict[str, int]:
        """Number of LoRA layers in each UNet block, e.g. ``{"output_blocks.0.1": 40}``."""
        sizes: dict[str, int] = {}
        for path in sorted(self.layers):
            block = sdxl_unet.block_of(path)
            sizes[block] = sizes.get(block, 0) + 1
        return sizes

    def only_block(self, block: str, what: str = "") -> "LoraWeights":
        """The layers inside ``block``; an error listing the file's blocks when there are none."""
        layers = {p: l for p, l in self.layers.items() if sdxl_unet.block_of(p) == block}
        if not layers:
            found = ", ".join(f"{b} ({n} layers)" for b, n in self.block_sizes().items()) or "none"
            label = f"{what} block" if what else "block"
            raise LoraFormatError(
                f"This LoRA has no layers in the {label} {block}. UNet blocks it does contain: {found}. "
                "Pick a B-LoRA file trained on that block, or the other loader."
            )
        return LoraWeights(layers, dict(self.metadata))


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, role in FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def module_path_of(prefix: str) -> str:
    """The ldm module path a key prefix names, in any known naming; KeyError otherwise."""
    for kohya in KOHYA_UNET_PREFIXES:
        if prefix.startswith(kohya):
            dotted = sdxl_unet.unflatten_kohya_name(prefix[len(kohya):])
            break
    else:
        dotted = prefix
        while dotted.startswith("unet."):
            dotted = dotted[len("unet."):]
        for strip in MODULE_PREFIXES_TO_STRIP:
            if dotted.startswith(strip):
                dotted = dotted[len(strip):]
    dotted = dotted.replace(".processor.", ".")
    if dotted.endswith(".to_out"):
        dotted += ".0"
    return sdxl_unet.to_ldm_path(dotted)


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def _examples(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def read_lora_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         source: str = "this file") -> LoraWeights:
    """Canonical form of a LoRA state dict in any of :data:`KNOWN_NAMINGS`."""
    factors: dict[str, dict[str, object]] = {}
    other_keys: list[str] = []
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise LoraFormatError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor.")
        if _is_text_encoder_key(key):
            other_keys.append(key)
            continue
        split = _split_suffix(key)
        if split is None:
            kind = next((what for s, what in UNSUPPORTED_SUFFIXES.items() if key.endswith(s)), None)
            if kind:
                unsupported.setdefault(kind, []).append(key)
            else:
                unknown.append(key)
            continue
        prefix, role = split
        try:
            path = module_path_of(prefix)
        except KeyError:
            unknown.append(key)
            continue
        slot = factors.setdefault(path, {})
        if role in slot:
            raise LoraFormatError(
                f"{source}: two keys give the {role} of {path} (one is {key!r}). "
                "The file mixes two LoRAs for the same layer; split it before loading."
            )
        slot[role] = value
    if unsupported:
        kinds = "; ".join(f"{kind}: {_examples(keys, 2)}" for kind, keys in unsupported.items())
        raise LoraFormatError(
            f"{source} uses parts this pack does not apply ({kinds}). "
            "Use ComfyUI's stock LoraLoader for LoHa/LoKr/DoRA files; B-LoRA files are plain LoRA."
        )
    if unknown:
        if not factors:
            raise LoraFormatError(
                f"{source} is not a LoRA for an SDXL UNet: none of its {len(state_dict)} keys names a LoRA "
                f"factor of a UNet layer (keys like {_examples(sorted(unknown))}). Namings understood: "
                + "; ".join(KNOWN_NAMINGS)
            )
        raise LoraFormatError(
            f"{source} has {len(unknown)} key(s) that name no layer of an SDXL UNet: {_examples(sorted(unknown))}. "
            "Is it a LoRA for another model family (SD1.5, Flux, ...)? Namings understood: "
            + "; ".join(KNOWN_NAMINGS)
        )
    if not factors:
        what = f"only text-encoder keys ({_examples(other_keys)})" if other_keys else "no keys at all"
        raise LoraFormatError(f"{source} holds {what}: there is no UNet LoRA in it.")
    layers = {path: _make_layer(path, slot, source) for path, slot in sorted(factors.items())}
    return LoraWeights(layers, dict(metadata or {}), other_keys)


def _make_layer(path: str, slot: dict[str, object], source: str) -> LoraLayer:
    missing = [role for role in ("down", "up") if role not in slot]
    if missing:
        raise LoraFormatError(f"{source}: layer {path} has no {' or '.join(missing)} factor; the file is incomplete.")
    down, up = slot["down"], slot["up"]
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        raise LoraFormatError(
            f"{source}: layer {path} has factors of shapes up {tuple(up.shape)} and down {tuple(down.shape)}, "
            "which do not multiply (up is out x rank, down is rank x in)."
        )
    alpha = slot.get("alpha")
    if alpha is not None:
        if alpha.numel() != 1:
            raise LoraFormatError(f"{source}: the alpha of {path} has {alpha.numel()} values, not one.")
        alpha = float(alpha.item())
    return LoraLayer(down=down, up=up, alpha=alpha)


def read_lora_file(path: str | Path) -> LoraWeights:
    """Read a ``.safetensors`` file, or a ``.pt/.pth/.bin/.ckpt`` with weights-only loading."""
    path = Path(path)
    source = path.name
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
        elif suffix in SAFE_TORCH_SUFFIXES:
            metadata = {}
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise LoraFormatError(f"{source}: unknown file type {suffix!r}; expected .safetensors (or .pt/.pth).")
    except LoraFormatError:
        raise
    except Exception as error:
        raise LoraFormatError(
            f"Could not read {source} ({type(error).__name__}: {error}). The file is corrupt, truncated or not "
            "a tensor file; download or train it again. Pickled files are read weights-only, never unpickled."
        ) from error
    if not isinstance(state_dict, dict):
        raise LoraFormatError(f"{source} holds a {type(state_dict).__name__}, not a dict of tensors.")
    return read_lora_state_dict(state_dict, metadata, source)


def named_state_dict(weights: LoraWeights, prefix_of, down: str = "lora_down.weight",
                     up: str = "lora_up.weight") -> dict[str, torch.Tensor]:
    """``<prefix>.<up>``, ``<prefix>.<down>`` (and ``<prefix>.alpha`` where the layer has one) per
    layer, ``prefix_of(path)`` naming it: what every naming that stores factors as they are shares."""
    state_dict = {}
    for path, layer in weights.layers.items():
        prefix = prefix_of(path)
        state_dict[f"{prefix}.{up}"] = layer.up
        state_dict[f"{prefix}.{down}"] = layer.down
        if layer.alpha is not None:
            state_dict[f"{prefix}.alpha"] = torch.tensor(float(layer.alpha))
    return state_dict


def to_comfy_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """ComfyUI's own naming, which its stock loader maps with no conversion."""
    return named_state_dict(weights, lambda path: f"diffusion_model.{path}")


def to_kohya_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya naming with diffusers module names and an alpha per layer: the one naming that
    ComfyUI's stock loader, diffusers' ``load_lora_weights`` and this pack all read as is."""
    state_dict = {}
    for path, layer in weights.layers.items():
        prefix = "lora_unet_" + sdxl_unet.ldm_to_diffusers(path).replace(".", "_")
        state_dict[f"{prefix}.lora_down.weight"] = layer.down
        state_dict[f"{prefix}.lora_up.weight"] = layer.up
        state_dict[f"{prefix}.alpha"] = torch.tensor(float(layer.rank if layer.alpha is None else layer.alpha))
    return state_dict


def to_official_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """The official B-LoRA / diffusers file layout: ``unet.<diffusers>.lora.{down,up}.weight``,
    fp32, no alpha (the scale is folded into ``up``, since those files always load at scale 1)."""
    state_dict = {}
    for path, layer in weights.layers.items():
        prefix = "unet." + sdxl_unet.ldm_to_diffusers(path)
        state_dict[f"{prefix}.lora.down.weight"] = layer.down.float().contiguous()
        state_dict[f"{prefix}.lora.up.weight"] = (layer.up.float() * layer.scale).contiguous()
    return state_dict
