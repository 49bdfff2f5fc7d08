"""A style library: one LoRA per image of a folder, and what describes it (host-free).

What the ``library`` command's driver and its workers share, and all that ``library index``
needs to rebuild the manifest from the files alone:

- the *entry* of an image, ``<stem>_<first 12 hex digits of its SHA-256>``: the name of its LoRA
  file, record, thumbnail and log, so a changed image is a new entry and trains anew;
- its prompt: a sidecar ``<image>.txt``, else its line in ``captions.txt``, else ``A [v]``;
- the settings a LoRA must have been trained with to count as done (``Settings``), compared with
  the ``blora.*`` metadata the train node writes into every file: that metadata is the truth;
- the per-task record (``records/<entry>.json``): what no LoRA file can say (the image's name,
  the worker's pid, attempts, the step a retried task resumed from, seconds, the error);
- the manifest, built from the LoRA files and the records.

The library's folder::

    LIBRARY/manifest.json, contact_sheet.png
    LIBRARY/loras/<entry>.safetensors        (and, while training, <entry>_checkpoint.*)
    LIBRARY/records/<entry>.json, thumbnails/<entry>.png, logs/<entry>.log
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from ..core import files

DEFAULT_PROMPT = "A [v]"
CAPTIONS_FILE = "captions.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 64
"""Smaller images are refused: scaled up to SDXL's megapixel they hold nothing to learn from."""

LORAS, RECORDS, THUMBNAILS, LOGS = "loras", "records", "thumbnails", "logs"
MANIFEST, CONTACT_SHEET = "manifest.json", "contact_sheet.png"
DONE, FAILED, UNFINISHED, RUNNING = "done", "failed", "unfinished", "running"


class ImageRefused(ValueError):
    """An image no training can use (unreadable, too small): its own task fails with this message."""


def image_files(folder: Path) -> list[Path]:
    """The images directly inside ``folder``, by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_name(image_name: str, image_sha256: str) -> str:
    """``<stem>_<sha12>``, the stem reduced to characters every file system and loader accepts."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image_name).stem).strip("._") or "image"
    return f"{stem}_{image_sha256[:12]}"


def read_captions(folder: Path) -> dict[str, str]:
    """``captions.txt`` as ``{name: prompt}``: one ``image name: prompt`` per line (the name with
    or without its extension); blank lines and lines starting with ``#`` are ignored."""
    path = Path(folder) / CAPTIONS_FILE
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, prompt = line.partition(":")
        if not colon or not name.strip() or not prompt.strip():
            raise ValueError(f"{path}, line {number}: expected 'image name: prompt', got {line!r}.")
        captions[name.strip()] = prompt.strip()
    return captions


def prompt_for(image: Path, captions: dict[str, str]) -> str:
    """The sidecar ``<stem>.txt`` beside the image, else its ``captions.txt`` line (by file name,
    then by stem), else ``A [v]``."""
    sidecar = image.with_suffix(".txt")
    if sidecar.name != CAPTIONS_FILE and sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip():
        return sidecar.read_text(encoding="utf-8").strip()
    return captions.get(image.name) or captions.get(image.stem) or DEFAULT_PROMPT


def check_image(path: Path, name: str | None = None) -> tuple[int, int]:
    """The image's size; ``ImageRefused`` saying why if training cannot use it (``name``: how
    the user knows the file, when ``path`` is a copy)."""
    from PIL import Image, UnidentifiedImageError

    name = name or Path(path).name
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
    except UnidentifiedImageError:
        reason = "its contents are in no image format PIL reads"
    except (OSError, SyntaxError, ValueError) as error:  # truncated or damaged
        reason = str(error)
    else:
        reason = None
    if reason:
        raise ImageRefused(f"{name} is not an image that can be read ({reason}); "
                           "replace or remove it and run the command again.")
    if min(size) < MIN_IMAGE_SIDE:
        raise ImageRefused(f"{name} is {size[0]} x {size[1]} px; the smaller side must be at least "
                           f"{MIN_IMAGE_SIDE} px to train on (SDXL trains at about 1024 px).")
    return size


def write_thumbnail(image: Path, target: Path, side: int = 128) -> Path:
    """The contact sheet's picture of an image, kept in the library so ``library index`` needs
    no images folder."""
    from PIL import Image

    with Image.open(image) as opened:
        thumbnail = opened.convert("RGB")
    thumbnail.thumbnail((side, side))
    return files.write_atomic(target, lambda temporary: thumbnail.save(temporary, format="PNG"))


SETTING_KEYS = {"recipe": "blora.recipe", "steps": "blora.steps", "rank": "blora.rank",
                "learning_rate": "blora.learning_rate", "seed": "blora.seed", "prompt": "blora.prompt",
                "base_model_sha256": "blora.base_model_sha256"}
"""Each setting and the train node's metadata key that records it."""


@dataclass(frozen=True)
class Settings:
    """What a LoRA of the library is trained with; a file whose metadata says the same is done."""

    recipe: str
    steps: int
    rank: int
    learning_rate: float
    seed: int
    prompt: str
    base_model_sha256: str

    def differences(self, metadata: dict[str, str]) -> list[str]:
        """The settings a file's metadata does not match, as ``name: file X, wanted Y``."""
        found = []
        for name, key in SETTING_KEYS.items():
            wanted, value = getattr(self, name), metadata.get(key)
            try:
                same = value is not None and type(wanted)(value) == wanted
            except ValueError:
                same = False
            if not same:
                found.append(f"{name}: file {value!r}, wanted {wanted!r}")
        return found

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "Settings":
        return cls(metadata["blora.recipe"], int(metadata["blora.steps"]), int(metadata["blora.rank"]),
                   float(metadata["blora.learning_rate"]), int(metadata["blora.seed"]), metadata["blora.prompt"],
                   metadata["blora.base_model_sha256"])

    def as_dict(self) -> dict:
        return asdict(self)


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (the header only; no tensor is read)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def is_finished_lora(metadata: dict[str, str]) -> bool:
    """A file the train node finished (a checkpoint's LoRA says at which step it was taken)."""
    return "blora.method" in metadata and "blora.checkpoint_step" not in metadata


def lora_path(library: Path, entry: str) -> Path:
    return Path(library) / LORAS / f"{entry}.safetensors"


def record_path(library: Path, entry: str) -> Path:
    return Path(library) / RECORDS / f"{entry}.json"


def write_json_atomic(data, path: Path) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return files.write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_record(library: Path, entry: str) -> dict | None:
    path = record_path(library, entry)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_record(library: Path, record: dict) -> Path:
    return write_json_atomic(record, record_path(library, record["entry"]))


def manifest_entry(library: Path, entry: str) -> dict:
    """One image's line of the manifest: from its LoRA file's metadata when the file is finished,
    from its record otherwise (what failed, or what is still unfinished)."""
    library = Path(library)
    record = read_record(library, entry) or {}
    path = lora_path(library, entry)
    result = {
        "entry": entry, "image": record.get("image"), "image_sha256": record.get("image_sha256"),
        "file": None, "status": None, "error": record.get("error"), "prompt": None, "settings": record.get("settings"),
        "final_loss": None, "steps": None, "seconds": record.get("seconds"), "attempts": record.get("attempts"),
        "resumed_from": record.get("resumed_from"), "created": None,
        "thumbnail": f"{THUMBNAILS}/{entry}.png" if (library / THUMBNAILS / f"{entry}.png").is_file() else None,
        "log": f"{LOGS}/{entry}.log" if (library / LOGS / f"{entry}.log").is_file() else None,
    }
    metadata = {}
    if path.is_file():
        try:
            metadata = read_metadata(path)
        except Exception as error:  # a damaged file is reported, the others still indexed
            result.update(status=FAILED, error=f"{path.name} cannot be read as safetensors ({error}).")
            return result
    if is_finished_lora(metadata):
        losses = json.loads(metadata.get("blora.losses", "[]"))
        finite = [v for v in losses if v is not None and math.isfinite(v)]
        result.update(file=f"{LORAS}/{path.name}", status=DONE, error=None, prompt=metadata.get("blora.prompt"),
                      settings=Settings.from_metadata(metadata).as_dict(),
                      steps=len(losses) if losses else int(metadata["blora.steps"]),
                      final_loss=finite[-1] if finite else None, created=metadata.get("blora.created"))
        return result
    status = record.get("status")
    result.update(status=FAILED if status == FAILED else UNFINISHED,
                  prompt=(record.get("settings") or {}).get("prompt"))
    if result["status"] == UNFINISHED and not result["error"]:
        result["error"] = "training did not finish (interrupted?); run the same command again to resume it."
    return result


def entries(library: Path) -> list[str]:
    """Every entry the library's files know of: its LoRA file or its record (a checkpoint belongs
    to the entry it is a checkpoint of)."""
    library = Path(library)
    names = {p.stem for p in (library / RECORDS).glob("*.json")}
    for path in (library / LORAS).glob("*.safetensors"):
        names.add(path.stem)
    return sorted(name for name in names if not name.endswith("_checkpoint"))


def losses_of(library: Path, entry: dict) -> list[float]:
    """An entry's per-step losses, from its file's metadata (the manifest keeps only the last)."""
    if not entry.get("file"):
        return []
    values = json.loads(read_metadata(Path(library) / entry["file"]).get("blora.losses", "[]"))
    return [math.nan if v is None else float(v) for v in values]


def build_manifest(library: Path) -> dict:
    """The manifest from the library's files: one entry per image, ordered by image name."""
    items = [manifest_entry(library, name) for name in entries(library)]
    items.sort(key=lambda item: (item["image"] or item["entry"], item["entry"]))
    counts = {status: sum(item["status"] == status for item in items) for status in (DONE, FAILED, UNFINISHED)}
    return {"library": str(Path(library).resolve()), "counts": counts, "images": items}


def write_manifest(library: Path, manifest: dict) -> Path:
    return write_json_atomic(manifest, Path(library) / MANIFEST)
