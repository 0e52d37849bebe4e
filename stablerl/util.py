"""Small helpers several modules share: a logged value as a finite number, and a file written atomically."""

from __future__ import annotations

import math
from pathlib import Path


def finite(value) -> float | None:
    """A logged value as a float, or None when it is missing, not a number, a bool, NaN or infinite: metrics files
    write NaN/Inf as null, and readers skip them (a NaN step is the abort guard's business, not a reading)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed into place: a reader (or a crash) never sees half a
    file. The temporary file is `<name>.tmp` next to it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
