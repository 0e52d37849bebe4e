"""Rollout throughput: the stablerl engine vs `transformers` `generate` on the same weights (DESIGN §3).

The same tiny MoE (random init, seed 0) is saved with `stablerl.hf.save_model` and loaded by
`Qwen3MoeForCausalLM.from_pretrained`; both sample B prompts x T new tokens at temperature 1 with no truncation
and no early stop (HF: min_new_tokens = max_new_tokens; engine: ignore_eos), in one process, one after the other,
with the same thread count. HF is measured with the experts implementation `from_pretrained` picks by default
("grouped_mm" in transformers 5) and with "eager" (a loop over experts, faster on CPU in fp32); the ratio is
reported against each and against the faster of the two. Tokens/s counts new tokens over the wall time of the
whole generate call (prefill included).

    python benchmarks/rollout.py                      # batch 64, 128 new tokens, fp32 and bf16
    python benchmarks/rollout.py --threads 1,2 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from stablerl.engine import Engine
from stablerl.hf import get_model, save_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn, repeats: int, budget_s: float) -> float:
    """Best wall time of up to `repeats` calls (fewer when one call already takes longer than `budget_s`)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens including BOS (all prompts alike)")
    ap.add_argument("--numerics", default="fp32,bf16")
    ap.add_argument("--hf-impl", default="grouped_mm,eager", help="transformers experts implementations to time")
    ap.add_argument("--threads", default=None, help="torch thread counts to run, e.g. 1,2 (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="stop repeating a config after this many seconds")
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args()

    import transformers

    model, tok = get_model(args.model, seed=0)
    model.eval()
    ckpt = Path(tempfile.mkdtemp(prefix="stablerl-bench-")) / "model"
    save_model(model, ckpt, tok)
    gen = torch.Generator().manual_seed(0)
    chars = torch.randint(33, 127, (args.batch, args.prompt_len - 1), generator=gen)
    prompts = ["".join(map(chr, row.tolist())) for row in chars]
    ids = torch.tensor([tok.encode_prompt(p) for p in prompts])  # (B, P), same length: no padding on either side
    assert ids.shape == (args.batch, args.prompt_len)
    new = args.batch * args.new_tokens
    impls = args.hf_impl.split(",")
    load_before = os.getloadavg()
    results = []
    for threads in [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for numerics in args.numerics.split(","):
            row = {"threads": threads, "numerics": numerics}
            engine = Engine(model, tok, numerics=numerics)

            def run_engine(engine=engine):
                ro = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
                assert int(ro.mask.sum()) == new

            run_engine()  # warm-up (allocator, kernels)
            row["engine_tok_s"] = new / timed(run_engine, args.repeats, args.budget)
            for impl in impls:
                hf = transformers.Qwen3MoeForCausalLM.from_pretrained(ckpt, dtype=DTYPES[numerics],
                                                                      experts_implementation=impl).eval()
                kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          pad_token_id=tok.pad_id, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

                def run_hf(hf=hf, kw=kw):
                    with torch.inference_mode():
                        out = hf.generate(ids, **kw)
                    assert out.shape == (args.batch, args.prompt_len + args.new_tokens)

                with torch.inference_mode():
                    hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
                row[f"hf_{impl}_tok_s"] = new / timed(run_hf, args.repeats, args.budget)
                row[f"ratio_vs_hf_{impl}"] = row["engine_tok_s"] / row[f"hf_{impl}_tok_s"]
                del hf
            row["ratio_vs_fastest_hf"] = row["engine_tok_s"] / max(row[f"hf_{impl}_tok_s"] for impl in impls)
            row["loadavg"] = os.getloadavg()[0]
            results.append(row)
            print(f"{threads} thread(s) {numerics}: engine {row['engine_tok_s']:,.0f} tok/s | "
                  + " | ".join(f"HF {impl} {row[f'hf_{impl}_tok_s']:,.0f} tok/s (x{row[f'ratio_vs_hf_{impl}']:.1f})"
                               for impl in impls)
                  + f" | vs fastest HF x{row['ratio_vs_fastest_hf']:.1f} | load {row['loadavg']:.2f}", flush=True)
    report = {
        "setup": {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens,
                  "prompt_len": args.prompt_len, "sampling": "temperature 1, no truncation, no early stop"},
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version()},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"load average before {load_before[0]:.2f}, after {report['machine']['loadavg_after'][0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
