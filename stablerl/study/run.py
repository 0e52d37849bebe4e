"""Running a study: expand its runs, plan each run directory (skip finished, resume interrupted, start fresh), size
the processes x threads, print the expected time, execute the runs as independent `stablerl sft` / `stablerl train`
processes (stablerl.executor), then write the report (stablerl.study.report). `stablerl study` and
`stablerl reproduce` are this with a study file.
"""

from __future__ import annotations

import importlib.util
import shlex
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stablerl.errors import UserError
from stablerl.executor import RAY_MISSING, Plan, available_cores, estimate_seconds, execute, plan_run, plan_workers
from stablerl.study.definition import Estimate, Study, expand, select_cells
from stablerl.study.report import write_report
from stablerl.study.summary import collapse_rule, measured_step_seconds


def describe(plans: list[Plan], jobs: int, threads: int, est: Estimate, console: Console, dry: bool,
              measured: float | None) -> None:
    """The runs and what will happen to each (all of them in a dry run), and the expected time."""
    todo = [p for p in plans if p.action in ("fresh", "resume")]
    if dry:
        table = Table(title="runs")
        for col in ("run", "kind", "steps", "action", "why"):
            table.add_column(col)
        for p in plans:
            table.add_row(p.run.name, p.run.kind, str(p.run.steps), p.action, p.reason)
        console.print(table)
        for p in todo:
            console.print(f"OMP_NUM_THREADS={threads} stablerl {shlex.join(p.command)}", soft_wrap=True,
                          highlight=False, markup=False)
    sec = estimate_seconds(plans, est, jobs, measured)
    src = f"measured {measured:.2f} s" if measured else f"assumed {est.seconds_per_step:g} s (no run measured yet)"
    skipped = sum(p.action == "skip" for p in plans)
    took = f"{int(sec // 3600)} h {round(sec % 3600 / 60)} min" if sec >= 3600 else f"{max(1, round(sec / 60))} min"
    console.print(f"{len(plans)} runs: {len(todo)} to run ({sum(p.action == 'resume' for p in todo)} resumed), "
                  f"{skipped} finished; {jobs} process(es) x {threads} thread(s). Expected time: {took} ({src} per RL "
                  f"step, {est.sft_seconds_per_step:g} s per SFT step, {est.seconds_per_run:g} s per run)",
                  highlight=False)


def run_study(study: Study, args, command: str) -> int:
    """Expand, check, plan, (run), report; the exit code (the failed runs, at most 99). `args`: the options of
    `stablerl study` (stablerl.commands.study.add_study_arguments); `command`: how the study was named on the command
    line, logged to <out>/<study>/commands.log (the report quotes it). Everything that can be wrong with the study or
    a run directory is found before the first run starts."""
    console = Console(soft_wrap=True)  # one line per run outcome, also in log files
    if args.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError(RAY_MISSING)
    jobs, threads = plan_workers(available_cores(), args.jobs, args.threads)
    if args.executor == "ray" and args.threads is None:
        threads = 1  # Ray places tasks by CPUs: each node holds tasks x threads <= its CPUs
    cells = select_cells(study, [c.strip() for c in args.cells.split(",")] if args.cells else None)
    runs = expand(study, args.out, args.overrides, cells)
    rule = collapse_rule(study.collapse)
    plans = [plan_run(r) for r in runs]
    conflicts = [p for p in plans if p.action == "conflict"]
    if conflicts:
        more = f" ({len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UserError(f"{conflicts[0].reason}{more}; nothing was run or deleted: use another --out, or move that "
                        "run directory away")
    for p in plans:
        if p.action == "busy":
            console.print(f"[yellow]skipped {p.run.name}: {p.reason}[/yellow]")
    measured = measured_step_seconds([p.run.run_dir for p in plans if p.run.kind == "train"])
    describe(plans, jobs, threads, study.estimate, console, args.dry_run, measured)
    if args.dry_run:
        return 0
    root = Path(args.out) / study.name
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(study.text)  # the definition the report reads its cells and findings from
    line = " ".join([command, *map(shlex.quote, args.overrides), "--out", shlex.quote(args.out)]
                    + (["--cells", args.cells] if args.cells else []))
    with (root / "commands.log").open("a") as fh:
        fh.write(f"{datetime.now(UTC).isoformat(timespec='seconds')}\t{line}\n")
    outcomes = execute(plans, jobs, threads, args.executor, study.estimate, rule, console, not args.no_progress,
                       measured)
    failed = [o for o in outcomes if o.status in ("failed", "blocked")]
    for o in failed:
        console.print(f"[red]FAILED[/red] {o.plan.run.name}: {o.detail} (log: {o.plan.run.log})", highlight=False)
    if not args.no_report:
        path = write_report([root], Path(args.report or Path("docs/results") / study.name))  # quotes commands.log
        console.print(f"report: {path}")
    console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} runs finished, {len(failed)} failed")
    return min(len(failed), 99)
