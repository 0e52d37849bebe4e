"""Plain progress lines for log files: what the RL and SFT loops show when their output is not a terminal.

rich's progress bar only draws on a terminal; redirected to a file (`stablerl quickstart > log`, the study
executor's train.log / sft.log) it prints nothing until the loop ends, which looks like a hang for minutes. So
`log_lines(progress)` makes a loop's `rich.progress.Progress` also print one plain line, at most every `every`
seconds and once at the end, when its console is not a terminal:

    rl 12/60  reward 0.412  len 31.2  kl 1.2e-04  ...  |  1m05s elapsed, ETA 5m25s

(the loop's name, the step, the loop's own info field, the wall time and a remaining-time estimate). On a terminal
it changes nothing (the bar is there). It applies with `--no-progress` too: that flag turns the bar off, and a
line every 30 s in a batch log is what training tools print there. The loops keep calling `progress.update` as
before: the wrapper goes around that one method of that one object, so trainer.py / sft.py gain a single line.
"""

from __future__ import annotations

import time

from rich.progress import Progress, TaskID

EVERY_S = 30.0  # seconds between two plain lines (a display setting, not a hyper-parameter)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plain_line(name: str, done: float, total: float | None, info: str, elapsed: float, eta: float | None) -> str:
    """One progress line: `name done/total  info  |  elapsed, ETA` (no markup, no colour)."""
    steps = f"{int(done)}/{int(total)}" if total is not None else f"{int(done)}"
    when = f"{_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else "")
    return "  ".join(x for x in (f"{name} {steps}", info, f"|  {when}") if x)


def log_lines(progress: Progress, every: float = EVERY_S) -> Progress:
    """`progress`, printing a plain line (plain_line) to its console at most every `every` s and when a task
    finishes, if that console is not a terminal; unchanged on a terminal. Returns the same object."""
    console = progress.console
    if console.is_terminal:
        return progress
    update = progress.update
    first: dict[TaskID, tuple[float, float]] = {}  # task -> (completed, time) when first seen: resumed runs' ETA
    start = time.monotonic()
    last = [start]

    def update_and_log(task_id: TaskID, **kwargs) -> None:
        now = time.monotonic()
        task = progress._tasks[task_id]  # rich keeps them by id; `progress.tasks` is a list copy
        first.setdefault(task_id, (task.completed, start))
        update(task_id, **kwargs)
        if now - last[0] < every and not task.finished:
            return
        last[0] = now
        done0, t0 = first[task_id]
        rate = (task.completed - done0) / max(now - t0, 1e-9)  # steps per second over this process's steps
        eta = (task.total - task.completed) / rate if task.total is not None and rate > 0 else None
        name = task.description or "progress"
        console.print(plain_line(name, task.completed, task.total, str(task.fields.get("info", "")), now - t0, eta),
                      markup=False, highlight=False, soft_wrap=True)

    progress.update = update_and_log  # type: ignore[method-assign]
    return progress
