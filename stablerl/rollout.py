"""Rollout backends: who samples μ_θold for the trainer, eval and `stablerl generate` (docs/engine.md, "Backends").

A backend turns prompts into a `stablerl.engine.Rollout` (log μ of every sampled token under the distribution
actually sampled from, the experts it ran for R3) and takes the trainer's weights after each update (`sync`).
`make_backend(cfg, model, tokenizer)` builds the one `engine.backend` names:

- `native`: stablerl's own engine (`stablerl.engine.Engine`, unchanged: `NativeBackend` only names it). The
  reference: every numerics policy of the dial, routes recorded while decoding, truncation computed by the same
  `stablerl.sampling` code the trainer scores with.
- `vllm`: vLLM (`stablerl.vllm_backend`, imported only when asked for), with processed log-probs and a router hook
  for routes; it refuses every setting under which its μ would not be the trainer's sampling distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from stablerl.decode import NUMERICS
from stablerl.engine import Engine, Rollout
from stablerl.errors import UserError
from stablerl.model import Transformer

__all__ = ["BACKENDS", "NativeBackend", "RolloutBackend", "Support", "make_backend"]

BACKENDS = ("native", "vllm")


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


class NativeBackend(Engine):
    """stablerl's engine under its backend name: a subclass that adds two class attributes and overrides nothing,
    so its rollouts are bitwise those of `Engine` (tests/test_rollout.py) and `isinstance(b, Engine)` holds."""

    name = "native"
    support = Support(
        numerics=tuple(NUMERICS),
        routes="recorded while decoding (prefill for the prompt, each decode step, one extra step for the last token)",
        truncation="exact: the engine samples with stablerl.sampling, the function the trainer scores with",
        weight_sync="copies the trainer's weights, cast or fp8-quantised to the numerics (InferenceModel)",
    )


def make_backend(cfg, model: Transformer | str | Path, tokenizer=None, numerics: str | None = None,
                 gather: Callable[[nn.Module], AbstractContextManager] = nullcontext, **options) -> RolloutBackend:
    """The rollout backend `cfg.engine.backend` names, built on `model`'s current weights.

    cfg: a stablerl.config.Config (its `.engine` is read) or an EngineConfig: backend, numerics and the sampling
    defaults. `numerics` overrides cfg's (eval samples the policy itself in fp32). `gather`: the sharded trainer's
    per-module gather (stablerl.distributed.Parallel.gather). `options` go to the vLLM backend
    (stablerl.vllm_backend.VLLMBackend: workdir, max_num_seqs, llm_kwargs) and are refused by the native one.
    """
    e = getattr(cfg, "engine", cfg)
    sampling = dict(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
                    stop=tuple(e.stop))
    # the dial belongs to the rollout engine only: eval (`numerics` given) samples the policy's own weights
    weight_bits = 0 if numerics else e.weight_bits
    numerics = numerics or e.numerics
    if e.backend == "native":
        if options:
            raise UserError(f"engine.backend=native: unexpected option(s) {', '.join(sorted(options))} "
                            "(they are the vLLM backend's)")
        return NativeBackend(model, tokenizer, numerics=numerics, gather=gather, weight_bits=weight_bits, **sampling)
    if e.backend == "vllm":
        if weight_bits:
            raise UserError("engine.weight_bits: the vLLM backend does not take it (set engine.backend=native, or "
                            "serve a quantised checkpoint with vLLM's own quantization)")
        from stablerl.vllm_backend import VLLMBackend  # vllm itself is imported inside, only once it is needed

        return VLLMBackend(model, tokenizer, numerics=numerics, gather=gather, **sampling, **options)
    raise UserError(f"engine.backend: got {e.backend!r}, expected one of {', '.join(map(repr, BACKENDS))}")
