"""`stablerl study FILE.yaml` (and `stablerl reproduce`): plan, size and execute a study's runs as independent
`stablerl sft` / `stablerl train` processes (stablerl.executor), then write the report."""

from __future__ import annotations

import importlib.util
import shlex
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stablerl import report
from stablerl.commands import add_progress_arg
from stablerl.errors import UserError
from stablerl.executor import RAY_MISSING, Plan, available_cores, estimate_seconds, execute, plan_run, plan_workers
from stablerl.grid import Estimate, Study, expand, load_study, select_cells

# ---- the command ------------------------------------------------------------------------------------------------


def add_study_arguments(p, out: str) -> None:
    """The options `stablerl study` and `stablerl reproduce` share."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every run, after the study's own (e.g. train.steps=2 for a smoke test)")
    p.add_argument("--out", default=out, help=f"runs go to OUT/<study>/<cell>/seed<k> (default {out})")
    p.add_argument("--cells", default=None, help="only these cells (comma-separated, globs allowed: 'offpolicy_N4_*')")
    p.add_argument("--jobs", "-j", type=int, default=None, help="runs at once (default 1; jobs x threads <= cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local processes, or Ray tasks (pip install -e \".[ray]\"; RAY_ADDRESS joins a cluster)")
    p.add_argument("--dry-run", action="store_true", help="print the runs, what would be done and the expected time")
    p.add_argument("--report", default=None, help="write the report here (default docs/results/<study>)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    add_progress_arg(p)


def add_arguments(p) -> None:
    p.add_argument("study", help="a study YAML file (format: docs/reproduce.md)")
    add_study_arguments(p, "runs")


def run(args) -> int:
    return run_study(load_study(args.study), args, f"stablerl study {shlex.quote(args.study)}")


def _describe(plans: list[Plan], jobs: int, threads: int, est: Estimate, console: Console, dry: bool,
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
    """Expand, check, plan, (run), report. Everything that can be wrong with the study or a run directory is found
    before the first run starts."""
    console = Console(soft_wrap=True)  # one line per run outcome, also in log files
    if args.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError(RAY_MISSING)
    jobs, threads = plan_workers(available_cores(), args.jobs, args.threads)
    if args.executor == "ray" and args.threads is None:
        threads = 1  # Ray places tasks by CPUs: each node holds tasks x threads <= its CPUs
    cells = select_cells(study, [c.strip() for c in args.cells.split(",")] if args.cells else None)
    runs = expand(study, args.out, args.overrides, cells)
    rule = report.collapse_rule(study.collapse)
    plans = [plan_run(r) for r in runs]
    conflicts = [p for p in plans if p.action == "conflict"]
    if conflicts:
        more = f" ({len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UserError(f"{conflicts[0].reason}{more}; nothing was run or deleted: use another --out, or move that "
                        "run directory away")
    for p in plans:
        if p.action == "busy":
            console.print(f"[yellow]skipped {p.run.name}: {p.reason}[/yellow]")
    measured = report.measured_step_seconds([p.run.run_dir for p in plans if p.run.kind == "train"])
    _describe(plans, jobs, threads, study.estimate, console, args.dry_run, measured)
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
        from stablerl.commands.report import write_report

        path = write_report([root], Path(args.report or Path("docs/results") / study.name))  # quotes commands.log
        console.print(f"report: {path}")
    console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} runs finished, {len(failed)} failed")
    return min(len(failed), 99)
