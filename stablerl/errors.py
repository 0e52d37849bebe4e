"""The one exception type for problems the user can fix, and the one-line form of OS errors.

Everything a user can cause (bad config, bad data file, bad prompt, missing or corrupt checkpoint, full disk,
permission denied, a run directory in use) reaches the CLI as a `UserError` or an `OSError`; the CLI prints it as
one line naming the file and what to do, with exit code 2. Tracebacks are for `--debug`.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path


class UserError(ValueError):
    """Its message is shown as is, on one line, naming the file:line or key and what is allowed; exit code 2."""


# what to do about the OS errors a user can cause
_OS_HINTS = {
    errno.ENOSPC: "free some space (or point out_dir elsewhere)",
    errno.EDQUOT: "free some space (or point out_dir elsewhere)",
    errno.EACCES: "check the file's permissions (or point out_dir elsewhere)",
    errno.EPERM: "check the file's permissions (or point out_dir elsewhere)",
    errno.EROFS: "the file system is read-only: point out_dir elsewhere",
    errno.ENOENT: "check the path",
    errno.EISDIR: "expected a file, got a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def one_line(text: object) -> str:
    """Any message, on one line."""
    return " ".join(str(text).split())


def describe_os_error(e: Exception, doing: str | None = None, path: object = None) -> str:
    """`PATH: cannot write the checkpoint (No space left on device); free some space`, on one line, from an OSError
    or from a library error wrapping one (safetensors reports `... (os error 28)` in its message)."""
    if isinstance(e, OSError):
        path = e.filename if e.filename is not None else path
        what, code = e.strerror or one_line(e), e.errno
    else:
        found = re.search(r"os error (\d+)", str(e))
        what, code = one_line(e), int(found.group(1)) if found else None
    hint = _OS_HINTS.get(code or -1)
    return one_line(f"{path if path is not None else '?'}: " + (f"{doing} ({what})" if doing else what)
                    + (f"; {hint}" if hint else ""))


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """A JSON object file of a checkpoint ({} for an absent one when `missing_ok`); UserError naming file:line for a
    missing, unreadable or invalid one."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(describe_os_error(e, "cannot read", path)) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); the file is corrupt: fix "
                        "it, restore it or re-save the checkpoint") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({one_line(e)}); restore or re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
