"""Update-phase FLOP/s on `small-moe` against this machine's matmul peak, both measured in the same run.

    python benchmarks/mfu.py [--model small-moe] [--rows 16] [--tokens 256] [--iters 3] [--micro 0] [--dtype fp32]

The update phase is what an E8 mini-batch costs: forward through the chunked LM head (stablerl.sequences.
policy_logprobs), the MiniRL loss (E5) and the backward pass. Its FLOPs are counted by torch's own FlopCounterMode on
one pass (matmuls, attention, in forward and backward), then the pass is timed `--iters` times. The peak is the best
of square GEMMs (512..4096) in the same dtype, measured before and after the timing. MFU = achieved FLOP/s / peak
FLOP/s. Writes benchmarks/results/mfu.json.
"""

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stablerl.algorithm import policy_loss
from stablerl.hf import get_model
from stablerl.sequences import pack, policy_logprobs, select


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048, 4096), reps: int = 5) -> float:
    """Best FLOP/s of square GEMMs in `dtype` over a few sizes (the machine's practical peak for this library)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-moe")
    p.add_argument("--rows", type=int, default=16, help="responses in the mini-batch")
    p.add_argument("--tokens", type=int, default=256, help="response tokens per row (after a 32-token prompt)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--micro", type=int, default=0, help="micro-batch rows (0 = the whole mini-batch at once)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    p.add_argument("--out", default="benchmarks/results/mfu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, _ = get_model(args.model, seed=0)
    model.train()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (32,), generator=g).tolist() for _ in range(args.rows)]
    responses = [torch.randint(3, V, (args.tokens,), generator=g).tolist() for _ in range(args.rows)]
    packed = pack(prompts, responses, pad_id=0)
    adv = torch.randn(args.rows, generator=g)  # (N,)
    with torch.no_grad():
        logp_old = policy_logprobs(model, packed).logp  # (N, T)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    hp = dict(eps_low=0.2, eps_high=0.28, max_tokens=args.tokens)

    def update_pass():
        rows = torch.arange(args.rows)
        for part in rows.split(args.micro or args.rows):
            sub = select(packed, part)
            with amp():
                logp = policy_logprobs(model, sub).logp
            out = policy_loss("minirl", logp, logp_old[part], logp_old[part], adv[part], sub.mask, **hp)
            (out.loss * len(part) / args.rows).backward()
        model.zero_grad(set_to_none=True)

    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak_before = matmul_peak(dt)  # before and after the update timing: the best of both (a busy moment lowers one)
    update_pass()  # warm-up
    with FlopCounterMode(display=False) as counter:
        update_pass()
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        update_pass()
        times.append(time.perf_counter() - t0)
    step = min(times)
    peak = max(peak_before, matmul_peak(dt))
    achieved = flops / step
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": args.model, "params": model.num_params(), "active_params": model.num_params(active=True),
        "rows": args.rows, "response_tokens": args.tokens, "micro": args.micro, "dtype": args.dtype,
        "update_flops": flops, "update_seconds_best": step, "update_seconds_all": times,
        "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak, "mfu": achieved / peak,
    }
    print(f"{args.model}: {model.num_params() / 1e6:.0f}M params ({model.num_params(active=True) / 1e6:.0f}M active), "
          f"{args.rows} x ({32 + args.tokens}) tokens, {args.dtype}")
    print(f"update pass: {flops / 1e9:.1f} GFLOP in {step:.2f} s = {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul peak ({args.dtype} square GEMMs, best of 512..4096): {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU (update / peak): {achieved / peak:.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
