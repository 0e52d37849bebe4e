"""`stablerl report DIRS... [--out DIR] [--study FILE] [--copy-runs]`: the report of run directories or a study
(stablerl.study.report)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from stablerl.study.definition import load_study
from stablerl.study.report import copy_runs, find_runs, plan_copy, write_report


def add_arguments(p) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or a study's directory (<out>/<study>)")
    p.add_argument("--out", default=None, help="where to write report.md and the plots (default docs/results/<study "
                   "name>, or docs/results/report)")
    p.add_argument("--study", default=None, help="a study YAML whose cells and findings to apply to DIRS")
    p.add_argument("--copy-runs", action="store_true", help="also copy the finished runs' small files (config, "
                   "metrics, summary, logs; the cold starts with their model) to OUT/kept: the report can be re-made "
                   "from them, and the study continued (docs/reproduce.md)")


def run(args) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = args.out
    if out is None:
        study, _, _ = find_runs(dirs)
        name = load_study(args.study).name if args.study else study.name if study else "report"
        out = Path("docs/results") / name
    plan = plan_copy(dirs, Path(out) / "kept") if args.copy_runs else None  # refusals before anything is written
    path = write_report(dirs, Path(out), args.study)
    Console().print(f"[bold]report[/bold]: {path}")
    if plan is not None:
        n = copy_runs(plan)
        Console().print(f"[bold]kept[/bold]: {n} finished runs and the built cold starts in {Path(out) / 'kept'}")
    return 0
