"""One transformer for the Qwen3 (dense), Qwen3-MoE and Llama families, with explicit routing.

Module names follow the Hugging Face checkpoints (`model.layers.0.mlp.experts.3.up_proj.weight`, ...)
so a `config.json` + `*.safetensors` directory loads with no key mapping, and `save` writes the same
format back. Verified against `transformers` in tests/test_model.py (fp32 logits and routes).

Routing is an argument, never a global (DESIGN E7): `forward(ids, routes=None)` returns the experts
each MoE layer used, `routes` int (N, T, L, K) with L = number of MoE layers; passing them back in
makes those experts run, with gate weights recomputed from the *current* router logits so the router
still receives gradient. R2 replays the trainer's own θ_old routes, R3 the inference engine's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablerl.errors import UserError

ARCHS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    """The subset of an HF `config.json` that defines the computation. Field names are HF's."""

    model_type: str = "qwen3_moe"  # one of ARCHS
    vocab_size: int = 99
    hidden_size: int = 128
    intermediate_size: int = 512  # dense MLP width (dense layers, Llama/Qwen3)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", "factor": ...}; None = plain RoPE
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # MoE (qwen3_moe only)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # kept as config.json gives it: several ids all stop generation
    pad_token_id: int | None = 0

    @property
    def qk_norm(self) -> bool:  # Qwen3 normalises q and k per head; Llama does not
        return self.model_type in ("qwen3", "qwen3_moe")

    def is_moe_layer(self, i: int) -> bool:
        return (self.model_type == "qwen3_moe" and self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> ModelConfig:
        mt = d.get("model_type")
        if mt not in ARCHS:
            raise ValueError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(ARCHS)}")
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        d = dict(d)
        # transformers >= 5 writes `num_local_experts` and nests rope settings in `rope_parameters`.
        if "num_experts" not in d and "num_local_experts" in d:
            d["num_experts"] = d["num_local_experts"]
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "llama3"):
            raise ValueError(f"{where}: rope scaling {scaling.get('rope_type')!r} is not supported "
                             "(supported: default, llama3)")
        d["rope_scaling"] = scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        for k in ("bos_token_id", "pad_token_id"):  # a list of EOS ids stays a list (to_hf writes it back)
            if isinstance(d.get(k), list):
                d[k] = d[k][0]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self) -> dict:
        d = asdict(self)
        d["architectures"] = [ARCHS[self.model_type]]
        d["hidden_act"] = "silu"
        d["torch_dtype"] = "float32"
        d["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        if self.model_type != "qwen3_moe":
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "decoder_sparse_step", "mlp_only_layers"):
                d.pop(k)
        else:
            d["num_local_experts"] = self.num_experts
        return d


PRESETS: dict[str, ModelConfig] = {
    # ~3.4M parameters, ~1M active per token: big enough to learn the built-in tasks, small enough for 2 CPU cores.
    "tiny-moe": ModelConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256),
    "tiny-dense": ModelConfig(model_type="qwen3", intermediate_size=512, num_experts=0),
    # ~158M parameters, ~25M active, Qwen3-MoE shape at the char vocabulary: the scale where kernels, not Python,
    # set the step time (benchmarks/mfu.py), still trainable on a CPU
    "small-moe": ModelConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=384,
                             max_position_embeddings=1024),
    # The shapes of real checkpoints (Qwen/Qwen3-0.6B and Qwen/Qwen3-30B-A3B config.json), with random weights and
    # no download: for memory and speed at real vocabulary and width (benchmarks/memory.py). 30B-A3B does not fit a
    # CPU machine's memory in fp32 (~122 GB); its config is here for tools that build on the meta device.
    "qwen3-0.6b": ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                              rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                              num_experts=0, bos_token_id=151643, eos_token_id=151645, pad_token_id=None),
    "qwen3-30b-a3b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, rope_theta=1000000.0,
                                 max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
                                 moe_intermediate_size=768, bos_token_id=151643, eos_token_id=151645,
                                 pad_token_id=None),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as the HF reference does (parity in bf16 too).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (D/2,)
    s = cfg.rope_scaling
    if s:  # Llama-3.1 frequency-dependent scaling
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, nh * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * d, h, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        N, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(N, T, -1, d)  # (N, T, nh, D)
        k = self.k_proj(x).view(N, T, -1, d)  # (N, T, nkv, D)
        v = self.v_proj(x).view(N, T, -1, d).transpose(1, 2)  # (N, nkv, T, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]  # GQA: each kv head serves `rep` query heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, nh, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(N, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Also one expert of the MoE block."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router + top-k SwiGLU experts (Qwen3-MoE), routes in and out (E7)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        # run experts no token chose too (on no rows: a zero gradient instead of none). FSDP2 needs it: it
        # reduce-scatters only parameters with a gradient, and every rank must agree on which (stablerl.distributed)
        self.every_expert = False

    def forward(self, x: torch.Tensor, routes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, T, H = x.shape
        flat = x.reshape(-1, H)  # (M, H), M = N*T
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)  # (M, E)
        if routes is None:
            weights, idx = torch.topk(probs, self.k, dim=-1)  # (M, K)
        else:
            # E7 replay: the given experts run, weighted by the *current* router's probabilities, so
            # the router still gets gradient through `gather` even though the choice is fixed.
            idx = routes.reshape(-1, self.k).long()  # (M, K)
            weights = probs.gather(-1, idx)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        # Dispatch each expert once on the tokens that chose it (batched, no per-token loop).
        order = idx.flatten().argsort(stable=True)  # (M*K,) slots grouped by expert
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        tok = order // self.k  # token of each slot
        w = weights.flatten()[order]
        start = 0
        for e, c in enumerate(counts):
            if c or self.every_expert:
                t, we = tok[start:start + c], w[start:start + c]
                out.index_add_(0, t, self.experts[e](flat[t]) * we[:, None])
            start += c
        return out.view(N, T, H), idx.view(N, T, self.k)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, routes=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, T, H) -> (N, T, H) and, for a MoE layer, the experts used (N, T, K)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        h, used = self.mlp(h, routes)
        return x + h, used


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (N, T, V) fp32; None when the forward was asked for hidden states only
    routes: torch.Tensor | None  # (N, T, L, K) int64 experts used per MoE layer (compact copies: decode.route_dtype)
    hidden: torch.Tensor | None = None  # (N, T, H) final-normed hidden states (the LM head's input), when asked


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def is_moe(self) -> bool:
        return bool(self.config.moe_layers)

    def forward(self, ids: torch.Tensor, routes: torch.Tensor | None = None, logits: bool = True,
                checkpoint: bool = False) -> ModelOutput:
        """ids (N, T): causal attention over right-padded rows at positions 0..T-1 (the training layout; the
        inference engine's KV-cache decode lives in stablerl/decode.py).
        routes (N, T, L, K): replay these experts (E7) instead of the router's top-k.
        logits=False: return the final hidden states instead of (N, T, V) logits, for callers that apply the LM head
        only where they need it, in chunks (stablerl.sequences.policy_logprobs: memory flat in V).
        checkpoint: recompute each decoder layer in the backward pass instead of keeping its activations.
        """
        N, T = ids.shape
        x = self.model.embed_tokens(ids)  # (N, T, H)
        freqs = torch.arange(T, device=ids.device).float()[:, None] * self.inv_freq  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D), broadcast over (N, heads)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        used, li = [], 0
        for block in self.model.layers:
            r = None if routes is None or not block.is_moe else routes[:, :, li]
            if checkpoint and torch.is_grad_enabled():
                # routing is a deterministic function of x, so the recomputation runs the experts this forward ran
                x, r = torch.utils.checkpoint.checkpoint(block, x, cos, sin, r, use_reentrant=False)
            else:
                x, r = block(x, cos, sin, r)
            if block.is_moe:
                used.append(r)
                li += 1
        h = self.model.norm(x)  # (N, T, H)
        routes_used = torch.stack(used, dim=2) if used else None  # (N, T, L, K)
        if not logits:
            return ModelOutput(None, routes_used, h)
        return ModelOutput(self.lm_head(h).float(), routes_used)  # (N, T, V)

    def num_params(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts only the K of E experts a token runs through."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.is_moe:
            c = self.config
            per_expert = sum(p.numel() for p in self.model.layers[c.moe_layers[0]].mlp.experts[0].parameters())
            n -= len(c.moe_layers) * (c.num_experts - c.num_experts_per_tok) * per_expert
        return n


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random init from a seed (std 0.02 like HF's `initializer_range`), norms at 1."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `auto` (cuda when available) -> torch.device; asking for CUDA without it is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA device (torch.cuda.is_available() is false); "
                        "use device=cpu or device=auto, or install a CUDA build of torch")
    return torch.device(name)
