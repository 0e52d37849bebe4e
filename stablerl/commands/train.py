"""`stablerl train`: the RL loop (rollout -> rewards -> advantages -> logp_old -> N updates -> sync -> log).

`--nproc P` runs it data-parallel on this machine: it launches `python -m torch.distributed.run --standalone
--nproc-per-node P -m stablerl train <the same arguments>`, exactly what one would type (docs/scaling.md; several
machines: torchrun with --nnodes directly)."""

import os
import subprocess
import sys

from rich.console import Console

from stablerl.commands import add_config_args, add_progress_arg, config_from_args
from stablerl.errors import UserError


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start runs/<name>/ over when it holds an earlier run (its metrics, samples, TensorBoard "
                        "events and checkpoints are deleted)")
    p.add_argument("--nproc", type=int, default=None, metavar="P",
                   help="data-parallel over P local processes (torchrun; train.parallel=ddp|fsdp; "
                        "train.batch_prompts must be a multiple of P)")
    add_progress_arg(p)


def launch_command(args) -> list[str]:
    """The torchrun command line that runs this same `stablerl train` on `args.nproc` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "stablerl", "train"]
    if args.config:
        cmd += ["--config", args.config]
    cmd += [f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                            ("--no-progress", args.no_progress), ("--debug", getattr(args, "debug", False))) if on]
    return cmd + list(args.overrides)


def run(args) -> int:
    under_torchrun = "LOCAL_RANK" in os.environ
    if args.nproc is not None and not under_torchrun:
        if args.nproc < 1:
            raise UserError(f"--nproc: got {args.nproc}, expected >= 1 processes")
        config_from_args(args)  # a bad config fails here, once, not in P processes
        rc = subprocess.call(launch_command(args))
        if rc:
            # torchrun has printed which rank failed first and why (its error, or the signal that killed it); the
            # other ranks were stopped by torchrun
            Console(stderr=True).print(f"train: the {args.nproc}-process job failed (exit {rc}); the first failing "
                                       "rank's error is above")
        return rc
    from stablerl.trainer import train

    cfg = config_from_args(args)
    res = train(cfg, resume=args.resume, show_progress=not args.no_progress, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        acc = "-" if res.final_accuracy is None else f"{res.final_accuracy:.1%}"
        peak = "" if res.peak_rss_gib is None else f", peak RSS {res.peak_rss_gib:.2f} GiB"
        Console().print(f"[bold]train[/bold] {cfg.name}: {res.steps} steps, held-out accuracy {acc}, "
                        f"{res.seconds:.0f}s{peak} -> {res.run_dir}")
    return 0
