"""`stablerl train`: the RL loop (rollout -> rewards -> advantages -> logp_old -> N updates -> sync -> log)."""

from rich.console import Console

from stablerl.commands import add_config_args, add_progress_arg, config_from_args


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start runs/<name>/ over when it holds an earlier run (its metrics, samples, TensorBoard "
                        "events and checkpoints are deleted)")
    add_progress_arg(p)


def run(args) -> int:
    from stablerl.trainer import train

    cfg = config_from_args(args)
    res = train(cfg, resume=args.resume, show_progress=not args.no_progress, overwrite=args.overwrite)
    acc = "-" if res.final_accuracy is None else f"{res.final_accuracy:.1%}"
    Console().print(f"[bold]train[/bold] {cfg.name}: {res.steps} steps, held-out accuracy {acc}, "
                    f"{res.seconds:.0f}s -> {res.run_dir}")
    return 0
