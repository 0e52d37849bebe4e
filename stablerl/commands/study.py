"""`stablerl study FILE.yaml` (and `stablerl reproduce`): run a study's runs, then write the report
(stablerl.study.run)."""

from __future__ import annotations

import shlex

from stablerl.commands import add_progress_arg
from stablerl.study.definition import load_study
from stablerl.study.run import run_study


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
