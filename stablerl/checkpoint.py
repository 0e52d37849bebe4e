"""Training checkpoints and run directories: HF-format weights + optimizer + step, written atomically, the last k
kept; a lock so one process at a time writes a run directory; the checks a resume makes before it touches anything.

Layout: `runs/<name>/checkpoints/step_000020/{config.json, model.safetensors, tokenizer.json, trainer_state.json,
optimizer.safetensors}`. Nothing is pickled: tensors go to safetensors, everything else to JSON, so loading a
checkpoint from someone else cannot run code. A checkpoint directory is built under a temporary name and renamed
into place in one `os.replace`, so a crash (even SIGKILL) leaves either no directory for that step or a complete
one, and a failed write (disk full) removes its partial directory and leaves the earlier checkpoints as they were.
The trainer draws every random number from generators seeded by (seed, step), so weights + optimizer + step are the
whole state to restore. A distributed run (stablerl.distributed) writes the same directory, with its optimizer state
in `optim/` through torch.distributed.checkpoint (one file per rank) instead of optimizer.safetensors; DCP's
`.metadata` file is a pickle, so resume only such checkpoints you trust.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stablerl.config import Config, marked
from stablerl.errors import UserError, describe_os_error, one_line
from stablerl.hf import save_model

STEP_DIR = re.compile(r"^step_(\d{6})$")
STATE_JSON, STATE_TENSORS = "trainer_state.json", "optimizer.safetensors"
OPTIM_DCP = "optim"  # a distributed run's optimizer state: torch.distributed.checkpoint, one file per rank
LEGACY_STATE = "trainer_state.pt"  # before 2026-12-02: torch.save; read with weights_only=True only


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


# ---- trainer state without pickle ---------------------------------------------------------------------------------


def _flatten_optimizer(sd: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer state_dict -> (JSON-able dict, {name: tensor}). Per-parameter tensors become `state.<i>.<key>`."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for i, entry in sd["state"].items():
        state[str(i)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{i}.{k}"] = v.detach().contiguous().cpu()
                state[str(i)][k] = {"tensor": f"state.{i}.{k}"}
            else:
                state[str(i)][k] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}, tensors


def _unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {int(i): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in e.items()}
             for i, e in meta["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, extra: dict, keep: int,
                    sharded_optimizer: Path | None = None) -> Path:
    """Write `checkpoints/step_<step>` atomically; `extra` (JSON-able) is returned by `load_trainer_state`.
    A failed write raises CheckpointError naming the directory and leaves no partial directory behind.
    `sharded_optimizer`: a directory the ranks of a distributed run wrote their optimizer state to (DCP,
    stablerl.distributed); it becomes `<checkpoint>/optim` inside the same atomic rename, and `optimizer` is None."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.partial"  # hidden from list_checkpoints; a crash's leftover is replaced
    try:
        root.mkdir(parents=True, exist_ok=True)
        save_model(model, tmp, tokenizer)  # the checkpoint dir itself is an HF model dir (written atomically)
        if sharded_optimizer is not None:
            os.replace(sharded_optimizer, tmp / OPTIM_DCP)
            meta = None
        else:
            meta, tensors = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({"format": 1, "step": step, "optimizer": meta, "extra": extra}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError, UserError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if sharded_optimizer is not None:
            shutil.rmtree(sharded_optimizer, ignore_errors=True)
        prev = [p.name for p in list_checkpoints(run_dir)]
        kept = f"earlier checkpoints are intact ({prev[-1]} is the latest)" if prev else "no earlier checkpoint exists"
        why = one_line(e) if isinstance(e, UserError) else describe_os_error(e, "cannot write the checkpoint", tmp)
        raise CheckpointError(f"{why}; {kept}; rerun with --resume once fixed") from e
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name)
             and ((p / STATE_JSON).exists() or (p / LEGACY_STATE).exists())]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(ckpt: Path) -> dict:
    """{"step", "optimizer" (a state_dict), **extra} of a checkpoint; CheckpointError if it is unreadable. A
    distributed run's checkpoint has "optimizer" None and "optimizer_dir", its DCP directory, instead."""
    ckpt = Path(ckpt)
    path = ckpt / STATE_JSON
    try:
        if not path.exists() and (ckpt / LEGACY_STATE).exists():
            path = ckpt / LEGACY_STATE
            # weights_only: tensors, containers and numbers only; a pickled object that would run code is refused
            return torch.load(path, weights_only=True, map_location="cpu")
        meta = json.loads(path.read_text())
        if meta["optimizer"] is None:
            if not (ckpt / OPTIM_DCP).is_dir():
                raise FileNotFoundError(f"no {OPTIM_DCP}/ beside it")
            return {"step": int(meta["step"]), "optimizer": None, "optimizer_dir": ckpt / OPTIM_DCP,
                    **meta.get("extra", {})}
        tensors = load_file(str(ckpt / STATE_TENSORS)) if meta["optimizer"]["state"] else {}
        return {"step": int(meta["step"]), "optimizer": _unflatten_optimizer(meta["optimizer"], tensors),
                **meta.get("extra", {})}
    except OSError as e:
        raise CheckpointError(describe_os_error(e, "cannot read the trainer state", path)) from e
    except Exception as e:  # corrupt JSON or safetensors, missing keys, a refused pickle: all say "unreadable"
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {one_line(e)[:200]})") from e


# ---- the run directory: one writer, and what a resume may change -------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory for as long as the `with` block runs (released by the OS when the
    process dies, SIGKILL included): a second process on the same directory stops at once instead of interleaving
    its writes with the first one's."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            raise UserError(f"{self.path.parent}: in use by another stablerl process (pid {owner}); wait for it to "
                            "finish, stop it, or choose another name=...") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock; the file stays (removing it would race a new owner)
            self.fh = None

    @staticmethod
    def held(run_dir: str | Path) -> bool:
        """Another process holds the lock of `run_dir`: a run is writing there right now."""
        path = Path(run_dir) / ".lock"
        if not path.exists():
            return False
        with path.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False


RESUMABLE = frozenset(marked("resumable"))  # the keys a resumed run may change (config.RESUMABLE)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict -> {"section.key": value} (task.knobs stays one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "knobs":  # sections recurse; task.knobs is one value
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, new: dict, allowed: frozenset[str] = RESUMABLE,
                   within: tuple[str, ...] = ()) -> list[str]:
    """'key (was a, now b)' for every key of two nested config dicts that differs, but the `allowed` ones (and, with
    `within`, those outside these prefixes). Used by --resume and by the study executor. A key the saved config lacks
    is no change while the new value is its default: the run was made before the key existed, and a new key's
    default keeps the behaviour from before it (so a study can go on over several versions of stablerl)."""
    a, b = flatten(saved), flatten(new)
    defaults = flatten(json.loads(json.dumps(dataclasses.asdict(Config()))))  # tuples as lists, as YAML reads them
    def was(k):
        return repr(a[k]) if k in a else "absent"

    return [f"{k} (was {was(k)}, now {b[k]!r})" if k in b else f"{k} (was {was(k)}, now absent)"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in allowed and (not within or k.startswith(within))
            and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def check_resume_config(saved, new, saved_path: Path) -> None:
    """Refuse a resume whose config changes anything but the RESUMABLE keys, naming the keys and both values.
    `train.steps` may grow or shrink only under a constant learning rate (the cosine schedule depends on it)."""
    allowed = RESUMABLE | ({"train.steps"} if new.train.lr_schedule == "constant" else set())
    changed = config_changes(dataclasses.asdict(saved), dataclasses.asdict(new), allowed)
    if changed:
        diffs = ", ".join(changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"--resume: the config differs from {saved_path} in {diffs}{more}; a resumed run must keep "
                        f"them (resumable changes: {', '.join(sorted(allowed))}): drop those overrides, or start a "
                        "new run with another name=...")
