"""The math of RL on LLMs as pure functions: advantages, IS weights, clip masks, aggregation, losses.

Implements DESIGN §1 (E2–E6, E9) of arXiv 2512.01374. Needs only torch; no state, no engine.

Glossary. Dims: B prompts, G samples per prompt, N = B·G responses, T response tokens.
Tensors: `logp` (N, T) log π_θ of the sampled tokens, training engine, current weights (has grad);
`logp_old` (N, T) log π_θold, training engine at rollout weights; `logp_infer` (N, T) log μ_θold, the
inference engine that sampled; `adv` (N,) one advantage per response; `mask` (N, T) bool, True on
response tokens. Values at padding (mask False) are never read, so they may be anything.

Every loss is a composition of orthogonal parts, each written once (E6): advantage (`group_advantages`,
precomputed by the trainer), ratio level (token or sequence), ratio rule (clip mask, PPO clip, clipped
stop-gradient weight), discrepancy rule (`apply_is_rule`) and aggregation (`aggregate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

ADV_MODES = ("mean", "mean_std", "loo")
AGG_MODES = ("constant", "seq_mean_token_mean", "token_mean")
IS_RULES = ("none", "truncate", "mask")


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # () scalar to minimise; carries the graph of `logp`
    stats: dict[str, float]  # namespaced diagnostics (`clip/`, `is/`, `mask/`, `loss/`); no caller prefix


class BatchSize(NamedTuple):
    """The sizes the aggregations divide by, taken from a whole (mini-)batch when a loss sees only part of it."""

    rows: int  # N: `constant` divides by rows · max_tokens
    tokens: int  # response tokens: `token_mean`
    nonempty: int  # responses with at least one token: `seq_mean_token_mean`

    @classmethod
    def of(cls, mask: torch.Tensor) -> BatchSize:
        lengths = mask.sum(dim=1)  # (N,)
        return cls(mask.shape[0], int(lengths.sum()), int((lengths > 0).sum()))


@dataclass(frozen=True)
class LossHP:
    """The only hyperparameters losses read. Every loss accepts all of them; docs/algorithms.md says which it uses."""

    eps_low: float = 0.2
    """Clip band lower side: a token with Â < 0 stops pushing once r < 1 - eps_low (E5)."""
    eps_high: float = 0.28
    """Clip band upper side (DAPO's clip-higher 0.28); CISPO caps its weight at 1 + eps_high."""
    max_tokens: int | None = None
    """`constant` aggregation divides by N · max_tokens (E5's C); None means mask.shape[1]."""
    is_rule: str = "none"
    """Discrepancy rule on π_old/μ: none (plain IS), truncate (TIS), mask (MIS / IcePop)."""
    is_trunc: float = 2.0
    """Truncation cap c of the `truncate` rule: min(π_old/μ, c)."""
    is_low: float = 0.5
    """Lower edge of the `mask` rule's band; tokens with π_old/μ below it get no gradient."""
    is_high: float = 2.0
    """Upper edge of the `mask` rule's band."""
    batch: BatchSize | None = None
    """Sizes of the whole mini-batch when the loss is given only some of its rows (the trainer leaves out rows with
    Â = 0: no registered loss has a gradient there). Aggregations divide by these, so loss and gradient equal those
    of the whole mini-batch. None: the rows given are the whole batch."""


@dataclass(frozen=True)
class ISWeights:
    """E3: π_θ/μ_θold = [π_θold/μ_θold] · [π_θ/π_θold], held as log-ratios (N, T) that are exactly 0 on padding."""

    log_discrepancy: torch.Tensor  # log π_old/μ: training–inference mismatch at the rollout weights (no grad)
    log_staleness: torch.Tensor  # log r = log π/π_old: how far the policy moved since rollout (grad via logp)

    @property
    def discrepancy(self) -> torch.Tensor:
        return self.log_discrepancy.exp()  # (N, T)

    @property
    def staleness(self) -> torch.Tensor:
        return self.log_staleness.exp()  # (N, T)

    @property
    def full(self) -> torch.Tensor:
        # w = π/μ from one exp of the summed logs: no inf·0 when the factors over/underflow separately
        return (self.log_discrepancy + self.log_staleness).exp()  # (N, T)


# ----------------------------------------------------------------------------- parts


def group_advantages(rewards: torch.Tensor, mode: str = "mean", std_eps: float = 1e-6) -> torch.Tensor:
    """E4: (B, G) rewards -> (B, G) advantages, one baseline per prompt group.

    mean: R_i − mean_j R_j. mean_std (GRPO): that divided by the group's unbiased std; a group whose std is
    at most `std_eps` gets 0, not NaN. loo: R_i − mean_{j≠i} R_j (leave-one-out baseline).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a float tensor of shape (B, G), got {_describe(rewards)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or inf")
    if mode not in ADV_MODES:
        raise ValueError(f"mode: unknown advantage mode {mode!r}; valid: {', '.join(ADV_MODES)}")
    G = rewards.shape[1]
    if mode != "mean" and G < 2:
        raise ValueError(f"rewards: mode {mode!r} needs at least 2 samples per group, got G={G}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (B, G)
    if mode == "mean":
        return centered
    if mode == "loo":
        # R_i − (ΣR − R_i)/(G−1) = G/(G−1) · (R_i − mean): the baseline excludes the sample it scores
        return centered * (G / (G - 1))
    std = rewards.std(dim=1, keepdim=True)  # (B, 1) unbiased, as in GRPO implementations
    # all-equal groups carry no signal; clamp keeps the untaken branch finite
    return torch.where(std > std_eps, centered / std.clamp_min(std_eps), torch.zeros_like(centered))


def is_weights(logp: torch.Tensor, logp_old: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> ISWeights:
    """E3 decomposition of the full token IS weight, in log space so padding can never leak NaN or inf."""
    log_discrepancy = (logp_old - logp_infer).detach().masked_fill(~mask, 0.0)  # (N, T)
    log_staleness = (logp - logp_old.detach()).masked_fill(~mask, 0.0)  # (N, T)
    return ISWeights(log_discrepancy, log_staleness)


def apply_is_rule(
    discrepancy: torch.Tensor, rule: str, trunc: float = 2.0, low: float = 0.5, high: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrepancy rule on d = π_old/μ (any shape) -> (weight, keep).

    none: (d, all True). truncate (TIS): (min(d, c), all True). mask (MIS/IcePop): (d, low <= d <= high);
    the caller zeroes the gradient where keep is False. Works per token or per sequence (GSPO).
    """
    if rule not in IS_RULES:
        raise ValueError(f"is_rule: unknown rule {rule!r}; valid: {', '.join(IS_RULES)}")
    keep = torch.ones_like(discrepancy, dtype=torch.bool)
    if rule == "truncate":
        return discrepancy.clamp(max=trunc), keep
    if rule == "mask":
        return discrepancy, (discrepancy >= low) & (discrepancy <= high)
    return discrepancy, keep


def clip_mask(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """E5 clip as a mask -> (clip_low, clip_high), bool, ratio's shape (token (N, T) or sequence (N,) ratios).

    clip_high: Â > 0 and r > 1 + eps_high; clip_low: Â < 0 and r < 1 − eps_low. A ratio exactly on a bound
    is kept, matching PPO's min(r·Â, clip(r)·Â), whose gradient survives at the bound.
    """
    adv = adv.reshape(adv.shape + (1,) * (ratio.dim() - adv.dim()))  # (N, 1) against (N, T); (N,) against (N,)
    clip_high = (adv > 0) & (ratio > 1 + eps_high)
    clip_low = (adv < 0) & (ratio < 1 - eps_low)
    return clip_low, clip_high


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int | None = None,
              batch: BatchSize | None = None) -> torch.Tensor:
    """Reduce per-token values x (N, T) over response tokens to a scalar.

    constant: Σ x / (N · max_tokens), a C independent of response lengths (E5; max_tokens defaults to T).
    seq_mean_token_mean: mean over non-empty responses of each response's token mean (length normalisation).
    token_mean: Σ x / number of response tokens.
    `batch`: divide by the sizes of this whole batch instead of those of the rows given (see `LossHP.batch`).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode: unknown aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")
    x = x.masked_fill(~mask, 0.0)  # (N, T)
    size = batch or BatchSize.of(mask)
    if mode == "constant":
        return x.sum() / (size.rows * (mask.shape[1] if max_tokens is None else max_tokens))
    if mode == "token_mean":
        return x.sum() / max(1, size.tokens)
    lengths = mask.sum(dim=1)  # (N,)
    seq_means = x.sum(dim=1) / lengths.clamp_min(1)  # (N,)
    # empty responses have no length to normalise by; they drop out instead of diluting the mean
    return seq_means.sum() / max(1, size.nonempty)


def sequence_log_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response mean of x (N, T) over its tokens -> (N,); GSPO's log of the geometric-mean ratio."""
    return x.masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


# ----------------------------------------------------------------------------- registry

LossFn = Callable[[torch.Tensor, ISWeights, torch.Tensor, torch.Tensor, LossHP], LossOutput]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, zero_adv_inert: bool = True) -> Callable[[LossFn], LossFn]:
    """Decorator: add a loss to `LOSSES` under `name`. The only place a loss name is bound to code.

    zero_adv_inert: a response with Â = 0 adds nothing to the loss's gradient (true of every pure policy-gradient
    loss here, whose per-token terms are all proportional to Â; false for one with a KL or entropy term). The trainer
    then skips those rows (`skips_zero_adv`), which are 30-75% of a batch on the default task."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        _ZERO_ADV_INERT[name] = zero_adv_inert
        return fn

    return decorator


_ZERO_ADV_INERT: dict[str, bool] = {}


def skips_zero_adv(name: str) -> bool:
    """Whether rows with Â = 0 may be left out of the updates of loss `name` (see `register_loss`)."""
    get_loss(name)
    return _ZERO_ADV_INERT[name]


def loss_names() -> tuple[str, ...]:
    return tuple(sorted(LOSSES))


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"name: unknown loss {name!r}; valid: {', '.join(loss_names())}")
    return LOSSES[name]


# ----------------------------------------------------------------------------- losses
# Each takes (logp, iw, adv, mask, hp): logp (N, T) with padding zeroed, iw the raw E3 weights, and returns
# LossOutput with its own clip/mask stats; policy_loss adds the shared IS stats.


def _masked_reinforce(logp, iw: ISWeights, adv, mask, hp: LossHP, agg: str, correct_discrepancy: bool) -> LossOutput:
    """E5 body of the MiniRL family: −M · sg[w] · Â · log π, aggregated by `agg`."""
    if correct_discrepancy:
        d, rule_keep = apply_is_rule(iw.discrepancy, hp.is_rule, hp.is_trunc, hp.is_low, hp.is_high)  # (N, T)
        weight, extra = d * iw.staleness, _rule_stats(iw.discrepancy, d, rule_keep, mask)  # (N, T)
    else:  # E6 minirl_no_is: π/π_old alone, so μ (logp_infer) never enters the loss
        weight, rule_keep, extra = iw.staleness, torch.ones_like(mask), {}
    clip_low, clip_high = clip_mask(iw.staleness.detach(), adv, hp.eps_low, hp.eps_high)  # (N, T) each
    keep = mask & rule_keep & ~(clip_low | clip_high)  # (N, T) tokens that still push
    # sg[w]: the weight scales the REINFORCE term, it is not itself optimised. Zero it before the product
    # so a dropped token's gradient is exactly 0 even if its weight overflowed (0·inf would be NaN)
    per_token = -(weight.detach().masked_fill(~keep, 0.0) * adv[:, None] * logp)  # (N, T)
    loss = aggregate(per_token, mask, agg, hp.max_tokens, hp.batch)
    return _output(loss, mask, keep, clip_low, clip_high, extra)


@register_loss("minirl")
def minirl(logp, iw, adv, mask, hp):
    """E5: L = −(1/C) Σ_i Σ_t M_i,t · sg[w_i,t] · Â_i · log π_θ(y_i,t), w = rule(π_old/μ) · π/π_old (2512.01374)."""
    return _masked_reinforce(logp, iw, adv, mask, hp, "constant", correct_discrepancy=True)


@register_loss("minirl_no_is")
def minirl_no_is(logp, iw, adv, mask, hp):
    """E6: E5 with w := π/π_old, no training–inference correction (2512.01374: collapses on-policy)."""
    return _masked_reinforce(logp, iw, adv, mask, hp, "constant", correct_discrepancy=False)


@register_loss("minirl_lennorm")
def minirl_lennorm(logp, iw, adv, mask, hp):
    """E6: L = −(1/N) Σ_i (1/|y_i|) Σ_t M_i,t · sg[w_i,t] · Â_i · log π_θ(y_i,t) (2512.01374: biased, degrades)."""
    return _masked_reinforce(logp, iw, adv, mask, hp, "seq_mean_token_mean", correct_discrepancy=True)


@register_loss("grpo")
def grpo(logp, iw, adv, mask, hp):
    """L = −(1/N) Σ_i (1/|y_i|) Σ_t sg[d]·min(r·Â_i, clip(r, 1−ε_l, 1+ε_h)·Â_i), d = rule(π_old/μ) (GRPO 2402.03300)."""
    d, rule_keep = apply_is_rule(iw.discrepancy, hp.is_rule, hp.is_trunc, hp.is_low, hp.is_high)
    r = iw.staleness  # (N, T) with grad
    a = adv[:, None]  # (N, 1)
    surrogate = torch.minimum(r * a, r.clamp(1 - hp.eps_low, 1 + hp.eps_high) * a)  # (N, T)
    # the discrepancy factor rides outside the PPO min, as in TIS/MIS: it corrects the sampler, not the step
    per_token = -(d.detach().masked_fill(~rule_keep, 0.0) * surrogate)  # (N, T)
    loss = aggregate(per_token, mask, "seq_mean_token_mean", batch=hp.batch)
    # the min's clipped branch has zero gradient exactly where E5's mask fires, so the same stats apply
    low, high = clip_mask(r.detach(), adv, hp.eps_low, hp.eps_high)
    keep = mask & rule_keep & ~(low | high)
    return _output(loss, mask, keep, low, high, _rule_stats(iw.discrepancy, d, rule_keep, mask))


@register_loss("cispo")
def cispo(logp, iw, adv, mask, hp):
    """L = −(1/Σ|y_i|) Σ_i Σ_t sg[min(w_i,t, 1+ε_h)] · Â_i · log π_θ(y_i,t), no mask (CISPO, MiniMax-M1 2506.13585)."""
    d, rule_keep = apply_is_rule(iw.discrepancy, hp.is_rule, hp.is_trunc, hp.is_low, hp.is_high)
    weight = d * iw.staleness  # (N, T)
    # clip the weight, never the token: every token keeps a gradient, only its size is capped
    capped = weight.detach().clamp(max=1 + hp.eps_high)  # (N, T)
    keep = mask & rule_keep
    per_token = -(capped.masked_fill(~keep, 0.0) * adv[:, None] * logp)  # (N, T)
    loss = aggregate(per_token, mask, "token_mean", batch=hp.batch)
    high = mask & (weight.detach() > 1 + hp.eps_high)  # capped, not masked
    return _output(loss, mask, keep, torch.zeros_like(mask), high, _rule_stats(iw.discrepancy, d, rule_keep, mask))


@register_loss("gspo")
def gspo(logp, iw, adv, mask, hp):
    """L = −(1/N) Σ_i sg[d_i]·min(s_i·Â_i, clip(s_i, 1−ε_l, 1+ε_h)·Â_i), s_i = (Π_t r_i,t)^(1/|y_i|) (2507.18071)."""
    # sequence level throughout: the discrepancy factor is the geometric mean too, and its rule acts per response
    seq_d = sequence_log_mean(iw.log_discrepancy, mask).exp()  # (N,)
    d, rule_keep = apply_is_rule(seq_d, hp.is_rule, hp.is_trunc, hp.is_low, hp.is_high)  # (N,) each
    s = sequence_log_mean(iw.log_staleness, mask).exp()  # (N,) with grad
    surrogate = torch.minimum(s * adv, s.clamp(1 - hp.eps_low, 1 + hp.eps_high) * adv)  # (N,)
    per_seq = -(d.detach().masked_fill(~rule_keep, 0.0) * surrogate)  # (N,)
    # spread each response's loss over its tokens so the seq-mean aggregation is a plain mean over responses
    loss = aggregate(per_seq[:, None].expand_as(mask), mask, "seq_mean_token_mean", batch=hp.batch)
    seq_low, seq_high = clip_mask(s.detach(), adv, hp.eps_low, hp.eps_high)  # (N,) each
    low, high = seq_low[:, None] & mask, seq_high[:, None] & mask  # (N, T): clip fractions count tokens
    keep = mask & (rule_keep & ~(seq_low | seq_high))[:, None]
    return _output(loss, mask, keep, low, high, _rule_stats(seq_d[:, None], d[:, None], rule_keep[:, None], mask))


# ----------------------------------------------------------------------------- entry point


def policy_loss(
    name: str,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_infer: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    **hp,
) -> LossOutput:
    """Validate, build the E3 weights once, run the registered loss `name`, add IS stats.

    logp (N, T) with grad; logp_old, logp_infer (N, T) (detached here: they are constants of the objective);
    adv (N,); mask (N, T) bool. hp: fields of `LossHP`. Computes in at least float32.
    """
    fn = get_loss(name)
    loss_hp = make_hp(**hp)
    # bf16 log-probs differ by ~1e-2 per token; ratios of them exponentiate that error, so upcast first
    dtype = _check_inputs(logp=logp, logp_old=logp_old, logp_infer=logp_infer, adv=adv, mask=mask)
    logp = logp.to(dtype).masked_fill(~mask, 0.0)  # (N, T); padding zeroed once, so no loss ever reads it
    # π_θold, μ_θold and Â are constants of the objective: a stray graph on them must not leak gradient
    iw = is_weights(logp, logp_old.detach().to(dtype), logp_infer.detach().to(dtype), mask)
    out = fn(logp, iw, adv.detach().to(dtype), mask, loss_hp)
    return LossOutput(out.loss, {**out.stats, **_is_stats(iw, mask)})


def make_hp(**hp) -> LossHP:
    """Validate loss hyperparameters -> LossHP; unknown keys and bad values raise naming the key."""
    accepted = [f.name for f in fields(LossHP)]
    unknown = sorted(set(hp) - set(accepted))
    if unknown:
        raise ValueError(f"unknown loss hyperparameter(s) {unknown}; accepted: {', '.join(accepted)}")
    out = LossHP(**hp)
    for key in ("eps_low", "eps_high", "is_trunc", "is_low", "is_high"):
        value = getattr(out, key)
        # bool is an int subclass; True as a clip width is always a config mistake
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key}: expected a finite number >= 0, got {value!r}")
    if out.eps_low >= 1:
        raise ValueError(f"eps_low: must be < 1 (the band's lower edge is 1 - eps_low), got {out.eps_low}")
    if out.is_rule not in IS_RULES:
        raise ValueError(f"is_rule: unknown rule {out.is_rule!r}; valid: {', '.join(IS_RULES)}")
    if out.is_trunc <= 0:
        raise ValueError(f"is_trunc: must be > 0, got {out.is_trunc}")
    if out.is_low > out.is_high:
        raise ValueError(f"is_low: must be <= is_high, got is_low={out.is_low}, is_high={out.is_high}")
    m = out.max_tokens
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"max_tokens: expected a positive int or None, got {m!r}")
    b = out.batch
    if b is not None and not (isinstance(b, BatchSize) and all(type(v) is int and v >= 0 for v in b)):
        raise ValueError(f"batch: expected a BatchSize of non-negative ints or None, got {b!r}")
    return out


# ----------------------------------------------------------------------------- E9: first-order fidelity


def first_order_gradients(
    logp: torch.Tensor,
    logp_infer: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    params: Iterable[torch.Tensor],
    retain_graph: bool = False,
    log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E9 ascent directions -> (g_seq, g_tok), each (P,) flattened over `params` in order. `log_scale`: log of the
    constant W is divided by (default max_i log W_i); ranks that sum their rows' parts pass the global max.

    g_seq = Σ_i W_i · Â_i · Σ_t ∇log π_i,t with W_i = Π_t π/μ (E1), divided by max_i W_i (see below).
    g_tok = Σ_i Σ_t w_i,t · Â_i · ∇log π_i,t with w = π/μ (E2), unscaled. Two backward passes.
    """
    params = list(params)
    g_seq = sequence_gradient(logp, logp_infer, adv, mask, params, retain_graph=True, log_scale=log_scale)
    logp, log_w, adv = _weights(logp, logp_infer, adv, mask)
    j_tok = (log_w.exp() * adv[:, None] * logp).sum()  # surrogate whose gradient is g_tok; w is a constant (sg)
    g_tok = _flat_grad(j_tok, params, retain_graph=retain_graph)
    return g_seq, g_tok


def sequence_gradient(
    logp: torch.Tensor,
    logp_infer: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    params: Iterable[torch.Tensor],
    retain_graph: bool = False,
    log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """E1's ascent direction g_seq = Σ_i W_i · Â_i · Σ_t ∇log π_i,t, W_i = Π_t π/μ, divided by max_i W_i (or by
    exp(log_scale)) -> (P,) flattened over `params` in order. One backward pass."""
    logp, log_w, adv = _weights(logp, logp_infer, adv, mask)
    log_seq_w = log_w.sum(dim=1)  # (N,) log W_i
    # W_i = exp(Σ_t log w) overflows (or underflows to 0) for long responses; stay in log space and divide
    # every W_i by max_i W_i. That rescales g_seq by one positive constant, and cos(g_seq, g_tok) is
    # scale-invariant, so the fidelity is unchanged; only g_seq's norm loses meaning.
    # rows without tokens (0 here) may lie above a given scale: the clamp keeps their weight finite (they add 0)
    seq_w = (log_seq_w - (log_seq_w.max() if log_scale is None else log_scale)).clamp(max=0.0).exp()  # (N,) (0, 1]
    j_seq = (seq_w * adv * logp.sum(dim=1)).sum()  # surrogate whose gradient is g_seq; W is a constant (sg)
    return _flat_grad(j_seq, list(params), retain_graph=retain_graph)


def _weights(logp, logp_infer, adv, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E9's inputs, checked -> (logp (N, T) with its graph, 0 off the mask; log π/μ (N, T) detached; Â (N,))."""
    dtype = _check_inputs(logp=logp, logp_old=logp_infer, logp_infer=logp_infer, adv=adv, mask=mask)
    if not logp.requires_grad:
        raise ValueError("logp: must require grad (it is differentiated with respect to params)")
    logp = logp.to(dtype).masked_fill(~mask, 0.0)  # (N, T)
    log_w = (logp.detach() - logp_infer.detach().to(dtype)).masked_fill(~mask, 0.0)  # (N, T) log π/μ
    return logp, log_w, adv.detach().to(dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) of two flat vectors in float64; NaN when either is zero (direction undefined)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} does not match a: {tuple(a.shape)}")
    denom = a.norm() * b.norm()
    return float("nan") if denom == 0 else float(a @ b / denom)


# ----------------------------------------------------------------------------- helpers


def _flat_grad(y: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> torch.Tensor:
    live = [p for p in params if p.requires_grad]  # autograd.grad refuses frozen tensors
    grads = iter(torch.autograd.grad(y, live, retain_graph=retain_graph, allow_unused=True))
    # frozen or untouched parameters get gradient 0, not None, so both vectors keep the same layout
    flat = [next(grads) if p.requires_grad else None for p in params]
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, flat)])


def _output(loss, mask, keep, clip_low, clip_high, extra: dict[str, float]) -> LossOutput:
    """Clip and drop fractions over response tokens; counted as ints and divided in Python (exact, one sync)."""
    parts = [mask, clip_low & mask, clip_high & mask, (clip_low | clip_high) & mask, mask & ~keep]
    per_row = torch.stack(parts).sum(dim=2).tolist()  # (5, N) token counts per response
    n, low, high, either, dropped = (sum(row) for row in per_row)
    seq_fracs = [d / t for d, t in zip(per_row[4], per_row[0]) if t > 0]
    stats = {"clip/frac_low": low / n, "clip/frac_high": high / n, "clip/frac": either / n}
    stats |= {"mask/frac": dropped / n, "mask/frac_seq_mean": sum(seq_fracs) / len(seq_fracs)}
    return LossOutput(loss, stats | extra)


def _rule_stats(raw: torch.Tensor, ruled: torch.Tensor, rule_keep: torch.Tensor, mask: torch.Tensor) -> dict:
    """Fractions of response tokens the discrepancy rule truncated or masked (per-sequence rules count tokens)."""
    n, truncated, masked = torch.stack([mask.sum(), ((ruled < raw) & mask).sum(), (~rule_keep & mask).sum()]).tolist()
    return {"is/rule_frac_truncated": truncated / n, "is/rule_frac_masked": masked / n}


def _is_stats(iw: ISWeights, mask: torch.Tensor) -> dict[str, float]:
    """mean/min/max/ESS of the three E3 factors over response tokens, plus |log W_i| of the E9 sequence weight."""
    rows, keys = [], []
    for part in ("discrepancy", "staleness", "full"):
        w = getattr(iw, part).detach()[mask]  # (n,)
        # ESS/n = (Σw)² / (n Σw²): 1 when all weights are equal, 1/n when one token carries everything
        rows += [w.mean(), w.min(), w.max(), w.sum() ** 2 / (w.numel() * (w * w).sum())]
        keys += [f"is/{part}_{s}" for s in ("mean", "min", "max", "ess")]
    log_seq_w = (iw.log_discrepancy + iw.log_staleness.detach()).sum(dim=1).abs()  # (N,) |log W_i|
    rows += [log_seq_w.mean(), log_seq_w.max(), mask.sum().to(log_seq_w.dtype)]
    keys += ["is/seq_log_weight_abs_mean", "is/seq_log_weight_abs_max", "loss/tokens"]
    return dict(zip(keys, torch.stack(rows).tolist()))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_inputs(**tensors: torch.Tensor) -> torch.dtype:
    """Shapes, dtypes and finiteness (on response tokens) of the loss inputs; errors name the argument."""
    for key, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{key}: expected a torch.Tensor, got {type(x).__name__}")
    mask = tensors["mask"]
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype torch.bool (True on response tokens), got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask: expected shape (N, T), got {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask: no response tokens (all False); the loss would be 0/0")
    for key in ("logp", "logp_old", "logp_infer"):
        x = tensors[key]
        if x.shape != mask.shape:
            raise ValueError(f"{key}: expected shape {tuple(mask.shape)} like mask, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{key}: expected a floating dtype, got {x.dtype}")
        # only response tokens: padding is never read, so engines may fill it with anything
        bad = ~torch.isfinite(x.detach()) & mask
        if bad.any():
            i, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{key}: NaN or inf at response token [{i}, {t}] ({int(bad.sum())} in all)")
    adv = tensors["adv"]
    if adv.shape != mask.shape[:1]:
        raise ValueError(f"adv: expected shape ({mask.shape[0]},), one advantage per response, got {tuple(adv.shape)}")
    if not adv.is_floating_point():
        raise ValueError(f"adv: expected a floating dtype, got {adv.dtype}")
    if not torch.isfinite(adv.detach()).all():
        raise ValueError(f"adv: NaN or inf at response {int((~torch.isfinite(adv.detach())).nonzero()[0])}")
    return torch.promote_types(tensors["logp"].dtype, torch.float32)
