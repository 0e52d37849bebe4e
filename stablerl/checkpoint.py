"""Training checkpoints: HF-format weights + optimizer + step, each written atomically, the last k kept.

Layout: `runs/<name>/checkpoints/step_000020/{config.json, model.safetensors, tokenizer.json, trainer_state.pt}`.
A checkpoint directory is built under a temporary name and renamed into place in one `os.replace`, so a
crash (even SIGKILL) leaves either no directory for that step or a complete one. The trainer draws every random
number from generators seeded by (seed, step), so weights + optimizer + step are the whole state to restore.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d{6})$")


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, extra: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.partial"  # hidden from list_checkpoints; a crash's leftover is replaced
    model.save(tmp, tokenizer=tokenizer)  # the checkpoint dir itself is an HF model dir
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **extra}, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)
