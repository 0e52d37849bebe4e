"""`stablerl reproduce [--quick | --full]`: the paper's grid (findings F1-F5, DESIGN §1) as a study, run by the
same executor as `stablerl study`, then the report with a verdict per finding (docs/reproduce.md).

The grid is stablerl/studies/quick.yaml (off-policy N = 4) or full.yaml (N in {2, 4, 8}); its stress setting is
not calibrated yet (see the files). The expected time is printed before anything starts; `--dry-run` stops there.
"""

from stablerl.commands.study import add_study_arguments, run_study
from stablerl.study.definition import STUDIES, load_study


def add_arguments(p) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="off-policy N = 4 only (the default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="off-policy N in {2, 4, 8}")
    add_study_arguments(p, "runs/reproduce")


def run(args) -> int:
    size = args.size or "quick"
    return run_study(load_study(STUDIES / f"{size}.yaml"), args, f"stablerl reproduce --{size}")
