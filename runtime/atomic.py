"""Atomic file writes: a temporary name in the same directory, fsync, then rename; nothing half-written survives."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` under a temporary name, then rename it into place; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results are meant to be shared like any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as JSON (non-JSON values as their str) atomically; returns the path."""
    return write_bytes_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode("utf-8"))
