"""The study executor: plan, size and execute a study's runs as independent `stablerl sft` / `stablerl train`
processes (used by `stablerl study` and `stablerl reproduce`).

Each run is a subprocess with its own torch thread count (OMP_NUM_THREADS), its output in `<run dir>/<kind>.log`,
and, once it ends, a `summary.json` computed from its files (stablerl.study.summary.summarize_run). Finished runs are
skipped, interrupted ones resumed from their newest checkpoint, a failed run is reported in one line while the
others go on, and the exit code is the number of runs that failed (0: all finished). `--executor ray` submits the
same commands as Ray tasks (one CPU per torch thread) instead of local processes; nothing else changes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stablerl.checkpoint import RunLock, config_changes, latest_checkpoint
from stablerl.config import Config, marked, to_yaml
from stablerl.errors import UserError, one_line
from stablerl.study import summary
from stablerl.study.definition import Estimate, Run

# ---- planning: what to do with each run directory -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the executor does with a run: `skip` (finished: its files are kept as they are), `resume` (from its
    newest checkpoint, `stablerl train --resume`), `fresh` (from step 0), `busy` (another process holds its lock:
    left alone) or `conflict` (made with another config: an error before anything runs; nothing is deleted)."""

    run: Run
    action: Literal["skip", "resume", "fresh", "busy", "conflict"]
    reason: str
    steps_done: int = 0

    @property
    def command(self) -> tuple[str, ...]:
        """The `stablerl` arguments to run: --resume goes right after the subcommand, with the other flags."""
        a = self.run.args
        if self.action == "resume":
            return (a[0], "--resume", *a[1:])
        if self.run.kind == "train" and self.run.run_dir.exists():  # a restart replaces the interrupted run's files
            return (a[0], "--overwrite", *a[1:])
        return a




def config_diff(saved: dict, expected: Config, kind: str = "train") -> str | None:
    """'key (was a, now b)' for the first keys that differ, outside those a resume may change (and, for a cold
    start, outside those SFT reads), or None."""
    changed = config_changes(saved, yaml.safe_load(to_yaml(expected)), within=marked("sft") if kind == "sft" else ())
    if not changed:
        return None
    more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
    return ", ".join(changed[:2]) + more


def plan_run(run: Run) -> Plan:
    """Decide from the run directory's files alone. A train run is finished when its summary.json (written by the
    executor when the run ends) says `done` or `aborted` (the NaN guard stopped it: a collapse, a result, not
    retried), or when its metrics.jsonl already holds a row for step train.steps (or ends in an abort) even if the
    summary was never written. Unfinished with a checkpoint: resume; unfinished without one: fresh. A cold start
    (sft) is finished when sft.json and model/config.json exist, else it restarts (SFT has no resume)."""
    d = run.run_dir
    if not d.exists():
        return Plan(run, "fresh", "new")
    if RunLock.held(d):
        return Plan(run, "busy", f"in use by another process ({d / '.lock'})")
    if (d / "config.yaml").exists():
        try:
            saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            saved = None
        diff = config_diff(saved, run.config, run.kind) if isinstance(saved, dict) else "config.yaml unreadable"
        if diff:
            return Plan(run, "conflict", f"{d / 'config.yaml'}: made with another config: {diff}")
    if run.kind == "sft":
        if (d / "sft.json").exists() and (d / "model" / "config.json").exists():
            return Plan(run, "skip", "cold start built", run.steps)
        return Plan(run, "fresh", "cold start unfinished: rebuilt from step 0")
    status, done = summary.run_status(d, run.steps)
    if status == "incomplete" and (d / summary.SUMMARY).exists():  # the files win; a summary adds what they lost
        try:
            status = json.loads((d / summary.SUMMARY).read_text()).get("status", status)
        except (OSError, json.JSONDecodeError):
            pass
    if status in summary.FINISHED:
        return Plan(run, "skip", "finished" if status == "done" else f"aborted at step {done} (NaN guard)", done)
    ckpt = latest_checkpoint(d)
    if ckpt is not None:
        return Plan(run, "resume", f"interrupted at step {done}: resumes from {ckpt.name}", done)
    return Plan(run, "fresh", f"interrupted at step {done} with no checkpoint: restarts from step 0")


# ---- sizing and time ------------------------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_workers(cores: int, jobs: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(processes, torch threads per process), with processes x threads <= cores.

    Oversubscribing is what to avoid: on 2 cores, two 2-thread processes were measured more than 10x slower than
    one (torch's intra-op threads wait on each other). With neither given: one process with every core (each run
    finishes soonest alone). `jobs` alone shares the cores evenly; `threads` alone runs as many processes as fit.
    Both given and over the cores: UserError, never a silent oversubscription."""
    for flag, v in (("--jobs", jobs), ("--threads", threads)):
        if v is not None and v < 1:
            raise UserError(f"{flag}: got {v}, expected >= 1")
    cores = max(1, cores)
    if jobs is None and threads is None:
        return 1, cores
    if jobs is None:
        jobs = max(1, cores // threads)
    if threads is None:
        threads = max(1, cores // jobs)
    if jobs * threads > cores:
        raise UserError(f"--jobs {jobs} x --threads {threads} = {jobs * threads} torch threads on {cores} cores: "
                        "oversubscribed processes were measured >10x slower; lower --jobs or --threads")
    return jobs, threads


def estimate_seconds(plans: list[Plan], est: Estimate, jobs: int, seconds_per_step: float | None = None) -> float:
    """Wall-clock estimate of the runs left: sum over runs of (steps left x seconds per step + per-run overhead),
    divided by the parallel jobs. `seconds_per_step` is the RL step time measured on this study's runs when there
    are any (stablerl.study.summary.measured_step_seconds), else the study's assumed value."""
    total = 0.0
    for p in plans:
        if p.action not in ("fresh", "resume"):
            continue
        left = p.run.steps - (p.steps_done if p.action == "resume" else 0)
        per = est.sft_seconds_per_step if p.run.kind == "sft" else (seconds_per_step or est.seconds_per_step)
        total += left * per + est.seconds_per_run
    return total / max(1, jobs)


# ---- execution --------------------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a run: torch reads OMP_NUM_THREADS at start-up for its intra-op pool (MKL for BLAS)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


RAY_MISSING = "--executor ray: ray is not installed; pip install -e \".[ray]\" (or pip install 'ray>=2.9')"
_RUNNING: dict[int, subprocess.Popen] = {}  # processes this executor started, by pid: stopped on Ctrl-C
_LOCK = threading.Lock()


def run_command(args: list[str], log: str, threads: int, cwd: str) -> tuple[int, float]:
    """Run `stablerl ARGS` with `threads` torch threads, appending its output to `log` -> (exit code, seconds).
    Module-level so that a Ray worker runs exactly what a local thread runs."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stablerl", *args]
    with open(log, "a") as fh:
        fh.write(f"==> {datetime.now(UTC).isoformat(timespec='seconds')} OMP_NUM_THREADS={threads} "
                 f"stablerl {shlex.join(args)}\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=thread_env(threads), cwd=cwd)
        with _LOCK:
            _RUNNING[proc.pid] = proc
        try:
            return proc.wait(), time.perf_counter() - t0
        except BaseException:  # interrupted (ray.cancel): stop the run too
            _stop(proc)
            raise
        finally:
            with _LOCK:
                _RUNNING.pop(proc.pid, None)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s. Safe at any point: checkpoints are written atomically and a resume after
    SIGKILL is exact (README), and SIGTERM reaches a run even where SIGINT is ignored (a background job)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a failed run said last)."""
    lines = [x for x in summary.tail_text(path).splitlines() if x.strip() and not x.startswith("==> ")]
    return one_line(lines[-1])[:300] if lines else "(no output)"


def _last_step(path: Path) -> int:
    """The step of the last complete row of a metrics.jsonl, read from its tail (cheap enough to poll)."""
    for line in reversed(summary.tail_text(path, 2000).splitlines()):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
    return 0


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    status: Literal["done", "aborted", "failed", "blocked"]
    code: int | None  # exit code; None when not run (its cold start failed)
    seconds: float
    detail: str  # one line: final accuracy and collapse, or the failure's last log line


class Pool:
    """Where commands run: local threads each waiting on a subprocess, or Ray tasks (`submit` -> a Future)."""

    def __init__(self, kind: Literal["local", "ray"], jobs: int, threads: int):
        self.threads, self.cwd = threads, os.getcwd()
        if kind == "ray":
            try:
                import ray
            except ImportError:
                raise UserError(RAY_MISSING) from None
            ray.init(ignore_reinit_error=True, log_to_driver=False)  # RAY_ADDRESS joins a running cluster
            self.ray, self.task = ray, ray.remote(num_cpus=threads)(run_command)
        else:
            self.ray, self.local = None, ThreadPoolExecutor(max_workers=jobs)
        self.refs: list = []

    def submit(self, plan: Plan) -> Future:
        args, log = list(plan.command), str(plan.run.log)
        if self.ray is None:
            return self.local.submit(run_command, args, log, self.threads, self.cwd)
        ref = self.task.remote(args, log, self.threads, self.cwd)  # runs on a node that sees the same out dir
        self.refs.append(ref)
        return ref.future()

    def stop(self) -> None:
        """Ctrl-C or SIGTERM: start nothing new, and stop the runs in flight (they keep their checkpoints)."""
        if self.ray is not None:
            for ref in self.refs:
                self.ray.cancel(ref)
            return
        self.local.shutdown(wait=False, cancel_futures=True)
        with _LOCK:
            procs = list(_RUNNING.values())
        for p in procs:
            _stop(p)


def _finish(plan: Plan, code: int, seconds: float, rule) -> Outcome:
    """Record a run that ended: its summary.json from its files, and its one-line outcome."""
    run = plan.run
    if run.kind == "sft":
        ok = code == 0 and (run.run_dir / "sft.json").exists()
        acc = json.loads((run.run_dir / "sft.json").read_text())["heldout_accuracy"] if ok else None
        return Outcome(plan, "done" if ok else "failed", code, seconds,
                       f"cold start: held-out accuracy {acc:.1%}" if ok else f"exit {code}: {last_line(run.log)}")
    s = summary.summarize_run(run.run_dir, rule, exit_code=code, wall_seconds=round(seconds, 1),
                             command="stablerl " + shlex.join(plan.command))
    summary.write_summary(run.run_dir, s)
    if s["status"] == "incomplete" or (code != 0 and s["status"] != "aborted"):
        return Outcome(plan, "failed", code, seconds, f"exit {code}: {last_line(run.log)}")
    acc = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.1%}"
    col = f"collapsed at step {s['collapse']['step']}" if s["collapse"]["collapsed"] else "no collapse"
    return Outcome(plan, s["status"], code, seconds, f"held-out accuracy {acc}, {col}")


def execute(plans: list[Plan], jobs: int, threads: int, executor: Literal["local", "ray"], est: Estimate,
            rule, console: Console, show_progress: bool = True, step_s: float | None = None) -> list[Outcome]:
    """Run the plans that need running: cold starts first (the cells start from them), then the cells. A failed run
    is reported and the others continue; a cell whose cold start failed is not started ('blocked')."""
    todo = [p for p in plans if p.action in ("fresh", "resume")]
    cost = {p.run.name: estimate_seconds([p], est, 1, step_s) for p in todo}  # ETA in estimated seconds of work
    outcomes: list[Outcome] = []
    pool = Pool(executor, jobs, threads)
    progress = Progress(TextColumn("study"), BarColumn(), TextColumn("{task.fields[runs]}"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not show_progress)
    t_start = time.time()
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.signal(signal.SIGTERM, _interrupt) if main else None  # `kill` stops the study as Ctrl-C does
    with progress:
        bar = progress.add_task("study", total=sum(cost.values()) or 1, runs=f"0/{len(todo)} runs")
        failed_cold: set[str] = set()
        try:
            for kind in ("sft", "train"):
                futures: dict[Future, Plan] = {}
                for p in (p for p in todo if p.run.kind == kind):
                    if p.run.needs in failed_cold:
                        outcomes.append(Outcome(p, "blocked", None, 0.0, f"its cold start {p.run.needs} failed"))
                        console.print(f"[red]not run[/red] {p.run.name}: {outcomes[-1].detail}")
                        continue
                    futures[pool.submit(p)] = p
                while futures:
                    done, _ = wait(list(futures), timeout=2.0, return_when=FIRST_COMPLETED)
                    for fut in done:
                        p = futures.pop(fut)
                        try:
                            o = _finish(p, *fut.result(), rule)
                        except Exception as e:  # the process could not start, or the Ray task died
                            o = Outcome(p, "failed", None, 0.0, f"{type(e).__name__}: {one_line(e)}")
                        outcomes.append(o)
                        failed_cold |= {p.run.name} if p.run.kind == "sft" and o.status == "failed" else set()
                        color = {"done": "green", "aborted": "yellow"}.get(o.status, "red")
                        console.print(f"[{color}]{o.status}[/{color}] {p.run.name} ({o.seconds:.0f}s): {o.detail}")
                    ran = sum(cost[o.plan.run.name] for o in outcomes)
                    ran += sum(cost[p.run.name] * _fraction(p, t_start) for p in futures.values())
                    progress.update(bar, completed=ran, runs=f"{len(outcomes)}/{len(todo)} runs")
        except KeyboardInterrupt:
            pool.stop()
            console.print("stopped: the same command resumes the unfinished runs; finished ones are kept")
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, on_term)
    return outcomes


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _fraction(p: Plan, since: float) -> float:
    """How far a run in flight is, from the step of the last row its metrics.jsonl has (rows written before `since`
    are a previous attempt's: the run has not started yet)."""
    path = p.run.run_dir / "metrics.jsonl"
    if not path.exists() or path.stat().st_mtime < since:
        return 0.0
    start = p.steps_done if p.action == "resume" else 0
    return min(1.0, max(0, _last_step(path) - start) / max(1, p.run.steps - start))
