"""Time per RL global step, broken into rollout / rewards / old logprobs / updates / sync (default recipe).

    python benchmarks/step.py [--init runs/quickstart-sft/model] [--steps 6] [KEY=VALUE ...]

Runs the real trainer for a few steps (eval and checkpoints off) and reads the `time/*` metrics it logged;
the first step is reported separately (warm-up) and the rest averaged. Writes benchmarks/results/step.json.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from stablerl.config import load_config
from stablerl.metrics import read_metrics
from stablerl.trainer import train

PARTS = ["time/rollout", "time/rewards", "time/old_logprobs", "time/updates", "time/sync", "time/step"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="runs/quickstart-sft/model", help="cold-start checkpoint (else random tiny-moe)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="benchmarks/results/step.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    init = [f"init={args.init}"] if Path(args.init).exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out_dir={tmp}", "name=bench", f"train.steps={args.steps}", "train.eval_every=0",
                                 "train.save_every=0", "train.fidelity_every=0", "task.n_heldout=1", *init,
                                 *args.overrides])
        train(cfg, show_progress=False)
        rows = [r for r in read_metrics(Path(tmp) / "bench" / "metrics.jsonl") if "time/step" in r]
    steady = rows[1:] or rows
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "recipe": {"loss": cfg.algo.loss, "B": cfg.train.batch_prompts, "G": cfg.train.group_size,
                   "N": cfg.train.n_minibatches, "engine": cfg.engine.numerics, "trainer": cfg.train.dtype,
                   "max_new_tokens": cfg.engine.max_new_tokens, "init": cfg.init or cfg.model},
        "first_step": {k: rows[0][k] for k in PARTS},
        "steady_mean": {k: statistics.mean(r[k] for r in steady) for k in PARTS},
        "mean_response_tokens": statistics.mean(r["length/mean"] for r in steady),
        "steps": len(rows),
    }
    total = result["steady_mean"]["time/step"]
    print(f"{'part':<18}{'seconds':>10}{'share':>9}")
    for k in PARTS:
        v = result["steady_mean"][k]
        print(f"{k[5:]:<18}{v:>10.3f}{v / total:>9.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
