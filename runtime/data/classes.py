"""Class lists of DIOR and DOTA with their real spellings, and one resolver for names or lists.

Matching against annotation files is case-insensitive (`class_index`), but the names kept in a
DetectionSet are the spellings given here (or by the user), so every tool prints the same names.
"""
from __future__ import annotations

from collections.abc import Sequence

from runtime.errors import UserError

# Order of mmrotate's DIORDataset, which the DS2D2 reference and MMDetection checkpoints use (label = index).
# Spellings are those of the DIOR XML files ("Expressway-Service-area", "golffield", ...).
DIOR_CLASSES: tuple[str, ...] = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
    "Expressway-Service-area", "Expressway-toll-station", "dam", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation",
    "vehicle", "windmill",
)

# Order of mmrotate's DOTADataset (v1.0); v1.5 appends container-crane.
DOTA_V1_0: tuple[str, ...] = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle",
    "ship", "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout",
    "harbor", "swimming-pool", "helicopter",
)
DOTA_V1_5: tuple[str, ...] = DOTA_V1_0 + ("container-crane",)

NAMED_LISTS: dict[str, tuple[str, ...]] = {
    "dior": DIOR_CLASSES,
    "dota": DOTA_V1_0,
    "dota1.0": DOTA_V1_0,
    "dota-v1.0": DOTA_V1_0,
    "dotav1.0": DOTA_V1_0,
    "dota1": DOTA_V1_0,
    "dota1.5": DOTA_V1_5,
    "dota-v1.5": DOTA_V1_5,
    "dotav1.5": DOTA_V1_5,
}


def class_list(name_or_list: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve 'dior' / 'dota1.0' / 'dota1.5', a comma-separated string or a list of names to a class tuple."""
    if isinstance(name_or_list, str):
        key = name_or_list.strip().lower()
        if key in NAMED_LISTS:
            return NAMED_LISTS[key]
        if "," not in name_or_list:
            raise UserError(
                f"unknown class list {name_or_list!r}",
                fix=f"use one of {', '.join(sorted(NAMED_LISTS))}, or a list of class names",
            )
        names: Sequence[str] = [n.strip() for n in name_or_list.split(",") if n.strip()]
    else:
        names = list(name_or_list)
    if not names:
        raise UserError("empty class list", fix="give at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise UserError(f"class names must be non-empty strings, got {bad!r}")
    lowered = [n.lower() for n in names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise UserError(f"class list names {', '.join(dupes)} more than once (names are case-insensitive)")
    return tuple(n.strip() for n in names)


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """Map lower-cased class name -> label index, for case-insensitive lookup of annotation names."""
    return {name.lower(): i for i, name in enumerate(classes)}
