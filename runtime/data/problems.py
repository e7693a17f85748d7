"""Collect bad-input problems while reading a dataset: stop at the first (strict) or skip and count (lenient).

Policy (the same in every reader):
- a record-level problem (missing / corrupt image, missing or unparsable annotation file) skips the image;
- an object-level problem (malformed line, unknown class, degenerate box, box entirely outside the image)
  skips that object only;
- a box partly outside the image is clipped to the image and kept: that is a *note*, not a problem, because
  real annotations routinely overshoot the border by a pixel (e.g. DOTA P0706). Notes never stop a strict run
  but are printed in the summary, so nothing changes silently.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from runtime.errors import UserError

MISSING_IMAGE = "missing-image"
CORRUPT_IMAGE = "corrupt-image"
MISSING_ANNOTATION = "missing-annotation"
MALFORMED_ANNOTATION = "malformed-annotation"
UNKNOWN_CLASS = "unknown-class"
DEGENERATE_BOX = "degenerate-box"
OUT_OF_IMAGE_BOX = "out-of-image-box"
SIZE_MISMATCH = "size-mismatch"
DUPLICATE_IMAGE = "duplicate-image"

# What lenient mode does with each kind (printed in the summary).
ACTION: dict[str, str] = {
    MISSING_IMAGE: "image skipped",
    CORRUPT_IMAGE: "image skipped",
    MISSING_ANNOTATION: "image skipped",
    MALFORMED_ANNOTATION: "skipped",
    UNKNOWN_CLASS: "object skipped",
    DEGENERATE_BOX: "object skipped",
    OUT_OF_IMAGE_BOX: "object skipped",
    SIZE_MISMATCH: "image size taken from the file",
    DUPLICATE_IMAGE: "later copy skipped",
}

# Informational counts (never stop a strict run).
CLIPPED_BOX = "clipped-box"
IN_NO_PATCH = "object-in-no-patch"
NOTE_TEXT: dict[str, str] = {
    CLIPPED_BOX: "kept, clipped to the image",
    IN_NO_PATCH: "in no patch: under the keep threshold in every patch",
}

_DEFAULT_FIX = "fix or remove it, or run without --strict to skip such entries and count them"


@dataclass
class Problem:
    """One bad input: its kind, what is wrong and where (file[:line])."""

    kind: str
    what: str
    where: str


@dataclass
class ProblemReport:
    """Problems found while reading; `strict` raises UserError at the first one instead of counting it."""

    strict: bool = False
    examples_per_kind: int = 3
    counts: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: list[Problem] = field(default_factory=list)

    def add(self, kind: str, what: str, where: str, fix: str | None = None) -> None:
        """Record a problem; in strict mode raise it as a UserError with its file and line."""
        if self.strict:
            raise UserError(f"{kind}: {what}", where=where, fix=fix or _DEFAULT_FIX)
        self.counts[kind] += 1
        if self.counts[kind] <= self.examples_per_kind:
            self.examples.append(Problem(kind, what, where))

    def note(self, kind: str, n: int = 1) -> None:
        """Count a harmless correction (e.g. a box clipped to the image)."""
        if n:
            self.notes[kind] += n

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:  # a report is always truthy as an object; use len() for "has problems"
        return True

    def to_dict(self) -> dict[str, dict[str, int]]:
        """Counts per kind, for JSON output."""
        return {"problems": dict(sorted(self.counts.items())), "notes": dict(sorted(self.notes.items()))}

    def summary(self) -> list[str]:
        """Lines to print at the end of a CLI: one per kind with its count, action and first examples."""
        lines = []
        for kind, n in sorted(self.counts.items()):
            lines.append(f"{kind}: {n} ({ACTION.get(kind, 'skipped')})")
            lines.extend(f"    {p.where}: {p.what}" for p in self.examples if p.kind == kind)
        for kind, n in sorted(self.notes.items()):
            lines.append(f"{kind}: {n} ({NOTE_TEXT[kind]})" if kind in NOTE_TEXT else f"{kind}: {n}")
        return lines

    def merge(self, other: ProblemReport) -> None:
        """Add another report's counts and examples to this one."""
        self.counts.update(other.counts)
        self.notes.update(other.notes)
        room = {k: self.examples_per_kind - sum(p.kind == k for p in self.examples) for k in other.counts}
        for p in other.examples:
            if room.get(p.kind, 0) > 0:
                self.examples.append(p)
                room[p.kind] -= 1
