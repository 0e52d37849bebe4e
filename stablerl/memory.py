"""Host memory of a run: the resident set per step (`mem/rss_gib`, `mem/peak_gib`), handing freed heap back to the
OS after each step, and the guard that stops a run before the kernel's OOM killer does (train.max_rss_frac).

Why `release` (issue 31, docs/log.md 2026-12-06): a step's CPU tensors (activations of a 128-row forward, the E9
probe's flat gradients, the engine's fresh weight copy at each sync, the eval engine's KV cache) are freed when the
step ends, but glibc's malloc keeps most of that memory: blocks below its mmap threshold (which glibc raises up to
32 MiB each time a larger mmapped block is freed) live in heaps it trims only from the top, so every step's
different shapes leave freed, still-resident holes. On SmolLM2-135M (B=16, G=8) the resident set then climbed from
4.5 GiB to 24 GiB in 30 steps while the live tensors stayed the same. `malloc_trim(0)` returns every free page of
every arena to the OS (madvise), so the next step starts from the live set; it runs once more than
KEEP_FREE_GIB is held free, since re-faulting released pages costs time at every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


def _status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_gib(field: str) -> float | None:
    kib = _status_kib(field)
    return None if kib is None else kib * 1024 / GIB


def rss_gib() -> float | None:
    """The process's resident set now (VmRSS), GiB; None where /proc is not there (not Linux)."""
    return _status_gib("VmRSS")


def peak_gib() -> float | None:
    """The process's largest resident set so far (VmHWM: the high-water mark, inside steps too), GiB; None off Linux."""
    return _status_gib("VmHWM")


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 `struct mallinfo2`, summed over every arena
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
    except (OSError, TypeError):
        return None
    if not hasattr(lib, "malloc_trim"):  # glibc only (musl and macOS have none)
        return None
    if hasattr(lib, "mallinfo2"):  # glibc >= 2.33
        lib.mallinfo2.restype = _MallInfo2
    return lib


def free_heap_gib() -> float | None:
    """Bytes malloc holds free in its heaps (mallinfo2's fordblks: freed by the program, kept by glibc), GiB; None
    without glibc >= 2.33."""
    lib = _libc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    return lib.mallinfo2().fordblks / GIB


# Freed heap kept for the next step: a step that reuses its predecessor's pages does not fault them in again. Trimming
# after every step cost the tiny MoE ~0.5 s of a 2.2 s step (benchmarks/step.py, docs/log.md 2026-12-06 evening)
# for no memory it needed back; the growth of issue 31 is bounded all the same (RSS <= live + this between steps).
KEEP_FREE_GIB = 2.0


def release(keep_gib: float = KEEP_FREE_GIB) -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`) once more than `keep_gib` of it is free
    (always where that cannot be read); True if it trimmed. False where there is no glibc."""
    lib = _libc()
    if lib is None:
        return False
    free = free_heap_gib()
    if free is not None and free <= keep_gib:
        return False
    return bool(lib.malloc_trim(0))


def activation_bytes_per_token(mc, checkpointing: bool = False) -> int:
    """Bytes autograd saves per token of a differentiated forward of `mc` (a stablerl ModelConfig), fp32: an upper
    estimate from the shapes, ~12 h-wide tensors per layer (norm inputs and outputs, q k v, attention output, o_proj
    and residual) plus 4 per MLP hidden unit (gate, up, their activation and product; MoE: k experts' worth, their
    gathered inputs and outputs and the router's logits). With activation checkpointing only each layer's input is
    kept, plus one layer's worth while it is recomputed. SmolLM2-135M: 1.57 MB per token, against the ~1.5-1.7 MB its
    128-row steps used (docs/log.md 2026-12-06, night session)."""
    h, L = mc.hidden_size, mc.num_hidden_layers
    moe = set(mc.moe_layers)
    def layer(i: int) -> int:
        if i in moe:
            k = mc.num_experts_per_tok
            return 12 * h + 4 * k * mc.moe_intermediate_size + 2 * k * h + mc.num_experts
        return 12 * h + 4 * mc.intermediate_size
    floats = L * h + max(layer(i) for i in range(L)) if checkpointing else sum(layer(i) for i in range(L))
    return 4 * floats


def rows_per_pass(mc, seq_len: int, budget_gib: float, checkpointing: bool = False) -> int:
    """Rows of `seq_len` tokens one forward/backward may hold so its saved activations stay under `budget_gib`
    (train.activation_gib), at least 1; 0 = no limit (budget 0): train.micro_batch_size=0 resolves to this each step, so
    a pretrained model's 128-row step is split in micro-batches while the tiny MoE's fits in one pass."""
    if budget_gib <= 0:
        return 0
    per_row = activation_bytes_per_token(mc, checkpointing) * max(1, seq_len)
    return max(1, int(budget_gib * GIB // per_row))


@dataclass(frozen=True)
class Limit:
    gib: float
    source: str  # "cgroup memory.max" | "cgroup v1 limit" | "MemTotal"


def memory_limit(root: Path = Path("/")) -> Limit | None:
    """The memory this process may use: its cgroup's limit when one is set and below the machine's, else MemTotal;
    None when neither is readable."""
    total = _status_kib("MemTotal", str(root / "proc/meminfo"))
    best = None if total is None else Limit(total * 1024 / GIB, "MemTotal")
    for rel, source in (("sys/fs/cgroup/memory.max", "cgroup memory.max"),
                        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "cgroup v1 limit")):
        try:
            raw = (root / rel).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and (best is None or int(raw) / GIB < best.gib):
            best = Limit(int(raw) / GIB, source)
    return best


def step_metrics() -> dict[str, float]:
    """`mem/rss_gib` (now, after the step's memory was released) and `mem/peak_gib` (the run's peak so far)."""
    rss, peak = rss_gib(), peak_gib()
    return {} if rss is None or peak is None else {"mem/rss_gib": rss, "mem/peak_gib": peak}


def over_limit(m: dict, frac: float, limit: Limit | None, cfg) -> str | None:
    """The one line that stops the run when its peak resident set reached `frac` of `limit`, naming the settings that
    shrink a step (their values now), else None. `frac` 0 turns the guard off."""
    peak = m.get("mem/peak_gib")
    if not frac or limit is None or peak is None or peak < frac * limit.gib:
        return None
    t, e = cfg.train, cfg.engine
    micro = (f"train.micro_batch_size (now {t.micro_batch_size})" if t.micro_batch_size else
             f"train.activation_gib (now {t.activation_gib:g}) or a train.micro_batch_size" if t.activation_gib else
             "train.micro_batch_size (now all rows)")
    return (f"resident memory peaked at {peak:.1f} GiB, train.max_rss_frac={frac:g} of the {limit.gib:.1f} GiB "
            f"limit ({limit.source}): resume (`stablerl train --resume`, the same config) with a lower "
            f"{micro} or train.activation_checkpointing=true, "
            f"or start again with fewer "
            f"train.batch_prompts (now {t.batch_prompts}) or engine.max_new_tokens (now {e.max_new_tokens})")
