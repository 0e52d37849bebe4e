"""Training–inference mismatch by engine numerics (DESIGN E3/E7, issue 4 acceptance 2).

For each numerics policy the engine samples responses (temperature 1, no truncation), then the training forward
(fp32, no replay) scores the same tokens. Per response token, with r = log π − log μ:
  k1 = mean(−r), k3 = mean(e^r − 1 − r) (an unbiased, ≥ 0 estimate of KL(μ‖π)), max |r|;
per MoE layer, routing disagreement = the fraction of tokens (prompt and response) whose top-K expert *set*
differs between the engine and the training forward.

Models: the random-init tiny MoE ("random"), the same with router weights x10 ("sharp-router": a random router's
near-uniform probabilities make every rounding flip experts; a trained router is more decided), and any
checkpoint directories given with --checkpoint (e.g. runs/<name>/checkpoints/step_000040).

    python benchmarks/numerics.py
    python benchmarks/numerics.py --checkpoint runs/quickstart-rl/checkpoints/step_000040
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from stablerl.engine import NUMERICS, Engine
from stablerl.hf import get_model
from stablerl.sampling import token_logprobs
from stablerl.sequences import pack, response_logits


def prompts_for(n: int) -> list[str]:
    """Held-out prompts of the built-in arith task (what the tiny models are trained on)."""
    from stablerl.tasks import get_task

    return [e.prompt for e in get_task("arith").heldout(n, seed=0)]


@torch.no_grad()
def mismatch(model, tok, numerics: str, prompts: list[str], n: int, max_new: int, seed: int) -> dict:
    ro = Engine(model, tok, numerics=numerics).generate(prompts, n=n, max_new_tokens=max_new, seed=seed)
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], tok.pad_id)
    out = model(packed.ids)
    mask = packed.mask  # (N, T)
    logp = token_logprobs(response_logits(out.logits, packed), packed.targets)  # (N, T) log π, fp32 trainer
    r = (logp - ro.logp_infer[:, : mask.shape[1]])[mask]  # log π/μ per response token
    row = {"numerics": numerics, "tokens": int(mask.sum()), "k1": float((-r).mean()),
           "k3": float((r.exp() - 1 - r).mean()), "max_abs_log_ratio": float(r.abs().max())}
    if ro.routes_infer is not None:
        differ, count = 0, 0
        for i in range(len(ro.texts)):
            P, T = len(ro.prompt_ids[i]), int(ro.lengths[i])
            mine = torch.cat([ro.prompt_routes[i], ro.routes_infer[i, :T]]).sort(-1).values  # (P+T, L, K)
            train = out.routes[i, : P + T].sort(-1).values
            differ = differ + (mine != train).any(-1).sum(0)  # (L,)
            count += P + T
        row["route_disagreement"] = [float(d) / count for d in differ]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", default=[], help="also measure this checkpoint directory")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/numerics.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = prompts_for(args.prompts)
    models = {}
    random, tok = get_model("tiny-moe", seed=0)
    models["random"] = (random.eval(), tok)
    sharp, _ = get_model("tiny-moe", seed=0)
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.mlp.gate.weight.mul_(10)
    models["sharp-router"] = (sharp.eval(), tok)
    for ckpt in args.checkpoint:
        m, t = get_model(ckpt)
        models[ckpt] = (m.eval(), t)
    report = {"setup": {**{k: v for k, v in vars(args).items() if k != "out"}, "task": "arith held-out",
                        "sampling": "temperature 1, no truncation", "trainer": "fp32, no routing replay"},
              "results": []}
    for name, (model, tok) in models.items():
        for numerics in NUMERICS:
            row = {"model": name, **mismatch(model, tok, numerics, prompts, args.n, args.max_new_tokens, args.seed)}
            report["results"].append(row)
            routes = " ".join(f"{d:.2%}" for d in row.get("route_disagreement", []))
            print(f"{name:>14} {numerics:>5}: k3 {row['k3']:.2e}  k1 {row['k1']:+.2e}  max|r| "
                  f"{row['max_abs_log_ratio']:.3f}  route disagreement per layer [{routes}]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["loadavg"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
