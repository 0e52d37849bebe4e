"""Rollout backends: who samples μ_θold for the trainer, eval and `stablerl generate` (docs/engine.md, "Backends").

A backend turns prompts into a `stablerl.engine.Rollout` (log μ of every sampled token under the distribution
actually sampled from, the experts it ran for R3) and takes the trainer's weights after each update (`sync`); that
contract (`RolloutBackend`, `Support`) is defined beside `Rollout` in stablerl.engine and re-exported here.
`make_backend(cfg, model, tokenizer)` builds the one `engine.backend` names:

- `native`: stablerl's own engine (`stablerl.engine.Engine`, unchanged: `NativeBackend` only names it). The
  reference: every numerics policy of the dial, routes recorded while decoding, truncation computed by the same
  `stablerl.sampling` code the trainer scores with.
- `vllm`: vLLM (`stablerl.vllm_backend`; vLLM itself is imported only when one is built), with processed
  log-probs and a router hook for routes; it refuses every setting under which its μ would not be the trainer's
  sampling distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch.nn as nn

from stablerl.decode import NUMERICS
from stablerl.engine import Engine, RolloutBackend, Support
from stablerl.errors import UserError
from stablerl.model import Transformer
from stablerl.vllm_backend import VLLMBackend  # imports no vLLM itself: that happens when one is built

__all__ = ["BACKENDS", "NativeBackend", "RolloutBackend", "Support", "make_backend"]

BACKENDS = ("native", "vllm")


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
        return VLLMBackend(model, tokenizer, numerics=numerics, gather=gather, **sampling, **options)
    raise UserError(f"engine.backend: got {e.backend!r}, expected one of {', '.join(map(repr, BACKENDS))}")
