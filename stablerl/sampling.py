"""The sampling distribution, written once and shared by the inference engine and the trainer.

Both sides turn logits into the distribution the engine samples from with the same function, so `logp_infer`
(engine, log μ) and `logp_old` / `logp` (trainer, log π) are log-probs of the *same kind* of distribution (E3):

    logits / temperature  ->  top-k  ->  top-p  ->  log_softmax over the kept support (-inf outside it)

- temperature > 0 scales the logits; temperature 0 means greedy decoding (argmax of the raw logits), and the
  log-prob reported for it is that of the temperature-1 distribution with the same truncation (a point mass
  would give log 1 = 0 for every token, which says nothing). `logprobs_from_logits(x, 0, p, k)` therefore
  equals `logprobs_from_logits(x, 1, p, k)`.
- top-k keeps every token whose scaled logit is >= the k-th largest (ties at the boundary are kept).
- top-p keeps the smallest prefix of the tokens sorted by probability (stable sort: ties keep the lower id)
  whose mass reaches p, computed on the top-k-truncated distribution; the most likely token is always kept.
The trainer recomputes the support from its own logits; in fp32 they equal the engine's to ~1e-6, so the
supports agree and every IS weight is 1 up to rounding (docs/engine.md, "Truncated sampling").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """(..., V) fp32 logits of the sampling distribution: scaled, with -inf outside the truncated support."""
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # (..., 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (..., V)
        probs = sorted_x.softmax(-1)
        before = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the prefix already reached p without this token
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def logprobs_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                         top_k: int = 0) -> torch.Tensor:
    """(..., V) log-probs of the distribution actually sampled from (-inf outside the truncated support)."""
    return process_logits(logits, temperature, top_p, top_k).log_softmax(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """(N, T) log-probs of `tokens` (N, T) under the sampling distribution of `logits` (N, T, V)."""
    lp = logprobs_from_logits(logits, temperature, top_p, top_k)  # (N, T, V)
    return lp.gather(-1, tokens[..., None]).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` (N, V) and its log-prob under the sampled distribution: (N,) int64, (N,) fp32.

    Exponential race (as vLLM samples): argmax_v p_v / E_v with E_v ~ Exp(1) picks v with probability p_v,
    with one batched draw and no cumulative-sum search; tokens outside the support have p_v = 0.
    E = -log U from uniform draws (6x cheaper than `exponential_` on CPU); U in [0, 1) so E > 0, and U = 0
    (probability 2^-24) gives E = inf, a token that cannot win.
    """
    lp = logprobs_from_logits(logits, temperature, top_p, top_k)  # (N, V)
    if temperature == 0:
        tokens = logits.argmax(-1)  # greedy on the raw logits (the first index wins ties)
    else:
        race = torch.rand(lp.shape, generator=generator, device=lp.device).log_().neg_()  # (N, V) ~ Exp(1)
        tokens = (lp.exp() / race).argmax(-1)
    return tokens, lp.gather(-1, tokens[:, None]).squeeze(-1)
