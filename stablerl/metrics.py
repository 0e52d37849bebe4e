"""Where numbers go: `metrics.jsonl` (one line per step, the file reports read) and TensorBoard event files.

Both are opened in append mode so a resumed run continues them; `truncate_after(step)` drops lines a crashed run
wrote past its last checkpoint, so the resumed file has each step exactly once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from stablerl.errors import UserError


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        else:  # a fresh run inherits no line and no event of a previous run in this directory
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
        self.fh = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards TensorBoard events past the resume point, as truncate_after does for the JSONL
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _clean(v):
    """JSON has no NaN/Inf: write them as null rather than producing a file other tools cannot parse."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a JSONL metrics file. A torn last line (the process was killed while writing it) is left out;
    a broken line elsewhere is a corrupt file: UserError naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: invalid JSON ({e.msg}); the file is corrupt") from None
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep the rows with step <= `step` (and drop a torn last line), atomically; no file, nothing to do."""
    if not path.exists():
        return
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", -1) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)
