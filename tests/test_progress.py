"""Plain progress lines when output is not a terminal (issue 30, item 5): every ~30 s and at the end, in the RL and
SFT loops, with the step, the loop's info (reward for RL), the time and an ETA; nothing added on a terminal."""

import io
import subprocess
import sys

from rich.console import Console
from rich.progress import Progress

import stablerl.progress as sp
from stablerl.progress import log_lines, plain_line

TINY = ["task.knobs={digits: 1, n_terms: 3}", "task.n_train=32", "task.n_heldout=4", "engine.max_new_tokens=8",
        "train.fidelity_every=0", "train.eval_every=0"]


def test_plain_line_format():
    assert plain_line("rl", 12, 60, "reward 0.412", 65, 325) == "rl 12/60  reward 0.412  |  1m05s elapsed, ETA 5m25s"
    assert plain_line("sft", 3, None, "", 3725, None) == "sft 3  |  1h02m elapsed"


def test_lines_every_30_s_and_at_the_end_only_off_a_terminal(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(sp.time, "monotonic", lambda: clock[0])
    buf = io.StringIO()
    progress = log_lines(Progress(console=Console(file=buf, width=40)))  # a file: not a terminal
    with progress:
        bar = progress.add_task("rl", total=10, completed=2, info="")  # a resumed run: steps 3..10 in this process
        for step in range(2, 10):
            clock[0] += 10.0  # 10 s per step
            progress.update(bar, advance=1, info=f"reward {step / 10:.3f}")
    lines = [x for x in buf.getvalue().splitlines() if "elapsed" in x]  # not rich's own final bar
    # 30 s after the start (step 5: 3 steps done at 10 s each, 5 to go), 30 s later (step 8), then the end;
    # one line each even at width 40 (no wrapping in a log file)
    assert lines == ["rl 5/10  reward 0.400  |  0m30s elapsed, ETA 0m50s",
                     "rl 8/10  reward 0.700  |  1m00s elapsed, ETA 0m20s",
                     "rl 10/10  reward 0.900  |  1m20s elapsed, ETA 0m00s"]
    term = io.StringIO()
    progress = log_lines(Progress(console=Console(file=term, force_terminal=True), disable=True))
    with progress:
        bar = progress.add_task("rl", total=1, info="x")
        progress.update(bar, advance=1, info="y")
    assert "rl 1/1" not in term.getvalue()


def _cli(*args):  # stdout is a pipe, as when redirected to a log file
    return subprocess.run([sys.executable, "-m", "stablerl", *args], capture_output=True, text=True, timeout=600)


def test_sft_and_rl_print_progress_lines_into_a_log(tmp_path):
    r = _cli("sft", f"out_dir={tmp_path}", "name=cold", "sft.steps=2", "sft.batch_size=4", "sft.eval_every=0", *TINY)
    assert r.returncode == 0, r.stderr
    assert any(x.startswith("sft 2/2  loss ") and "elapsed, ETA 0m00s" in x for x in r.stdout.splitlines()), r.stdout
    r = _cli("train", f"out_dir={tmp_path}", "name=rl", "train.steps=2", "train.batch_prompts=2", "train.group_size=2",
             f"init={tmp_path / 'cold' / 'model'}", *TINY)
    assert r.returncode == 0, r.stderr
    assert any(x.startswith("rl 2/2  reward ") and "elapsed, ETA 0m00s" in x for x in r.stdout.splitlines()), r.stdout
