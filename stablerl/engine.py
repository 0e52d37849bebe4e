"""The inference engine (DESIGN §2 engine): batched prefill + static-KV-cache decode under an explicit numerics policy.

It samples the rollouts of RL, so it *is* μ_θold in E3: its numerics (fp32 | bf16 | fp16 | fp8) are a setting, never
an accident, and everything the trainer needs to correct for it comes back in a `Rollout`: `logp_infer` (log μ of
each sampled token under the distribution actually sampled from, stablerl.sampling) and `routes_infer` (the experts
the engine ran, E7, for R3 replay).

The engine holds its own copy of the weights, laid out for decoding (fused QKV, experts stacked for grouped GEMMs,
RoPE tables) and cast or fp8-quantised by `sync`; it never shares a tensor with the trainer. Its forward re-states
stablerl.model's math for speed; tests/test_engine.py pins the two together (fp32: |Δ logp| ≤ 1e-4, same routes).
Layouts and the alignment of truncated sampling with the trainer's log-probs: docs/engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablerl.errors import UserError
from stablerl.model import ModelConfig, Transformer, get_model
from stablerl.sampling import sample

NUMERICS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
STOP_CHECK_EVERY = 4  # decode steps between stop-string scans (the exact cut is found afterwards)


# ---- numerics: linear layers in the engine's own precision -----------------------------------------------------


def quantize_e4m3(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 with one fp32 scale per slice reduced over `dim` (per token / per output channel)."""
    x = x.float()
    scale = x.abs().amax(dim, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class CastLinear(nn.Module):
    """y = x Wᵀ + b with W stored in the compute dtype (fp32 / bf16 / fp16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).clone())  # (out, in): never the trainer's tensor
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Fp8Linear(nn.Module):
    """fp8 (e4m3) emulation: weights quantised per output channel once, activations per token at each call.

    The e4m3 values are exact in fp32, so the fp32 matmul followed by the two scales is what an fp8 GEMM with
    fp32 accumulation computes; the output is rounded to bf16, the activation dtype of the fp8 policy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, s = quantize_e4m3(weight.detach(), dim=1)
        self.register_buffer("weight_fp8", q)  # (out, in) float8_e4m3fn
        self.register_buffer("weight_scale", s.view(-1))  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_e4m3(x)  # (..., in), (..., 1)
        y = (F.linear(xq.float(), self.weight_fp8.float()) * xs * self.weight_scale).to(torch.bfloat16)
        return y if self.bias is None else y + self.bias


def make_linear(weight, bias, numerics: str) -> nn.Module:
    return Fp8Linear(weight, bias) if numerics == "fp8" else CastLinear(weight, bias, NUMERICS[numerics])


class Experts(nn.Module):
    """E SwiGLU experts stacked as (E, H, 2I) gate|up and (E, I, H) down, run on the tokens routed to each after
    one sort by expert: a batched GEMM over all experts with groups zero-padded to a capacity C, plus one GEMM
    per expert for the tokens of a busier expert beyond C. C minimises a cost model: padded rows cost work,
    extra GEMMs cost a per-call overhead (large for small bf16 GEMMs on CPU); C = max load is plain padding,
    C = 0 one GEMM per expert (exactly the top-K FLOPs)."""

    def __init__(self, experts: nn.ModuleList, numerics: str):
        super().__init__()
        self.fp8, dtype = numerics == "fp8", NUMERICS[numerics]
        gu = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]).detach()  # (E, 2I, H)
        dn = torch.stack([e.down_proj.weight for e in experts]).detach()  # (E, H, I)
        self.gu_scale = self.down_scale = None
        if self.fp8:  # scales per expert and output channel, like Fp8Linear
            (gu, gs), (dn, ds) = quantize_e4m3(gu, dim=2), quantize_e4m3(dn, dim=2)
            self.gu_scale, self.down_scale = gs.transpose(1, 2), ds.transpose(1, 2)  # (E, 1, 2I), (E, 1, H)
            dtype = torch.float32  # e4m3 values are exact in fp32 (see Fp8Linear)
        self.register_buffer("gate_up", gu.to(dtype).transpose(1, 2).contiguous())  # (E, H, 2I)
        self.register_buffer("down", dn.to(dtype).transpose(1, 2).contiguous())  # (E, I, H)
        self.inter = dn.shape[2]
        # per-call overhead of one expert's two GEMMs, in padded-row equivalents (measured on an AVX-512 CPU)
        self.call_rows = 16 if dtype == torch.float32 else 40

    def capacity(self, counts: list[int]) -> int:
        E = len(counts)
        return min(sorted(set(counts)) + [0], key=lambda c: E * c + sum(self.call_rows + n - c for n in counts
                                                                        if n > c))

    def _mm(self, xs, w, scale):
        """(B, C, in) @ (B, in, out), in the fp8 case on per-row quantised activations."""
        if not self.fp8:
            return torch.bmm(xs, w)
        q, xscale = quantize_e4m3(xs)
        return (torch.bmm(q.float(), w) * xscale * scale).to(torch.bfloat16)

    def _ffn(self, xs, e: slice):
        g = self._mm(xs, self.gate_up[e], None if self.gu_scale is None else self.gu_scale[e])  # (B, C, 2I)
        h = F.silu(g[..., :self.inter]) * g[..., self.inter:]  # (B, C, I); zero padding rows stay zero
        return self._mm(h, self.down[e], None if self.down_scale is None else self.down_scale[e])  # (B, C, H)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        (M, K), (E, H, _) = idx.shape, self.gate_up.shape
        slot_e = idx.flatten()  # (M*K,) slot m*K + k -> expert
        order = slot_e.argsort(stable=True)  # slots grouped by expert
        tok, e_sorted = order // K, slot_e[order]  # token and expert of each sorted slot
        counts_t = torch.bincount(slot_e, minlength=E)  # (E,)
        counts = counts_t.tolist()
        C = self.capacity(counts)
        xs = x[tok]  # (M*K, H) tokens in expert order
        ys = torch.empty(M * K, H, dtype=x.dtype, device=x.device)  # expert outputs, same order
        if C:
            rank = torch.arange(M * K, device=x.device) - (counts_t.cumsum(0) - counts_t)[e_sorted]
            padded = rank < C
            dest = (e_sorted * C + rank)[padded]  # row of each padded slot in the (E*C) layout
            buf = x.new_zeros(E * C, H).index_copy_(0, dest, xs[padded]).view(E, C, H)
            ys[padded] = self._ffn(buf, slice(None)).view(E * C, H)[dest]
        start = 0
        for e, n in enumerate(counts):  # the tokens of busier experts beyond the capacity
            if n > C:
                ys[start + C:start + n] = self._ffn(xs[None, start + C:start + n], slice(e, e + 1))[0]
            start += n
        # gate-weighted sum over each token's K experts, added in expert order like the model's MoE block
        return torch.zeros_like(x).index_add_(0, tok, ys * weights.flatten()[order, None])  # (M, H)


# ---- the engine's model ---------------------------------------------------------------------------------------


@dataclass
class Cache:
    """Static K/V for all layers in one tensor per side, rows left-padded so every row writes the same slot."""

    k: torch.Tensor  # (L, N, nkv, S, D)
    v: torch.Tensor  # (L, N, nkv, S, D)
    valid: torch.Tensor  # (N, S) bool: slot holds a real token

    def rows(self, idx: torch.Tensor) -> Cache:
        return Cache(self.k[:, idx], self.v[:, idx], self.valid[idx])


class InferenceModel(nn.Module):
    """stablerl.model.Transformer's forward, restated for decoding under one numerics policy.

    Differences are layout only: q/k/v in one GEMM, q-norm and k-norm as one norm over q and k heads, RoPE from
    tables, GQA by grouping query heads per KV head (no K/V copies), stacked experts, logits for the last slot only.
    """

    def __init__(self, model: Transformer, numerics: str):
        super().__init__()
        cfg: ModelConfig = model.config
        self.cfg, self.numerics, self.dtype = cfg, numerics, NUMERICS[numerics]
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dt = self.dtype
        src = model.model
        self.embed = src.embed_tokens.weight.detach().to(dt).clone()  # (V, H)
        self.layers = []
        for blk in src.layers:
            a = blk.self_attn
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            lay = {"ln1": blk.input_layernorm.weight.detach().to(dt).clone(),
                   "ln2": blk.post_attention_layernorm.weight.detach().to(dt).clone(),
                   "qkv": make_linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias, numerics),
                   "o": make_linear(a.o_proj.weight, a.o_proj.bias, numerics)}
            if cfg.qk_norm:  # one weight row per q head then per k head: (nh + nkv, D)
                lay["qk_norm"] = torch.cat([a.q_norm.weight.detach().expand(self.nh, -1),
                                            a.k_norm.weight.detach().expand(self.nkv, -1)]).to(dt).clone()
            m = blk.mlp
            if blk.is_moe:
                # The router stays in the activation dtype even under fp8, as fp8 serving stacks keep it.
                lay["router"] = CastLinear(m.gate.weight, None, dt)
                lay["experts"] = Experts(m.experts, numerics)
                lay["k"], lay["norm_topk"] = m.k, m.norm_topk
            else:
                gb = None if m.gate_proj.bias is None else torch.cat([m.gate_proj.bias, m.up_proj.bias])
                lay["gate_up"] = make_linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), gb, numerics)
                lay["down"] = make_linear(m.down_proj.weight, m.down_proj.bias, numerics)
            self.layers.append(lay)
        self.norm = src.norm.weight.detach().to(dt).clone()
        self.lm_head = CastLinear(model.lm_head.weight, None, dt)  # kept in the activation dtype under fp8 too
        ctx = cfg.max_position_embeddings
        inv_freq = model.inv_freq.float()
        freqs = torch.arange(ctx, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq  # (ctx, D/2)
        self.cos = torch.cat((freqs, freqs), -1).cos().to(dt)  # (ctx, D), same fp32 ops as the model, then cast
        sin = freqs.sin()
        self.sin = torch.cat((-sin, sin), -1).to(dt)  # rotate_half's sign folded in: x·cos + roll(x)·sin
        self.is_moe = any(b.is_moe for b in src.layers)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # fp32 normalisation whatever the compute dtype, then scale in the compute dtype: the model's RMSNorm
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.rms_norm_eps).to(x.dtype)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin

    def attention(self, lay, h, cos, sin, cache: Cache, li: int, s0: int, mask):
        N, T, _ = h.shape
        nh, nkv, D = self.nh, self.nkv, self.hd
        S, rep = s0 + T, nh // nkv
        qkv = lay["qkv"](h).view(N, T, nh + 2 * nkv, D)  # (N, T, nh+2nkv, D)
        qk = qkv[:, :, :nh + nkv]
        if "qk_norm" in lay:
            qk = self.rms(qk, lay["qk_norm"])
        qk = self.rope(qk, cos, sin)  # (N, T, nh+nkv, D)
        cache.k[li, :, :, s0:S] = qk[:, :, nh:].transpose(1, 2)
        cache.v[li, :, :, s0:S] = qkv[:, :, nh + nkv:].transpose(1, 2)
        # GQA without copying K/V: the rep query heads of KV head j (heads j*rep .. j*rep+rep-1) become rep query
        # rows of one (N*nkv)-batched matmul; explicit bmm beats SDPA's CPU kernels at decode sizes.
        # Low-precision policies keep K/V at their rounded values in an fp32 cache, so scores accumulate and the
        # softmax runs in fp32 and P is rounded before P·V: FlashAttention's numerics, on fast fp32 kernels.
        q = qk[:, :, :nh].reshape(N, T, nkv, rep, D).transpose(1, 2).reshape(N * nkv, T * rep, D).float()
        k = cache.k[li, :, :, :S].reshape(N * nkv, S, D)  # views of the cache, no copy
        v = cache.v[li, :, :, :S].reshape(N * nkv, S, D)
        p = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=D ** -0.5).softmax(-1)  # (N*nkv, T*rep, S)
        if self.dtype != torch.float32:
            p = p.to(self.dtype).float()
        y = torch.bmm(p, v).view(N, nkv, T, rep, D).transpose(1, 2).reshape(N, T, nh * D).to(self.dtype)
        return lay["o"](y)

    def moe(self, lay, h):
        N, T, H = h.shape
        flat = h.reshape(-1, H)  # (M, H)
        probs = F.softmax(lay["router"](flat), dim=-1, dtype=torch.float32)  # (M, E)
        weights, idx = torch.topk(probs, lay["k"], dim=-1)  # (M, K)
        if lay["norm_topk"]:
            weights = weights / weights.sum(-1, keepdim=True)
        return lay["experts"](flat, idx, weights.to(h.dtype)).view(N, T, H), idx.view(N, T, -1)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache, s0: int,
                want_routes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids, pos (N, T) at slots s0..s0+T-1 -> fp32 logits of the last slot (N, V), routes (N, T, L, K)."""
        N, T = ids.shape
        S = s0 + T  # the caller marks slots s0..S-1 in cache.valid (left padding is not valid)
        # Keys a query may see: causal, real tokens only; each slot also sees itself so the queries of left
        # padding are never fully masked (NaN-free), although nothing reads them.
        allowed = cache.valid[:, None, :S]  # (N, 1, S): one new token per row sees every real slot
        if T > 1:
            causal = torch.ones(T, S, dtype=torch.bool, device=ids.device).tril(s0)  # (T, S)
            own = causal & ~causal.tril(s0 - 1)  # (T, S) the query's own slot
            allowed = (causal & (allowed | own)).repeat_interleave(self.nh // self.nkv, dim=1)  # (N, T*rep, S)
        # additive, shared by all layers; rows repeated per KV head to match the (N*nkv)-batched scores
        mask = torch.zeros(allowed.shape, device=ids.device).masked_fill_(~allowed, float("-inf"))
        mask = mask.repeat_interleave(self.nkv, dim=0)  # (N*nkv, T*rep | 1, S)
        x = F.embedding(ids, self.embed)  # (N, T, H)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (N, T, 1, D)
        routes = []
        for li, lay in enumerate(self.layers):
            x = x + self.attention(lay, self.rms(x, lay["ln1"]), cos, sin, cache, li, s0, mask)
            h = self.rms(x, lay["ln2"])
            if "experts" in lay:
                h, r = self.moe(lay, h)
                routes.append(r)
            else:
                g = lay["gate_up"](h)
                inter = g.shape[-1] // 2
                h = lay["down"](F.silu(g[..., :inter]) * g[..., inter:])
            x = x + h
        logits = self.lm_head(self.rms(x[:, -1], self.norm)).float()  # (N, V)
        return logits, (torch.stack(routes, dim=2) if want_routes and routes else None)

    def new_cache(self, n: int, slots: int, device) -> Cache:
        shape = (len(self.layers), n, self.nkv, slots, self.hd)
        return Cache(torch.zeros(shape, device=device), torch.zeros(shape, device=device),  # fp32, see attention
                     torch.zeros(n, slots, dtype=torch.bool, device=device))


# ---- the engine -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """N = B·G samples, prompt-major (the G samples of prompt b are rows b·G .. b·G+G-1). T = longest response."""

    prompts: list[str]  # the B prompts
    prompt_index: torch.Tensor  # (N,) int64: row -> prompt
    prompt_ids: list[list[int]]  # N token lists as the model saw them (BOS first)
    prompt_lens: torch.Tensor  # (N,) int64
    tokens: torch.Tensor  # (N, T) int64 response tokens, right-padded with the tokenizer's pad id
    mask: torch.Tensor  # (N, T) bool: real response tokens, including the EOS / stop-string token that ended it
    logp_infer: torch.Tensor  # (N, T) fp32 log μ of each token under the distribution sampled from; 0 on padding
    routes_infer: torch.Tensor | None  # (N, T, L, K) int64 experts each response token ran through; 0 on padding
    prompt_routes: list[torch.Tensor] | None  # N tensors (P_i, L, K): the prompt tokens' experts (R3 prefix)
    finish_reason: list[str]  # "stop" (EOS or stop string) | "length" (max_new_tokens or the model context)
    texts: list[str]  # decoded responses, special tokens dropped, cut before a matched stop string
    numerics: str

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)  # (N,)


class Engine:
    """`Engine(model_or_dir, tokenizer, numerics)`; `sync(model)` after each trainer update; `generate(...)`.

    Sampling arguments left as None in `generate` take the engine's defaults: the paper's setting (temperature 1,
    no truncation) or those of the EngineConfig given to `from_config`.
    """

    def __init__(self, model_or_dir: Transformer | str | Path, tokenizer=None, numerics: str = "bf16",
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 stop: tuple[str, ...] = (), model_seed: int = 0):
        if numerics not in NUMERICS:
            raise UserError(f"numerics: got {numerics!r}, expected one of {', '.join(map(repr, NUMERICS))}")
        if not isinstance(model_or_dir, nn.Module):
            model_or_dir, tok = get_model(model_or_dir, seed=model_seed)  # model_seed: presets' random init
            tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError("Engine: a tokenizer is needed with a model object")
        self.tokenizer, self.numerics, self.config = tokenizer, numerics, model_or_dir.config
        self.defaults = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             stop=tuple(stop))
        self.model: InferenceModel
        self.sync(model_or_dir)

    @classmethod
    def from_config(cls, model_or_dir, tokenizer, cfg) -> Engine:
        """From a stablerl.config.EngineConfig: its numerics, and its sampling settings as the defaults."""
        return cls(model_or_dir, tokenizer, numerics=cfg.numerics, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)

    @torch.no_grad()
    def sync(self, model: Transformer) -> None:
        """Copy the trainer's current weights into the engine, cast (or fp8-quantised) to its numerics."""
        if model.config != self.config:
            raise ValueError("Engine.sync: the model's config differs from the engine's")
        self.device = next(model.parameters()).device
        self.model = InferenceModel(model, self.numerics)

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
        """Prompt ids (BOS first); UserError naming the prompt's index if one cannot be answered."""
        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise UserError(f"prompt {i}: expected a string, got {type(p).__name__}")
            ids = self.tokenizer.encode_prompt(p)
            if why := self.problem(ids):
                raise UserError(f"prompt {i}: {why}")
            out.append(ids)
        return out

    def generate(self, prompts: list[str], n: int = 1, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_new_tokens: int | None = None, stop: tuple[str, ...] | None = None,
                 seed: int | torch.Generator = 0, ignore_eos: bool = False, return_routes: bool = True) -> Rollout:
        """n samples for each prompt. A row stops at EOS (unless `ignore_eos`), at a stop string, after
        `max_new_tokens`, or when prompt + response fill the model context (finish_reason "length")."""
        d = self.defaults
        temperature = d["temperature"] if temperature is None else temperature
        top_p = d["top_p"] if top_p is None else top_p
        top_k = d["top_k"] if top_k is None else top_k
        max_new_tokens = d["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        stop = tuple(d["stop"] if stop is None else stop)
        if not prompts:
            raise UserError("generate: no prompts")
        for name, ok, want in (("n", n >= 1, ">= 1"), ("temperature", temperature >= 0, ">= 0"),
                               ("top_p", 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k >= 0, ">= 0"),
                               ("max_new_tokens", max_new_tokens >= 1, ">= 1")):
            if not ok:
                raise UserError(f"generate: {name} must be {want}, got {locals()[name]}")
        if any(not s for s in stop):
            raise UserError("generate: empty stop string")
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator(self.device).manual_seed(int(seed))
        enc = self.encode(prompts)
        with torch.inference_mode():
            out = self._run(enc, n, dict(temperature=temperature, top_p=top_p, top_k=top_k), max_new_tokens, gen,
                            ignore_eos, return_routes and self.model.is_moe, stop)
        # clone outside inference mode: the trainer may save these for backward (e.g. routes as gather indices)
        tokens, length, reason, logp, routes, prompt_routes = (None if t is None else t.clone() for t in out)
        return self._finish(prompts, enc, n, tokens, length, reason, logp, routes, prompt_routes, stop)

    def _run(self, enc, n, sampling, max_new, gen, ignore_eos, want_routes, stop):
        m, dev, pad_id, eos = self.model, self.device, self.tokenizer.pad_id, self.tokenizer.eos_id
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
            routes = torch.zeros(N, max_new, *r.shape[2:], dtype=torch.long, device=dev)  # (N, T, L, K)
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
            hit_eos = torch.zeros_like(done) if ignore_eos else tok == eos
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
