"""`stablerl sft`: cold-start supervised fine-tuning on a task's solution traces."""

from rich.console import Console

from stablerl.commands import add_config_args, add_progress_arg, config_from_args


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--style", default=None, help="trace style long | short | answer, or a per-example mixture such as "
                   "long:0.4,answer:0.6 (overrides sft.style)")
    p.add_argument("--name", default=None, help="run name (overrides name); output goes to runs/<name>/")
    add_progress_arg(p)


def run(args) -> int:
    from stablerl.sft import run_sft

    extra = ([f"sft.style={args.style}"] if args.style else []) + ([f"name={args.name}"] if args.name else [])
    args.overrides = list(args.overrides) + extra
    cfg = config_from_args(args)
    res = run_sft(cfg, show_progress=not args.no_progress)
    Console().print(f"[bold]sft[/bold] {cfg.sft.style}: held-out greedy accuracy [bold]{res.accuracy:.1%}[/bold], "
                    f"loss {res.final_loss:.3f}, {res.seconds:.0f}s -> {res.checkpoint}")
    return 0
