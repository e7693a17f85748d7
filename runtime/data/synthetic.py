"""Deterministic synthetic remote-sensing dataset written in the DIOR layout, so the DIOR reader loads it.

`generate(params, root)` paints every image from its own seed (params.seed, image index), writes
JPEGImages-trainval/, JPEGImages-test/, Annotations/Horizontal Bounding Boxes/*.xml, ImageSets/Main/{train,val,
test}.txt and a manifest.json (generator, params, per-file sha256) into a temporary directory, then renames it into
place. Decisions:
- same params as the manifest in `root` -> nothing is written (returns written=False);
- different params into a root that holds a set -> UserError, unless overwrite=True (then the new set replaces the
  old one atomically); a non-empty root without our manifest is never touched.
Same seed and params give byte-identical files (fixed JPEG quality, no timestamps in the manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.data.dior import HBB_DIR, dior_xml_bytes
from runtime.data.images import encode_image
from runtime.data.loader import MANIFEST, SYNTHETIC_GENERATOR
from runtime.data.painters import SUPPORTED_CLASSES
from runtime.data.scene import SceneSpec, render_scene
from runtime.errors import UserError

FORMAT_VERSION = 1  # bump when the painting changes, so old sets are not taken for new ones
DEFAULT_CLASSES = ("vehicle", "storagetank", "airplane", "ship", "tenniscourt")


class SyntheticParams(BaseModel):
    """Everything that determines a synthetic set (the config loader embeds it under a dataset's `synthetic:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    image_size: int = Field(256, ge=64, le=4096, description="square images, pixels")
    num_train: int = Field(240, ge=0)
    num_val: int = Field(24, ge=0)
    num_test: int = Field(60, ge=0)
    classes: tuple[str, ...] = Field(DEFAULT_CLASSES, description="subset of the DIOR class names the painter knows")
    objects_per_image: tuple[int, int] = Field((4, 40), description="inclusive range for ordinary scenes")
    dense_objects: tuple[int, int] = Field((100, 160), description="inclusive range for dense scenes")
    dense_scene_fraction: float = Field(0.1, ge=0, le=1)
    small_object_fraction: float = Field(0.3, ge=0, le=1, description="chance an object that may be < 16 px is")
    object_scale: float = Field(1.0, gt=0.2, le=8.0, description="multiplies every object size")
    distractors_per_image: tuple[int, int] = Field((2, 12), description="roofs, sheds, trees, shadows")
    jpeg_quality: int = Field(95, ge=50, le=100)

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = {c.lower(): c for c in SUPPORTED_CLASSES}
        bad = [c for c in value if c.lower() not in known]
        if bad or not value:
            raise ValueError(f"unsupported classes {bad}; the generator paints {', '.join(SUPPORTED_CLASSES)}")
        out = tuple(known[c.lower()] for c in value)
        if len(set(out)) != len(out):
            raise ValueError("classes must not repeat")
        return out

    @model_validator(mode="after")
    def _ranges(self) -> SyntheticParams:
        for name in ("objects_per_image", "dense_objects", "distractors_per_image"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo:
                raise ValueError(f"{name} must be a range [low, high] with 0 <= low <= high, got {[lo, hi]}")
        if self.num_train + self.num_val + self.num_test == 0:
            raise ValueError("num_train + num_val + num_test must be > 0")
        return self


@dataclass
class GenerationResult:
    """What generate() did: where, whether it wrote anything, and how many images / objects the set has."""

    root: Path
    written: bool
    images: dict[str, int]
    objects: int
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def image_ids(params: SyntheticParams) -> dict[str, list[str]]:
    """Image ids per split; numbered like DIOR (5 digits), train, then val, then test."""
    counts = {"train": params.num_train, "val": params.num_val, "test": params.num_test}
    width = max(5, len(str(sum(counts.values()))))
    ids, start = {}, 1
    for split, n in counts.items():
        ids[split] = [f"{i:0{width}d}" for i in range(start, start + n)]
        start += n
    return ids


def render_image(params: SyntheticParams, index: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """Paint image number `index` (0-based over all splits); depends only on (params, index)."""
    rng = np.random.default_rng([params.seed, index, FORMAT_VERSION])
    dense = rng.random() < params.dense_scene_fraction
    lo, hi = params.dense_objects if dense else params.objects_per_image
    spec = SceneSpec(
        size=params.image_size, classes=params.classes, n_objects=int(rng.integers(lo, hi + 1)), dense=dense,
        small_fraction=params.small_object_fraction, object_scale=params.object_scale,
        n_distractors=int(rng.integers(params.distractors_per_image[0], params.distractors_per_image[1] + 1)),
    )
    return render_scene(rng, spec)


def generate(
    params: SyntheticParams, root: Path | str, overwrite: bool = False, progress: bool = False
) -> GenerationResult:
    """Write the synthetic set to `root` unless it already holds exactly this set (see module doc)."""
    root = Path(root)
    start = time.perf_counter()
    state = _existing_state(root, params)
    if state == "same":
        return _result_from_manifest(root, written=False, seconds=time.perf_counter() - start)
    if state == "other" and not overwrite:
        old = json.loads((root / MANIFEST).read_text(encoding="utf-8")).get("params", {})
        changed = sorted(k for k, v in params.model_dump(mode="json").items() if old.get(k) != v)
        raise UserError(
            f"holds a synthetic set made with other parameters (differs in: {', '.join(changed) or 'format version'})",
            where=str(root), fix="choose another directory, delete this one, or pass --overwrite",
        )
    if state == "foreign":
        raise UserError("is not empty and holds no synthetic manifest; refusing to write into it", where=str(root),
                        fix="choose a new or empty directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_all(params, tmp, progress)
        written = _swap_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _result_from_manifest(root, written=written, seconds=time.perf_counter() - start)


def _existing_state(root: Path, params: SyntheticParams) -> str:
    """'absent' (missing or empty), 'same', 'other' (our set, other params) or 'foreign' (someone else's files)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "absent"
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "foreign"
    if manifest.get("generator") != SYNTHETIC_GENERATOR:
        return "foreign"
    same = manifest.get("format_version") == FORMAT_VERSION and manifest.get("params") == params.model_dump(mode="json")
    if same and all((root / rel).is_file() for rel in manifest.get("files", {})):
        return "same"
    return "other" if not same else "absent"  # same params but files missing: regenerate (identical bytes)


def _write_all(params: SyntheticParams, out: Path, progress: bool) -> None:
    ids = image_ids(params)
    hashes: dict[str, str] = {}
    per_class = dict.fromkeys(params.classes, 0)
    images_total, objects_total = 0, 0

    def put(rel: str, data: bytes) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()

    jobs = [(split, image_id) for split in ("train", "val", "test") for image_id in ids[split]]
    iterator = enumerate(jobs)
    if progress:
        from rich.progress import track

        iterator = track(iterator, total=len(jobs), description="painting synthetic scenes")
    for index, (split, image_id) in iterator:
        rgb, objects = render_image(params, index)
        folder = "JPEGImages-test" if split == "test" else "JPEGImages-trainval"
        put(f"{folder}/{image_id}.jpg",
            encode_image(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), ".jpg", params.jpeg_quality))
        xml = dior_xml_bytes(f"{image_id}.jpg", params.image_size, params.image_size,
                             [(name, box, False) for name, box in objects])
        put(f"{HBB_DIR.as_posix()}/{image_id}.xml", xml)
        for name, _ in objects:
            per_class[name] += 1
        images_total += 1
        objects_total += len(objects)
    for split, split_ids in ids.items():
        put(f"ImageSets/Main/{split}.txt", "".join(f"{i}\n" for i in split_ids).encode())
    manifest = {
        "generator": SYNTHETIC_GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": params.seed,
        "params": params.model_dump(mode="json"),
        "counts": {"images": {s: len(v) for s, v in ids.items()}, "objects": objects_total, "per_class": per_class},
        "files": dict(sorted(hashes.items())),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _swap_into_place(tmp: Path, root: Path, params: SyntheticParams) -> bool:
    """Rename the finished set onto `root` (an old set of ours is moved aside, then deleted); False if not needed."""
    if root.exists() and _existing_state(root, params) == "same":
        return False  # another process finished the identical set first
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if old is not None:
            os.rename(old, root)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def _result_from_manifest(root: Path, written: bool, seconds: float) -> GenerationResult:
    counts = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["counts"]
    return GenerationResult(root=root, written=written, images=counts["images"], objects=counts["objects"],
                            per_class=counts["per_class"], seconds=seconds)


def read_manifest(root: Path | str) -> dict:
    """The manifest.json of a synthetic set (raises UserError when there is none)."""
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError("no synthetic manifest", where=str(path),
                        fix="generate the set with `python -m runtime.data synth ROOT`") from None
