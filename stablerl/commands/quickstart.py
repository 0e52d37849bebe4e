"""`stablerl quickstart`: cold-start SFT (built once, reused) then RL with the default recipe, then a summary.

Default recipe: MiniRL (E5), on-policy (N = 1), bf16 inference engine / fp32 trainer, tiny-moe, the `arith` task.
A pretrained checkpoint (`model=` not a preset, e.g. `--config recipes/smollm2.yaml`, `model=smollm2`) needs no cold
start: RL starts from it directly.
"""

import json
import resource
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from stablerl.commands import add_config_args, add_progress_arg
from stablerl.config import load_config
from stablerl.model import PRESETS

LOW_COLD_START = 0.05  # held-out accuracy under which the cold start's SFT did not take


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--rebuild-cold-start", action="store_true", help="re-run the SFT cold start even if it exists")
    add_progress_arg(p)


def run(args) -> int:
    from stablerl.sft import run_sft

    console = Console()
    t0 = time.perf_counter()
    base = load_config(args.config, args.overrides)
    if base.model not in PRESETS and base.init is None:
        return _pretrained(base, args, console, t0)
    sft_cfg = replace(base, name=f"{base.name}-sft" if base.name != "run" else "quickstart-sft")
    cold = sft_cfg.run_dir() / "model"
    if args.rebuild_cold_start or not (cold / "config.json").exists():
        console.rule("cold start: supervised fine-tuning on solution traces")
        res = run_sft(sft_cfg, show_progress=not args.no_progress)
        console.print(f"cold start: held-out greedy accuracy {res.accuracy:.1%} ({res.seconds:.0f}s) -> {cold}")
    else:
        console.print(f"cold start: reusing {cold} (--rebuild-cold-start to redo it)")
    sft_summary = sft_cfg.run_dir() / "sft.json"
    cold_acc = json.loads(sft_summary.read_text())["heldout_accuracy"] if sft_summary.exists() else None
    if cold_acc is not None and cold_acc < LOW_COLD_START:
        # the SFT curve of the default task is a steep transition whose place depends on seed and CPU (docs/log.md):
        # a run that has not crossed it gives RL almost no reward to learn from
        console.print(f"[yellow]warning: the cold start scores {cold_acc:.1%} held-out, below "
                      f"{LOW_COLD_START:.0%}: its SFT may not have taken (its learning curve is in "
                      f"{sft_cfg.run_dir() / 'metrics.jsonl'}), and RL will find little reward if so. Rebuild it "
                      f"with --rebuild-cold-start and another seed (seed=N) or more steps (sft.steps=N).[/yellow]")
    rl_cfg = replace(base, name="quickstart" if base.name == "run" else base.name, init=str(cold))
    return _rl(rl_cfg, args, console, t0, str(cold), "cold start")


def _pretrained(base, args, console, t0: float) -> int:
    console.print(f"{base.model}: a pretrained checkpoint, no cold start: RL starts from it")
    return _rl(replace(base, name="quickstart" if base.name == "run" else base.name), args, console, t0, None,
               "start")


def _rl(rl_cfg, args, console, t0: float, cold: str | None, start: str) -> int:
    from stablerl.trainer import train

    console.rule(f"RL: {rl_cfg.algo.loss}, N={rl_cfg.train.n_minibatches}, engine {rl_cfg.engine.numerics}, "
                 f"trainer {rl_cfg.train.dtype}, {rl_cfg.train.steps} steps")
    res = train(rl_cfg, show_progress=not args.no_progress, console=console, overwrite=True)  # a demo: rerun = redo
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    summary = {"cold_start_accuracy": res.initial_accuracy, "final_accuracy": res.final_accuracy,
               "final_eval_step": res.final_eval_step,
               "gain_points": None if res.final_accuracy is None else 100 * (res.final_accuracy - res.initial_accuracy),
               "cold_start_mean_length": res.initial_length, "final_mean_length": res.final_length,
               "rl_steps": res.steps, "rl_seconds": res.seconds, "wall_seconds": wall, "peak_rss_gib": peak_gib,
               "run_dir": str(res.run_dir), "cold_start": cold, "model": rl_cfg.model}
    (res.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    table = Table(title="stablerl quickstart")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(f"held-out accuracy, {start}", f"{res.initial_accuracy:.1%}")
    # a run stopped early (train.on_warning=stop, train.max_rss_frac) ends between evals: say which step this is
    at = "" if res.final_eval_step in (None, res.steps) else f" (its last eval, step {res.final_eval_step})"
    table.add_row(f"held-out accuracy, after RL{at}", f"{res.final_accuracy:.1%}")
    table.add_row("gain", f"{summary['gain_points']:+.1f} points")
    table.add_row(f"greedy response length, {start} -> after RL",
                  f"{res.initial_length:.1f} -> {res.final_length:.1f} tokens")
    table.add_row("RL steps / time", f"{res.steps} / {res.seconds:.0f}s")
    table.add_row("total wall time / peak RSS", f"{wall:.0f}s / {peak_gib:.2f} GiB")
    console.print(table)
    console.print(f"outputs: {res.run_dir}/ (curves.png, metrics.jsonl, tb/, samples.jsonl, checkpoints/); "
                  + (f"cold start: {cold}\n" if cold else "\n") + f"TensorBoard: tensorboard --logdir {res.run_dir}/tb")
    return 0
