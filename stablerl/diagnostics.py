"""Diagnostics: pure functions (no grad, no state) that say whether the first-order approximation still holds.

Each returns a flat dict with namespaced keys (`kl/`, `entropy/`, `route/`, `fidelity/`, ...); docs/metrics.md
gives each one's formula, expected range and what a change means. They read tensors the trainer already has.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stablerl.algorithm import cosine, first_order_gradients, sequence_gradient


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    if weight is None:
        return float((x * mask).sum() / mask.sum().clamp(min=1))
    w = mask * weight[:, None]  # (N, T) row weights on the tokens
    return float((x * w).sum() / w.sum().clamp(min=1e-12))


@torch.no_grad()
def entropy(logp_full: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean entropy of the full sampling distribution over response tokens; logp_full (N, T, V)."""
    p = logp_full.exp()
    h = -(p * logp_full.masked_fill(p == 0, 0.0)).sum(-1)  # (N, T)
    return {"entropy/mean": _masked_mean(h, mask)}


@torch.no_grad()
def train_inference_kl(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor,
                       logp_full_train: torch.Tensor | None = None,
                       logp_full_infer: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None) -> dict[str, float]:
    """KL(μ || π) between the inference engine μ (which sampled) and the trainer π on the sampled tokens (E3).

    k1 = log μ − log π (unbiased, noisy, can be negative); k3 = (π/μ) − 1 − log(π/μ) (unbiased, ≥ 0, low variance).
    With both full distributions (small vocabularies), the exact per-token KL as well. `weight` (N,): row weights
    of the means (a subsample standing for more rows); None = every row once.
    """
    log_ratio = (logp_train - logp_infer).masked_fill(~mask, 0.0)  # (N, T) log π/μ
    out = {
        "kl/k1": _masked_mean(-log_ratio, mask, weight),
        "kl/k3": _masked_mean(log_ratio.exp() - 1 - log_ratio, mask, weight),
        "kl/max_abs_log_ratio": float(log_ratio.abs().max()),
    }
    if logp_full_train is not None and logp_full_infer is not None:
        p_mu = logp_full_infer.exp()
        kl = (p_mu * (logp_full_infer - logp_full_train)).nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1)  # (N, T)
        out["kl/exact"] = _masked_mean(kl, mask, weight)
    return out


@torch.no_grad()
def routing_agreement(a: torch.Tensor | None, b: torch.Tensor | None, token_mask: torch.Tensor,
                      prefix: str, weight: torch.Tensor | None = None) -> dict[str, float]:
    """Fraction of tokens whose expert *set* is identical in `a` and `b`, per MoE layer; routes (N, S, L, K).
    `weight` (N,): row weights (a subsample standing for more rows); None = every row once."""
    if a is None or b is None:
        return {}
    same = (a.sort(-1).values == b.sort(-1).values).all(-1).float()  # (N, S, L)
    m = token_mask[..., None].float() if weight is None else token_mask[..., None] * weight[:, None, None]
    per_layer = (same * m).sum((0, 1)) / m.sum((0, 1)).clamp(min=1)  # (L,)
    out = {f"{prefix}/layer{i}": float(v) for i, v in enumerate(per_layer)}
    out[f"{prefix}/mean"] = float(per_layer.mean())
    return out


@torch.no_grad()
def reward_stats(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """rewards (B, G); lengths (N,) response tokens; truncated (N,) bool, hit max_new_tokens."""
    zero_std = (rewards.std(dim=1, unbiased=False) == 0).float()  # (B,) groups that give no signal under E4
    return {
        "reward/mean": float(rewards.mean()),
        "reward/accuracy": float((rewards >= 1).float().mean()),
        "reward/zero_std_frac": float(zero_std.mean()),
        "length/mean": float(lengths.float().mean()),
        "length/max": float(lengths.max()),
        "length/truncated_frac": float(truncated.float().mean()),
    }


def fidelity(logp: torch.Tensor, logp_infer: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
             params: list[torch.Tensor], retain_graph: bool = False,
             reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
             logp_own: torch.Tensor | None = None, mask_own: torch.Tensor | None = None) -> dict[str, float]:
    """E9: cos(g_seq, g_tok) on a probe batch, with mean/max |log W_i| saying how far from first order it is.

    `logp` (N, T) must carry the graph of the current policy as the update computes it; costs two backward passes
    over it. `logp_own` (N, T), with its graph: the same tokens under the router's own choice, when the update
    replays routes (E7), and `mask_own` their response tokens (default `mask`). Routing Replay differentiates a
    policy other than π_θ, so the true objective's sequence-level gradient g_seq(own) is taken under `logp_own`
    (one more backward pass):
    - "fidelity/replay_cosine" = cos(g_seq(own), g_tok): how far the update's direction is from the true objective's,
      the first-order error and the replay's bias together (without replay it is "fidelity/cosine");
    - "fidelity/routing_bias_cosine" = cos(g_seq(own), g_seq): the replay's bias alone (1 without replay).
    A sampled token π_θ's own routing gives probability 0 (truncated sampling) makes W_i = 0: its row drops out of
    g_seq(own). `reduce(x, op)` ("sum" | "max" over the ranks of a data-parallel job, stablerl.distributed): each
    rank passes its rows of the probe batch (N may be 0) and every rank gets the statistics of all of them together.
    """
    params = list(params)
    reduce = reduce or (lambda x, op: x)  # one process: its rows are all the rows
    log_w = (logp.detach() - logp_infer).masked_fill(~mask, 0.0).sum(1)  # (n,) this rank's log W_i
    here = bool(mask.any())
    # g_seq and g_tok are sums over rows, so the ranks' parts add up once every rank scales W by the same max
    top = reduce(_max_or(log_w, here, float("-inf")), "max")
    if here:
        g_seq, g_tok = first_order_gradients(logp, logp_infer, adv, mask, params, retain_graph=retain_graph,
                                             log_scale=top)
    else:  # no rows here: zeros in the gradients' layout (every parameter, flattened in order)
        g_seq = g_tok = _zeros(params, log_w.device)
    g_seq, g_tok = reduce(g_seq, "sum"), reduce(g_tok, "sum")
    counts = reduce(log_w.new_tensor([float(log_w.abs().sum()), float(len(log_w))], dtype=torch.float64), "sum")
    out = {
        "fidelity/cosine": cosine(g_seq, g_tok),
        "fidelity/abs_log_W_mean": float(counts[0] / counts[1].clamp(min=1)),
        "fidelity/abs_log_W_max": float(reduce(_max_or(log_w.abs(), len(log_w) > 0, 0.0), "max")),
    }
    if logp_own is None:
        return out | {"fidelity/replay_cosine": out["fidelity/cosine"],
                      "fidelity/routing_bias_cosine": cosine(g_seq, g_seq)}
    mask_own = mask if mask_own is None else mask_own
    zero = (mask_own & (logp_own.detach() == float("-inf"))).any(1)  # (n,) rows with W_i = 0 under π_θ's own routing
    own = mask_own & ~zero[:, None]  # (n, T); NaN stays in, and reaches the cosine
    live = own.any(1)  # (n,)
    log_w_own = (logp_own.detach() - logp_infer).masked_fill(~own, 0.0).sum(1)  # (n,)
    top_own = reduce(_max_or(log_w_own[live], bool(live.any()), float("-inf")), "max")
    g_true = (sequence_gradient(logp_own, logp_infer, adv, own, params, log_scale=top_own) if live.any()
              else _zeros(params, log_w.device))
    g_true = reduce(g_true, "sum")
    return out | {"fidelity/replay_cosine": cosine(g_true, g_tok),
                  "fidelity/routing_bias_cosine": cosine(g_true, g_seq)}


def _max_or(x: torch.Tensor, nonempty: bool, empty: float) -> torch.Tensor:
    return x.max() if nonempty else torch.tensor(empty, dtype=x.dtype, device=x.device)


def _zeros(params: list[torch.Tensor], device) -> torch.Tensor:
    return torch.zeros(sum(p.numel() for p in params), device=device)
