"""Packing prompt + response token lists into one right-padded batch, and reading response log-probs from it.

Shared by SFT (cross-entropy on response tokens) and RL (logp_old / logp of the sampled tokens). Layout of row i:
`[prompt_i (P_i >= 1 tokens, as encode_prompt made them) | response_i (T_i tokens) | pad ...]`, positions 0..S-1,
plain causal attention (padding sits after every real token, so it is never attended to). The logit at position j
predicts token j+1, so response token t of row i is read from logits[i, P_i + t - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablerl.sampling import token_logprobs


@dataclass(frozen=True)
class Packed:
    ids: torch.Tensor  # (N, S) int64 prompt + response + pad
    resp_pos: torch.Tensor  # (N, T) int64 logit position predicting each response token (clamped on padding)
    targets: torch.Tensor  # (N, T) int64 response tokens (pad where mask is False)
    mask: torch.Tensor  # (N, T) bool, True on real response tokens
    prompt_lens: torch.Tensor  # (N,) int64
    resp_lens: torch.Tensor  # (N,) int64 response tokens as packed (a mask entry may later be dropped, not these)


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
    """(N, S, V) full-sequence logits -> (N, T, V) logits that predict the response tokens."""
    idx = packed.resp_pos[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def response_logp(logits: torch.Tensor, packed: Packed, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> torch.Tensor:
    """(N, T) log-probs of the response tokens under the *sampling* distribution (temperature, truncation)."""
    lp = token_logprobs(response_logits(logits, packed), packed.targets, temperature, top_p, top_k)  # (N, T)
    return lp.masked_fill(~packed.mask, 0.0)
