"""The inference engine's own copy of the model: numerics policies, decode layouts, KV cache and forward.

`InferenceModel(model, numerics)` copies a stablerl.model.Transformer's weights (never sharing a tensor) and casts
them to the policy's dtype, or quantises them to e4m3 for fp8 by building `Fp8Linear` / fp8 `Experts` modules in
place of the trainer's Linear layers. Its forward restates the Transformer's math in a layout made for batched
decoding: q/k/v in one GEMM, q-norm and k-norm as one norm, RoPE from tables, GQA without K/V copies, experts
stacked for grouped GEMMs, logits for the last slot only. tests/test_engine.py pins it to the Transformer
(fp32: |Δ logp| ≤ 1e-4, identical routes).

Numerics (docs/engine.md): fp32 | bf16 | fp16 hold weights and activations in that dtype (norms and softmaxes
in fp32, as the model does); fp8 = e4m3 weights per output channel and e4m3 activations per token for every
Linear of the blocks and the experts, with bf16 activations between them (router, embeddings, norms and the LM
head stay bf16). Attention accumulates in fp32 for every policy (K/V cached in the activation dtype, widened to
fp32 when read, P rounded before P·V), as FlashAttention-style kernels do. Routes come back in `route_dtype`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablerl.model import ModelConfig, Transformer

NUMERICS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds the expert ids 0 … num_experts−1: uint8 up to 256 experts, int16 up to
    32768, int32 beyond.

    Routes (N, T, L, K) travel from the engine through the trainer in several copies (the rollout's response and
    prompt routes, their full-sequence layout for R3, the trainer's own routes for R2): int64 spent 8 bytes on what
    one byte holds (48 layers x top-8: 3 KiB per token instead of 384 B). Consumers widen them with `.long()`
    where they index (stablerl.model's MoE does): a uint8 tensor used directly as an index is read as a boolean
    mask. int16 rather than uint16: torch's uint16 lacks ops the engine uses (masked_fill).
    """
    if num_experts <= 2 ** 8:
        return torch.uint8
    if num_experts <= 2 ** 15:
        return torch.int16
    return torch.int32


# ---- numerics: linear layers in the engine's own precision -----------------------------------------------------


def quantize_e4m3(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 with one fp32 scale per slice reduced over `dim` (per token / per output channel)."""
    x = x.float()
    scale = x.abs().amax(dim, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith(("flags", "Features")) for w in line.split())


def native_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dtype` GEMMs have hardware support here. x86 CPUs without AVX512-BF16 / AMX run torch's bf16 GEMMs
    in slow generic code: 27 ms vs 0.32 ms in fp32 for 256x256x256 on an AVX2 EPYC (docs/log.md 2026-11-29).
    Unknown CPUs (no /proc/cpuinfo) are taken to have it."""
    if dtype in (torch.float32, torch.float64) or device.type != "cpu" or not _cpu_flags():
        return True
    need = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},  # x86 flags; `bf16` is aarch64's feature
            torch.float16: {"avx512_fp16", "amx_fp16", "fphp"}}[dtype]
    return bool(need & _cpu_flags())


class CastLinear(nn.Module):
    """y = x Wᵀ + b with W stored in the compute dtype (fp32 / bf16 / fp16).

    `emulate` (CPUs without native low-precision GEMMs, see `native_gemm`): W and b hold their rounded values in
    fp32 and the GEMM runs in fp32 on the (exactly widened) low-precision input, then rounds its output once. The
    products of two bf16 or fp16 numbers are exact in fp32, so this is a low-precision GEMM with fp32 accumulation
    and one rounding (what bf16 tensor cores and AVX512-BF16 compute), on fast fp32 kernels. torch's generic CPU
    kernels round a few last bits differently (bias added after rounding): on tiny-moe, logits of the emulated and
    the native bf16 engine differ by 0.006, against 0.08 between bf16 and fp32 (tests/test_engine.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, emulate: bool = False):
        super().__init__()
        store = torch.float32 if emulate else dtype
        self.dtype = dtype
        # (out, in): never the trainer's tensor
        self.register_buffer("weight", weight.detach().to(dtype).to(store).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).to(store).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(self.dtype)


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


def round_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest symmetric integer quantisation per output channel (row), returned dequantised in w's dtype.

    The engine-only discrepancy dial (`engine.weight_bits`): quantised-rollout systems sample from int8/int4 weight
    copies of the trainer's policy, so μ ≠ π_θold by more than any float cast (E3's first factor). bits = 0: w as is.
    """
    if not bits:
        return w
    qmax = 2 ** (bits - 1) - 1  # symmetric: int8 -> [-127, 127], int4 -> [-7, 7]
    scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax  # (out, 1)
    return (w.detach() / scale).round().clamp(-qmax, qmax) * scale


def make_linear(weight, bias, numerics: str, emulate: bool = False) -> nn.Module:
    return Fp8Linear(weight, bias) if numerics == "fp8" else CastLinear(weight, bias, NUMERICS[numerics], emulate)


class Experts(nn.Module):
    """E SwiGLU experts stacked as (E, H, 2I) gate|up and (E, I, H) down, applied to the tokens routed to each after
    one sort by expert, in one of two ways:
    - padded: every expert's group zero-padded to the largest, one batched GEMM per projection;
    - grouped: one GEMM per expert on exactly its rows (the top-K FLOPs, E calls per projection).
    Padding wins while groups are even and calls are dear: small bf16 GEMMs cost ~30 µs per call on CPU, fp32
    ones much less, so the padded path is taken up to `pad_limit` times the routed rows (measured, tiny-moe)."""

    def __init__(self, experts: nn.ModuleList, numerics: str, emulate: bool = False, weight_bits: int = 0):
        super().__init__()
        self.fp8, dtype = numerics == "fp8", NUMERICS[numerics]
        self.out_dtype = dtype
        gu = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]).detach()  # (E, 2I, H)
        dn = torch.stack([e.down_proj.weight for e in experts]).detach()  # (E, H, I)
        gu, dn = round_weights(gu, weight_bits), round_weights(dn, weight_bits)  # per expert and output channel
        if self.fp8:  # scales per expert and output channel, like Fp8Linear
            (gu, gs), (dn, ds) = quantize_e4m3(gu, dim=2), quantize_e4m3(dn, dim=2)
            self.register_buffer("gu_scale", gs.transpose(1, 2))  # (E, 1, 2I)
            self.register_buffer("down_scale", ds.transpose(1, 2))  # (E, 1, H)
            dtype = torch.float32  # e4m3 values are exact in fp32 (see Fp8Linear)
        elif emulate:  # the rounded weights held in fp32 (see CastLinear)
            gu, dn, dtype = gu.to(dtype), dn.to(dtype), torch.float32
        self.register_buffer("gate_up", gu.to(dtype).transpose(1, 2).contiguous())  # (E, H, 2I)
        self.register_buffer("down", dn.to(dtype).transpose(1, 2).contiguous())  # (E, I, H)
        self.inter = dn.shape[2]
        self.pad_limit = 1.1 if dtype == torch.float32 else 2.4

    def _quant(self, x):
        """fp8: per-row e4m3 activations (values exact in fp32) and their scales; else x in the GEMM dtype."""
        if not self.fp8:
            return x.to(self.gate_up.dtype), None
        q, scale = quantize_e4m3(x)
        return q.float(), scale

    def _padded(self, xs, e_sorted, counts_t, C):
        """xs (M*K, H) in expert order -> (M*K, H) expert outputs via (E, C)-padded batched GEMMs."""
        (MK, H), E, inter = xs.shape, len(counts_t), self.inter
        rank = torch.arange(MK, device=xs.device) - (counts_t.cumsum(0) - counts_t)[e_sorted]
        dest = e_sorted * C + rank  # (M*K,) row of each slot in the padded layout
        buf, xscale = self._quant(xs.new_zeros(E * C, H).index_copy_(0, dest, xs).view(E, C, H))
        g = torch.bmm(buf, self.gate_up)  # (E, C, 2I)
        g = (g * xscale * self.gu_scale if self.fp8 else g).to(self.out_dtype)  # one rounding of the fp32 sums
        h, hscale = self._quant(F.silu(g[..., :inter]) * g[..., inter:])  # (E, C, I); padding rows stay 0
        y = torch.bmm(h, self.down)  # (E, C, H)
        y = (y * hscale * self.down_scale if self.fp8 else y).to(self.out_dtype)
        return y.view(E * C, H)[dest]

    def _grouped(self, xs, e_sorted, counts):
        """xs (M*K, H) in expert order -> (M*K, H) expert outputs, one GEMM per expert and projection."""
        bounds = [(e, sum(counts[:e]), sum(counts[:e + 1])) for e in range(len(counts)) if counts[e]]
        xq, xscale = self._quant(xs)
        g = xq.new_empty(xs.shape[0], 2 * self.inter)  # (M*K, 2I)
        for e, a, b in bounds:
            torch.mm(xq[a:b], self.gate_up[e], out=g[a:b])
        g = (g * xscale * self.gu_scale[e_sorted, 0] if self.fp8 else g).to(self.out_dtype)
        h, hscale = self._quant(F.silu(g[:, :self.inter]) * g[:, self.inter:])  # (M*K, I)
        y = h.new_empty(xs.shape)  # (M*K, H)
        for e, a, b in bounds:
            torch.mm(h[a:b], self.down[e], out=y[a:b])
        return (y * hscale * self.down_scale[e_sorted, 0] if self.fp8 else y).to(self.out_dtype)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        (M, K), E = idx.shape, self.gate_up.shape[0]
        slot_e = idx.flatten()  # (M*K,) slot m*K + k -> expert
        order = slot_e.argsort(stable=True)  # slots grouped by expert
        tok, e_sorted = order // K, slot_e[order]  # token and expert of each sorted slot
        counts_t = torch.bincount(slot_e, minlength=E)  # (E,)
        counts = counts_t.tolist()
        C = max(counts)
        xs = x[tok]  # (M*K, H) tokens in expert order
        if E * C <= self.pad_limit * M * K:
            ys = self._padded(xs, e_sorted, counts_t, C)
        else:
            ys = self._grouped(xs, e_sorted, counts)
        # gate-weighted sum over each token's K experts, added in expert order like the model's MoE block
        return torch.zeros_like(x).index_add_(0, tok, ys * weights.flatten()[order, None])  # (M, H)


# ---- the engine's model ---------------------------------------------------------------------------------------


@dataclass
class Cache:
    """Static K/V for all layers in one tensor per side, rows left-padded so every row writes the same slot.

    K/V are stored in the policy's activation dtype (`InferenceModel.cache_dtype`): they are rounded to it when
    computed, so storing them there is exact, and bf16/fp16/fp8 caches take half the memory of fp32 ones."""

    k: torch.Tensor  # (L, N, nkv, S, D) in cache_dtype
    v: torch.Tensor  # (L, N, nkv, S, D) in cache_dtype
    valid: torch.Tensor  # (N, S) bool: slot holds a real token

    def rows(self, idx: torch.Tensor) -> Cache:
        return Cache(self.k[:, idx], self.v[:, idx], self.valid[idx])


class InferenceModel(nn.Module):
    """stablerl.model.Transformer's forward, restated for decoding under one numerics policy.

    Differences are layout only: q/k/v in one GEMM, q-norm and k-norm as one norm over q and k heads, RoPE from
    tables, GQA by grouping query heads per KV head (no K/V copies), stacked experts, logits for the last slot only.

    `cache_dtype` (default: the activation dtype) is the K/V cache's storage dtype; any dtype that holds the
    activation dtype exactly (fp32) gives bitwise the same results, which tests/test_engine.py checks.
    """

    def __init__(self, model: Transformer, numerics: str, cache_dtype: torch.dtype | None = None,
                 gather: Callable[[nn.Module], AbstractContextManager] = nullcontext, weight_bits: int = 0):
        """`gather(module)`: a context in which `module`'s own parameters are whole, for a sharded (FSDP) model; it
        is entered for the model (embeddings, final norm, LM head), then for one decoder layer at a time.
        `weight_bits` (0 = off): the projection and expert weights rounded to that many bits per output channel
        (round_weights) before the numerics policy applies; embeddings, norms, router and LM head stay as they are,
        as weight-only quantised serving keeps them."""
        super().__init__()
        self.weight_bits = weight_bits
        with gather(model):
            self._copy(model, numerics, cache_dtype, gather)

    def _copy(self, model: Transformer, numerics: str, cache_dtype: torch.dtype | None, gather) -> None:
        cfg: ModelConfig = model.config
        self.cfg, self.numerics, self.dtype = cfg, numerics, NUMERICS[numerics]
        self.cache_dtype = self.dtype if cache_dtype is None else cache_dtype
        self.route_dtype = route_dtype(cfg.num_experts)
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dt = self.dtype
        # same numerics either way; only which kernels compute them (see native_gemm, CastLinear)
        self.emulated = not native_gemm(dt, model.lm_head.weight.device)
        em = self.emulated
        src = model.model
        self.embed = src.embed_tokens.weight.detach().to(dt).clone()  # (V, H)
        self.layers = []
        for layer in src.layers:
            with gather(layer) as blk:
                self.layers.append(self._copy_layer(blk, cfg, numerics, em))
        self.norm = src.norm.weight.detach().to(dt).clone()
        self.lm_head = CastLinear(model.lm_head.weight, None, dt, em)  # kept in the activation dtype under fp8 too
        ctx = cfg.max_position_embeddings
        inv_freq = model.inv_freq.float()
        freqs = torch.arange(ctx, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq  # (ctx, D/2)
        self.cos = torch.cat((freqs, freqs), -1).cos().to(dt)  # (ctx, D), same fp32 ops as the model, then cast
        sin = freqs.sin()
        self.sin = torch.cat((-sin, sin), -1).to(dt)  # rotate_half's sign folded in: x·cos + roll(x)·sin
        self.is_moe = any(b.is_moe for b in src.layers)

    def _copy_layer(self, blk, cfg: ModelConfig, numerics: str, em: bool) -> dict:
        """One decoder layer's weights in the engine's layout and numerics."""
        dt = self.dtype
        a = blk.self_attn
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        def q(w):  # the engine-only dial (engine.weight_bits); a no-op at 0
            return round_weights(w, self.weight_bits)

        lay = {"ln1": blk.input_layernorm.weight.detach().to(dt).clone(),
               "ln2": blk.post_attention_layernorm.weight.detach().to(dt).clone(),
               "qkv": make_linear(q(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), bias, numerics,
                                  em),
               "o": make_linear(q(a.o_proj.weight), a.o_proj.bias, numerics, em)}
        if cfg.qk_norm:  # one weight row per q head then per k head: (nh + nkv, D)
            lay["qk_norm"] = torch.cat([a.q_norm.weight.detach().expand(self.nh, -1),
                                        a.k_norm.weight.detach().expand(self.nkv, -1)]).to(dt).clone()
        m = blk.mlp
        if blk.is_moe:
            # The router stays in the activation dtype even under fp8, as fp8 serving stacks keep it.
            lay["router"] = CastLinear(m.gate.weight, None, dt, em)
            lay["experts"] = Experts(m.experts, numerics, em, self.weight_bits)
            lay["k"], lay["norm_topk"] = m.k, m.norm_topk
        else:
            gb = None if m.gate_proj.bias is None else torch.cat([m.gate_proj.bias, m.up_proj.bias])
            lay["gate_up"] = make_linear(q(torch.cat([m.gate_proj.weight, m.up_proj.weight])), gb, numerics, em)
            lay["down"] = make_linear(q(m.down_proj.weight), m.down_proj.bias, numerics, em)
        return lay

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # torch computes low-precision inputs in fp32 and rounds once (the model's RMSNorm rounds before the
        # weight too: a last-bit difference in bf16, none in fp32)
        if w.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)
        return F.rms_norm(x, (x.shape[-1],), None, self.cfg.rms_norm_eps) * w  # q-norm and k-norm rows at once

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
        # Low-precision policies cache K/V in their dtype and widen only this layer's S filled slots to fp32 here
        # (exact), so scores accumulate and the softmax runs in fp32 and P is rounded before P·V: FlashAttention's
        # numerics, on fast fp32 kernels (a bf16 bmm with fp32 output need not sum in the same order, so it would
        # not be bitwise the same). fp32 caches are read as views, no copy.
        q = qk[:, :, :nh].reshape(N, T, nkv, rep, D).transpose(1, 2).reshape(N * nkv, T * rep, D).float()
        k = cache.k[li, :, :, :S].reshape(N * nkv, S, D).float()  # (N*nkv, S, D)
        v = cache.v[li, :, :, :S].reshape(N * nkv, S, D).float()  # (N*nkv, S, D)
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
        # routes leave in the compact dtype per layer and step, so no int64 buffer of all of them is ever built
        routes = idx.view(N, T, -1).to(self.route_dtype)  # (N, T, K)
        return lay["experts"](flat, idx, weights.to(h.dtype)).view(N, T, H), routes

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache, s0: int,
                want_routes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids, pos (N, T) at slots s0..s0+T-1 -> fp32 logits of the last slot (N, V), routes (N, T, L, K) in
        `route_dtype`."""
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
        shape = (len(self.layers), n, self.nkv, slots, self.hd)  # (L, N, nkv, S, D)
        kw = dict(dtype=self.cache_dtype, device=device)  # the activation dtype: see Cache, attention
        return Cache(torch.zeros(shape, **kw), torch.zeros(shape, **kw),
                     torch.zeros(n, slots, dtype=torch.bool, device=device))
