"""The inference engine (DESIGN §2 engine): batched prefill + static-KV-cache decode under an explicit numerics policy.

It samples the rollouts of RL, so it *is* μ_θold in E3: its numerics (fp32 | bf16 | fp16 | fp8) are a setting, never
an accident, and everything the trainer needs to correct for it comes back in a `Rollout`: `logp_infer` (log μ of
each sampled token under the distribution actually sampled from, stablerl.sampling) and `routes_infer` (the experts
the engine ran, E7, for R3 replay).

The engine holds its own copy of the weights (stablerl.decode.InferenceModel), cast or fp8-quantised by `sync`;
it never shares a tensor with the trainer. Layouts, numerics and the alignment of truncated sampling with the
trainer's log-probs: docs/engine.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from stablerl.decode import NUMERICS, Cache, Experts, Fp8Linear, InferenceModel, quantize_e4m3, route_dtype
from stablerl.errors import UserError
from stablerl.hf import get_model
from stablerl.model import Transformer
from stablerl.sampling import sample

__all__ = ["Engine", "Rollout", "NUMERICS", "Cache", "Experts", "Fp8Linear", "InferenceModel", "quantize_e4m3",
           "route_dtype"]

STOP_CHECK_EVERY = 4  # decode steps between stop-string scans (the exact cut is found afterwards)


# ---- the engine -----------------------------------------------------------------------------------------------


def backend_model(model_or_dir, tokenizer, model_seed: int, who: str) -> tuple[Transformer, object]:
    """(model, tokenizer) a rollout backend starts from: a model object with its tokenizer, or a checkpoint directory
    / preset name (loaded; `model_seed` is a preset's random init) whose own tokenizer is used unless one is given."""
    if not isinstance(model_or_dir, nn.Module):
        model_or_dir, tok = get_model(model_or_dir, seed=model_seed)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError(f"{who}: a tokenizer is needed with a model object")
    return model_or_dir, tokenizer


def encode_prompts(backend, prompts: list[str]) -> list[list[int]]:
    """Prompt ids (`backend.tokenizer.encode_prompt`); UserError naming the prompt's index if one cannot be answered
    (`backend.problem`: empty, or no room left in the context). Shared by every rollout backend."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"prompt {i}: expected a string, got {type(p).__name__}")
        ids = backend.tokenizer.encode_prompt(p)
        if why := backend.problem(ids):
            raise UserError(f"prompt {i}: {why}")
        out.append(ids)
    return out


def sampling_args(defaults: dict, prompts: list[str], n: int, temperature: float | None, top_p: float | None,
                  top_k: int | None, max_new_tokens: int | None,
                  stop: tuple[str, ...] | None) -> tuple[float, float, int, int, tuple[str, ...]]:
    """`generate`'s sampling arguments with None taken from a backend's `defaults`, checked (UserError naming the
    argument): the one contract every rollout backend (stablerl.rollout) accepts."""
    temperature = defaults["temperature"] if temperature is None else temperature
    top_p = defaults["top_p"] if top_p is None else top_p
    top_k = defaults["top_k"] if top_k is None else top_k
    max_new_tokens = defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    stop = tuple(defaults["stop"] if stop is None else stop)
    if not prompts:
        raise UserError("generate: no prompts")
    for name, ok, want, got in (("n", n >= 1, ">= 1", n), ("temperature", temperature >= 0, ">= 0", temperature),
                                ("top_p", 0 < top_p <= 1, "in (0, 1]", top_p), ("top_k", top_k >= 0, ">= 0", top_k),
                                ("max_new_tokens", max_new_tokens >= 1, ">= 1", max_new_tokens)):
        if not ok:
            raise UserError(f"generate: {name} must be {want}, got {got}")
    if any(not s for s in stop):
        raise UserError("generate: empty stop string")
    return temperature, top_p, top_k, max_new_tokens, stop


@dataclass(frozen=True)
class Rollout:
    """N = B·G samples, prompt-major (the G samples of prompt b are rows b·G .. b·G+G-1). T = longest response."""

    prompts: list[str]  # the B prompts
    prompt_index: torch.Tensor  # (N,) int64: row -> prompt
    prompt_ids: list[list[int]]  # N token lists as the model saw them (with the tokenizer's BOS / chat template)
    prompt_lens: torch.Tensor  # (N,) int64
    tokens: torch.Tensor  # (N, T) int64 response tokens, right-padded with the tokenizer's pad id
    mask: torch.Tensor  # (N, T) bool: real response tokens, including the EOS / stop-string token that ended it
    logp_infer: torch.Tensor  # (N, T) fp32 log μ of each token under the distribution sampled from; 0 on padding
    # routes in route_dtype(num_experts) (uint8 up to 256 experts): widen with .long() before indexing
    routes_infer: torch.Tensor | None  # (N, T, L, K) experts each response token ran through; 0 on padding
    prompt_routes: list[torch.Tensor] | None  # N tensors (P_i, L, K), same dtype: the prompt tokens' experts (R3)
    finish_reason: list[str]  # "stop" (EOS or stop string) | "length" (max_new_tokens or the model context)
    texts: list[str]  # decoded responses, special tokens dropped, cut before a matched stop string
    numerics: str

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)  # (N,)


@dataclass(frozen=True)
class Support:
    """What a backend does, in words a user reads (`stablerl info`, docs/engine.md's table)."""

    numerics: tuple[str, ...]  # the engine.numerics values it accepts
    routes: str  # how routes_infer / prompt_routes are obtained
    truncation: str  # top-k / top-p / temperature 0: how its μ lines up with stablerl.sampling
    weight_sync: str  # what sync(model) does


@runtime_checkable
class RolloutBackend(Protocol):
    """The contract the trainer, eval and `stablerl generate` rely on. Sampling arguments left None take the
    backend's defaults (the EngineConfig it was built from); `seed` is an int or a torch.Generator to draw from."""

    name: str
    support: Support
    numerics: str
    tokenizer: object  # stablerl.tokenizer.TextTokenizer: encode_prompt, decode, eos_ids, pad_id

    def generate(self, prompts: list[str], n: int = 1, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_new_tokens: int | None = None, stop: tuple[str, ...] | None = None,
                 seed: int | torch.Generator = 0, ignore_eos: bool = False, return_routes: bool = True) -> Rollout:
        ...

    def sync(self, model: Transformer, gather: Callable[[nn.Module], AbstractContextManager] = nullcontext) -> None:
        ...

    def problem(self, ids: list[int]) -> str | None:
        """Why this backend cannot answer a prompt of these ids (empty, no room in the context), or None."""
        ...

    def encode(self, prompts: list[str]) -> list[list[int]]:
        ...


class Engine:
    """`Engine(model_or_dir, tokenizer, numerics)`; `sync(model)` after each trainer update; `generate(...)`.

    Sampling arguments left as None in `generate` take the engine's defaults: the paper's setting (temperature 1,
    no truncation) or those of the EngineConfig given to `from_config`.
    """

    def __init__(self, model_or_dir: Transformer | str | Path, tokenizer=None, numerics: str = "bf16",
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 stop: tuple[str, ...] = (), model_seed: int = 0, threads: int | None = None,
                 gather: Callable[[nn.Module], AbstractContextManager] = nullcontext, weight_bits: int = 0):
        if numerics not in NUMERICS:
            raise UserError(f"numerics: got {numerics!r}, expected one of {', '.join(map(repr, NUMERICS))}")
        self.weight_bits = weight_bits  # the engine-only discrepancy dial (decode.round_weights); 0 = off
        model_or_dir, tokenizer = backend_model(model_or_dir, tokenizer, model_seed, "Engine")
        self.tokenizer, self.numerics, self.config = tokenizer, numerics, model_or_dir.config
        self.defaults = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             stop=tuple(stop))
        # torch intra-op threads while generating (restored after); None leaves torch's setting. Small models on
        # a shared machine want 1: every extra OpenMP thread makes each small op wait for a descheduled peer.
        self.threads = threads
        self.model: InferenceModel
        self.sync(model_or_dir, gather)

    @classmethod
    def from_config(cls, model_or_dir, tokenizer, cfg) -> Engine:
        """From a stablerl.config.EngineConfig: its numerics, and its sampling settings as the defaults."""
        return cls(model_or_dir, tokenizer, numerics=cfg.numerics, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, weight_bits=cfg.weight_bits)

    @torch.no_grad()
    def sync(self, model: Transformer, gather: Callable[[nn.Module], AbstractContextManager] = nullcontext) -> None:
        """Copy the trainer's current weights into the engine, cast (or fp8-quantised) to its numerics. A sharded
        model passes `gather` (stablerl.distributed.Parallel.gather): its weights are then read whole one decoder
        layer at a time (a collective: every rank syncs)."""
        if model.config != self.config:
            raise ValueError("Engine.sync: the model's config differs from the engine's")
        self.device = next(model.parameters()).device
        self.model = InferenceModel(model, self.numerics, gather=gather, weight_bits=self.weight_bits)

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def problem(self, ids: list[int]) -> str | None:
        """Why the engine cannot answer a prompt of these ids, or None: the model context bounds prompt+response."""
        if not ids:
            return "prompt is empty (no tokens, and the tokenizer has no BOS)"
        if len(ids) >= self.context_length:
            return (f"prompt has {len(ids)} tokens but the model context is {self.context_length} "
                    "(max_position_embeddings): no room for a response")
        return None

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(self, prompts)

    def generate(self, prompts: list[str], n: int = 1, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_new_tokens: int | None = None, stop: tuple[str, ...] | None = None,
                 seed: int | torch.Generator = 0, ignore_eos: bool = False, return_routes: bool = True) -> Rollout:
        """n samples for each prompt. A row stops at any EOS id (unless `ignore_eos`), at a stop string, after
        `max_new_tokens`, or when prompt + response fill the model context (finish_reason "length")."""
        temperature, top_p, top_k, max_new_tokens, stop = sampling_args(self.defaults, prompts, n, temperature, top_p,
                                                                        top_k, max_new_tokens, stop)
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator(self.device).manual_seed(int(seed))
        enc = self.encode(prompts)
        threads = torch.get_num_threads()
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            with torch.inference_mode():
                out = self._run(enc, n, dict(temperature=temperature, top_p=top_p, top_k=top_k), max_new_tokens,
                                gen, ignore_eos, return_routes and self.model.is_moe, stop)
        finally:
            torch.set_num_threads(threads)
        # clone outside inference mode: the trainer may save these for backward (e.g. routes as gather indices)
        tokens, length, reason, logp, routes, prompt_routes = (None if t is None else t.clone() for t in out)
        return self._finish(prompts, enc, n, tokens, length, reason, logp, routes, prompt_routes, stop)

    def _run(self, enc, n, sampling, max_new, gen, ignore_eos, want_routes, stop):
        m, dev, pad_id = self.model, self.device, self.tokenizer.pad_id
        eos = torch.tensor(self.tokenizer.eos_ids, device=dev)  # (n_eos,) every one stops a row (Llama-3: two)
        B, P = len(enc), max(len(e) for e in enc)
        lens = torch.tensor([len(e) for e in enc], device=dev)  # (B,)
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)  # (B, P) left-padded
        for b, e in enumerate(enc):
            ids[b, P - len(e):] = torch.tensor(e)
        # ---- prefill each prompt once, then give every one of its n samples a copy of its cache ----
        cache = m.new_cache(B, P + max_new, dev)
        cache.valid[:, :P] = torch.arange(P, device=dev) >= (P - lens)[:, None]
        pos = (torch.arange(P, device=dev) - (P - lens)[:, None]).clamp(min=0)  # (B, P) per-row positions
        logits, r = m(ids, pos, cache, 0, want_routes)
        prompt_routes = r  # (B, P, L, K) left-padded
        cache = cache.rows(torch.arange(B, device=dev).repeat_interleave(n))
        N = B * n
        plen = lens.repeat_interleave(n)  # (N,)
        limit = (self.context_length - plen).clamp(max=max_new)  # (N,) response budget of each row
        tokens = torch.full((N, max_new), pad_id, dtype=torch.long, device=dev)  # (N, T) by original row
        logp = torch.zeros(N, max_new, device=dev)  # (N, T)
        routes = None
        if want_routes:
            routes = torch.zeros(N, max_new, *r.shape[2:], dtype=m.route_dtype, device=dev)  # (N, T, L, K)
        length = torch.zeros(N, dtype=torch.long, device=dev)  # (N,) final response length (0 = running)
        reason = torch.zeros(N, dtype=torch.long, device=dev)  # (N,) 1 stop, 2 length
        rows = torch.arange(N, device=dev)  # batch row -> original row (rows leave the batch once finished)
        done = torch.zeros(N, dtype=torch.bool, device=dev)  # (n_cur,) has emitted its last token
        tok, lp = sample(logits.repeat_interleave(n, 0), generator=gen, **sampling)
        for t in range(max_new + 1):
            if t > 0:
                # feed token t-1 (at slot P+t-1): the logits of token t, and the routes of token t-1 itself
                p = (plen[rows] + t - 1).clamp(max=self.context_length - 1)[:, None]  # (n_cur, 1)
                cache.valid[:, P + t - 1] = True
                logits, r = m(tok[:, None], p, cache, P + t - 1, want_routes)
                if want_routes:
                    routes[rows, t - 1] = r[:, 0]
                if bool(done.all()):
                    break  # every row's last token has now been fed (its routes recorded)
                tok, lp = sample(logits, generator=gen, **sampling)
            tokens[rows, t] = tok
            logp[rows, t] = lp
            hit_eos = torch.zeros_like(done) if ignore_eos else torch.isin(tok, eos)
            at_limit = limit[rows] <= t + 1
            new = ~done & (hit_eos | at_limit)
            length[rows[new]] = t + 1
            reason[rows[new]] = torch.where(hit_eos[new], 1, 2)
            dead = done  # finished before this step and already fed: nothing more to compute for these rows
            done = done | new
            if stop and t % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1:
                done = self._scan_stops(tokens, rows, done, t, length, reason, stop)
            if not want_routes and bool(done.all()):
                break
            n_dead = int(dead.sum())
            if n_dead and n_dead * 4 >= len(rows) and max_new - t > 8:
                keep = ~dead  # drop finished rows: copying the cache pays for itself over the remaining steps
                rows, done, tok, cache = rows[keep], done[keep], tok[keep], cache.rows(keep)
        return tokens, length, reason, logp, routes, prompt_routes

    def _scan_stops(self, tokens, rows, done, t, length, reason, stop):
        """Mark running rows whose text so far contains a stop string (the exact cut is made in `_finish`)."""
        for j in (~done).nonzero().flatten().tolist():
            i = int(rows[j])
            if any(s in self.tokenizer.decode(tokens[i, :t + 1].tolist()) for s in stop):
                done = done.clone()
                done[j] = True
                length[i], reason[i] = t + 1, 1
        return done

    def _finish(self, prompts, enc, n, tokens, length, reason, logp, routes, prompt_routes, stop) -> Rollout:
        N = len(length)
        texts, lens = [], length.tolist()
        reasons = ["stop" if x == 1 else "length" for x in reason.tolist()]
        dec = self.tokenizer.decode
        for i in range(N):
            ids = tokens[i, :lens[i]].tolist()
            text = dec(ids)
            cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=-1)
            if cut >= 0:
                # the shortest prefix of tokens whose text holds a stop string (binary search: texts only grow)
                lo, hi = 1, len(ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if any(s in dec(ids[:mid]) for s in stop) else (mid + 1, hi)
                lens[i], reasons[i], text = lo, "stop", text[:cut]
            texts.append(text)
        length = torch.tensor(lens, dtype=torch.long)
        T = max(1, int(length.max()))
        mask = torch.arange(T) < length[:, None]  # (N, T)
        tokens = tokens[:, :T].cpu().masked_fill(~mask, self.tokenizer.pad_id)
        logp = logp[:, :T].cpu().masked_fill(~mask, 0.0)
        if routes is not None:
            routes = routes[:, :T].cpu().masked_fill(~mask[..., None, None], 0)
            P = prompt_routes.shape[1]
            prompt_routes = [prompt_routes[b, P - len(enc[b]):].cpu() for b in range(len(enc)) for _ in range(n)]
        else:
            prompt_routes = None
        prompt_ids = [list(enc[b]) for b in range(len(enc)) for _ in range(n)]
        return Rollout(list(prompts), torch.arange(len(enc)).repeat_interleave(n), prompt_ids,
                       torch.tensor([len(p) for p in prompt_ids]), tokens, mask, logp, routes, prompt_routes,
                       reasons, texts, self.numerics)
