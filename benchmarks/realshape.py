"""One SFT step and one RL step of a real-shape model (random weights, no download) on this machine, micro-batched.

    python benchmarks/realshape.py [--model qwen3-0.6b] [--micro 2] [--responses 8] [--tokens 32]

Each stage runs in a fresh process (its peak RSS is its own): `stablerl sft` for one step of `--responses` traces,
then `stablerl train` for one RL step of `--responses` responses (B x 4) of up to `--tokens` tokens, both with
`micro_batch_size=--micro` and the held-out evaluation cut to 2 problems. The model is built and saved first with a
tokenizer covering its whole vocabulary (benchmarks/memory.py), so that sampled ids decode to text: the RL reward is
the parity of the completion's characters, and about half the groups have signal, so the update runs.
Prints each stage's wall time, step time and peak RSS; writes benchmarks/results/realshape.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from stablerl.config import load_config
from stablerl.hf import save_model
stage, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.perf_counter()
if stage == "build":  # random weights of the preset's shape, with a tokenizer that covers its whole vocabulary
    from memory import filler_tokenizer
    from stablerl.model import PRESETS, build_model
    model = build_model(PRESETS[overrides[0]], seed=0)
    save_model(model, overrides[1], filler_tokenizer(model.config.vocab_size))
    json.dump({"stage": stage, "seconds": time.perf_counter() - t0, "metrics": [],
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, open(out, "w"))
    sys.exit()
cfg = load_config(None, overrides)
if stage == "sft":
    from stablerl.sft import run_sft
    run_sft(cfg, show_progress=False)
else:
    from stablerl.trainer import train
    train(cfg, show_progress=False)
rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
json.dump({"stage": stage, "seconds": time.perf_counter() - t0, "metrics": rows,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, open(out, "w"))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/realshape.json")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"out_dir={tmp}", f"model={tmp}/init", f"engine.max_new_tokens={args.tokens}", "task.n_heldout=2",
                  "task.n_train=64", "engine.numerics=bf16"]
        stages = {
            "build": [args.model, f"{tmp}/init"],
            "sft": [*common, "name=sft", "sft.steps=1", f"sft.batch_size={args.responses}", "sft.style=long",
                    f"sft.micro_batch_size={args.micro}", "sft.eval_every=0"],
            "rl": [*common, "name=rl", "train.steps=1", f"train.batch_prompts={args.responses // 4}",
                   "train.group_size=4", f"train.micro_batch_size={args.micro}", "train.eval_every=0",
                   "train.save_every=0", "train.fidelity_every=0", "task.reward=memory:parity"],
        }
        for stage, overrides in stages.items():
            out = Path(tmp) / f"{stage}.json"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, stage, str(out), *overrides], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{stage}: failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            res = json.loads(out.read_text())
            res["process_seconds"] = time.perf_counter() - t0
            step = [m for m in res.pop("metrics") if "time/step" in m or "sft/loss" in m]
            res["step"] = step[0] if step else {}
            results.append(res)
            timing = {k: round(v, 1) for k, v in res["step"].items() if k.startswith("time/")}
            print(f"{stage}: peak RSS {res['peak_rss_gib']:.2f} GiB, {res['seconds']:.0f} s in all "
                  f"(model load, eval, save included){', step ' + str(timing) if timing else ''}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "model": args.model, "micro_batch_size": args.micro, "responses": args.responses, "max_tokens": args.tokens,
        "stages": results}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
