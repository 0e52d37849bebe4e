"""Packing prompt + response token lists into one right-padded batch, and reading response log-probs from it.

Shared by SFT (cross-entropy on response tokens) and RL (logp_old / logp of the sampled tokens). Layout of row i:
`[prompt_i (P_i >= 1 tokens, as encode_prompt made them) | response_i (T_i tokens) | pad ...]`, positions 0..S-1,
plain causal attention (padding sits after every real token, so it is never attended to). The logit at position j
predicts token j+1, so response token t of row i is read from logits[i, P_i + t - 1].
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from stablerl.sampling import logprobs_from_logits


@dataclass(frozen=True)
class Packed:
    ids: torch.Tensor  # (N, S) int64 prompt + response + pad
    resp_pos: torch.Tensor  # (N, T) int64 logit position predicting each response token (clamped on padding)
    targets: torch.Tensor  # (N, T) int64 response tokens (pad where mask is False)
    mask: torch.Tensor  # (N, T) bool, True on real response tokens
    prompt_lens: torch.Tensor  # (N,) int64
    resp_lens: torch.Tensor  # (N,) int64 response tokens as packed (a mask entry may later be dropped, not these)

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    n = len(prompts)
    S = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((n, S), pad_id, dtype=torch.long)  # (N, S)
    targets = torch.full((n, T), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros(n, T, dtype=torch.bool)  # (N, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (N,)
    resp_pos = (prompt_lens[:, None] - 1 + torch.arange(T)).clamp(max=S - 1)  # (N, T)
    return Packed(ids, resp_pos, targets, mask, prompt_lens, mask.sum(1))


def response_logits(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(N, S, V) full-sequence logits -> (N, T, V) logits that predict the response tokens. The full computation,
    kept as the reference `policy_logprobs` (chunked, memory flat in V) is tested against."""
    idx = packed.resp_pos[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def select(p: Packed, idx: torch.Tensor) -> Packed:
    """Rows `idx` of a packed batch, trimmed to their own longest sequence (less compute per micro-batch)."""
    S = int((p.prompt_lens[idx] + p.resp_lens[idx]).max())
    T = max(1, int(p.resp_lens[idx].max()))
    return Packed(p.ids[idx, :S], p.resp_pos[idx, :T].clamp(max=S - 1), p.targets[idx, :T], p.mask[idx, :T],
                  p.prompt_lens[idx], p.resp_lens[idx])


@dataclass(frozen=True)
class PolicyLogProbs:
    """What one forward of some rows gives: the sampled tokens' log-probs, the experts used, the entropy."""

    logp: torch.Tensor  # (n, T) fp32 log π of the response tokens under the sampling distribution; 0 off `mask`
    routes: torch.Tensor | None  # (n, S, L, K) experts each token ran through (MoE), None for dense models
    entropy_sum: float = 0.0  # Σ over `mask` tokens of the sampling distribution's entropy (when asked)


# fp32 logits per chunk of response tokens: ~64 MiB, so a 152k vocabulary holds ~110 tokens' logits at a time
CHUNK_BYTES = 64 << 20


def chunk_tokens(vocab_size: int, chunk: int = 0) -> int:
    """Response tokens whose (chunk, V) fp32 logits are computed at once: `chunk` if > 0, else ~CHUNK_BYTES."""
    return chunk if chunk > 0 else max(1, CHUNK_BYTES // (4 * vocab_size))


def policy_logprobs(model, packed: Packed, routes: torch.Tensor | None = None, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, chunk: int = 0, entropy: bool = False,
                    checkpoint: bool = False) -> PolicyLogProbs:
    """Log-probs of the response tokens of `packed` (n rows) under `model` replaying `routes` (n, S, L, K) if given.

    The LM head runs only at response positions, `chunk_tokens(V, chunk)` tokens at a time, so neither (n, S, V)
    nor (n, T, V) logits ever exist: memory is flat in the vocabulary. With grad, each chunk is recomputed in the
    backward pass (activation checkpointing of the head), so only one chunk of logits is alive at a time there too.
    top-p/top-k truncation is computed per token, hence per chunk. `entropy`: Σ of the sampling distribution's entropy
    over the response tokens, for the diagnostics (no gradient). `checkpoint`: per decoder layer as well.
    """
    out = model(packed.ids, routes=routes, logits=False, checkpoint=checkpoint)
    rows, cols = packed.mask.nonzero(as_tuple=True)  # (M,), (M,) the real response tokens
    h = out.hidden[rows, packed.resp_pos[rows, cols]]  # (M, H) the states that predict them
    targets = packed.targets[rows, cols]  # (M,)
    step = chunk_tokens(model.config.vocab_size, chunk)
    parts, ent = [], torch.zeros((), device=h.device)
    sampling = (temperature, top_p, top_k)
    for s in range(0, h.shape[0], step):
        hc, tc = h[s : s + step], targets[s : s + step]  # (m, H), (m,)
        if h.requires_grad and len(h) > step:  # logits recomputed in backward: one chunk of them alive at a time
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logp, model.lm_head, hc, tc, *sampling,
                                                           use_reentrant=False))
            if not entropy:
                continue
            with torch.no_grad():  # the diagnostic's own pass over the chunk (entropy has no gradient here)
                lp = logprobs_from_logits(model.lm_head(hc).float(), *sampling)  # (m, V)
        else:  # no grad, or a single chunk (its <= CHUNK_BYTES of logits may as well stay for the backward)
            lp = logprobs_from_logits(model.lm_head(hc).float(), *sampling)  # (m, V) -inf outside the support
            parts.append(lp.gather(-1, tc[:, None]).squeeze(-1))
        if entropy:
            # in place where no graph reads lp: every (m, V) temporary counts (glibc keeps freed ones mapped, and
            # the RSS of a 152k vocabulary grew by ~0.7 GiB over a pass with two more of them)
            p = lp.detach().exp() if lp.requires_grad else lp.exp_()  # (m, V)
            ent += torch.special.entr(p).sum()  # Σ -p log p, 0 where p = 0 (outside the truncated support)
    flat = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)  # (M,)
    logp = torch.zeros(packed.mask.shape, dtype=torch.float32, device=h.device).index_put((rows, cols), flat)
    return PolicyLogProbs(logp, out.routes, float(ent))


def _chunk_logp(lm_head, h: torch.Tensor, targets: torch.Tensor, temperature: float, top_p: float,
                top_k: int) -> torch.Tensor:
    """(m, H) states -> (m,) log-probs of `targets` under the sampling distribution (recomputed in backward)."""
    lp = logprobs_from_logits(lm_head(h).float(), temperature, top_p, top_k)  # (m, V)
    return lp.gather(-1, targets[:, None]).squeeze(-1)
