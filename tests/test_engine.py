"""Inference engine: parity with the training forward (E3 discrepancy ≈ 0 in fp32), KV-cache decode, sampling,
stopping, numerics, the generate CLI and its bad input."""

import dataclasses
import json
import math

import pytest
import torch

from stablerl import decode
from stablerl.cli import main
from stablerl.config import EngineConfig
from stablerl.decode import CastLinear
from stablerl.engine import Engine, Experts, Fp8Linear, quantize_e4m3, route_dtype
from stablerl.errors import UserError
from stablerl.hf import get_model
from stablerl.model import ModelConfig, build_model
from stablerl.sampling import logprobs_from_logits, process_logits, sample, token_logprobs
from stablerl.sequences import pack, response_logits

PROMPTS = ["12+7=", "a", "The quick brown fox jumps", "(3*4)-5="]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def moe():
    model, tok = get_model("tiny-moe", seed=0)
    with torch.no_grad():  # a sharper router than random init: near-ties are rarer, the test means more
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10)
    return model.eval(), tok


def teacher_forced(model, ro, **sampling):
    """The trainer's view of a rollout: full-sequence forward, log-probs of the sampled tokens, its routes."""
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], 0)
    with torch.no_grad():
        out = model(packed.ids)
    lp = token_logprobs(response_logits(out.logits, packed), packed.targets, **sampling)  # (N, T)
    return packed, lp, out


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=20)])
def test_fp32_engine_matches_teacher_forced_training_forward(moe, sampling):
    model, tok = moe
    ro = Engine(model, tok, numerics="fp32").generate(PROMPTS, n=3, max_new_tokens=24, seed=3, **sampling)
    packed, lp, out = teacher_forced(model, ro, **sampling)
    m = packed.mask
    assert torch.equal(m, ro.mask[:, : m.shape[1]])
    assert (lp - ro.logp_infer[:, : m.shape[1]]).abs()[m].max() <= 1e-4
    assert torch.isfinite(ro.logp_infer[ro.mask]).all()  # every sampled token lies in the trainer's support
    assert ro.routes_infer.dtype == torch.uint8 and {r.dtype for r in ro.prompt_routes} == {torch.uint8}  # 8 experts
    # routes: prompt tokens from prefill, response tokens (the last one too) from decode, all identical
    for i in range(len(ro.texts)):
        P, T = len(ro.prompt_ids[i]), int(ro.lengths[i])
        assert ro.prompt_routes[i].shape == (P, 4, 2)
        assert torch.equal(ro.prompt_routes[i], out.routes[i, :P])
        assert torch.equal(ro.routes_infer[i, :T], out.routes[i, P:P + T])
        assert (ro.routes_infer[i, T:] == 0).all() and (ro.tokens[i, T:] == tok.pad_id).all()


def test_kv_cache_decode_equals_full_forward_with_left_padding(moe):
    model, tok = moe
    m = Engine(model, tok, numerics="fp32").model
    ids = torch.randint(3, 99, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits  # (3, 12, V)
    pad = torch.tensor([0, 2, 5])  # row r: `pad` padding slots, then ids[r, :12 - pad]
    P = 6
    cache = m.new_cache(3, 12, "cpu")
    x = torch.zeros(3, P, dtype=torch.long)
    for r in range(3):
        x[r, pad[r]:] = ids[r, :P - pad[r]]
    cache.valid[:, :P] = torch.arange(P) >= pad[:, None]
    pos = (torch.arange(P) - pad[:, None]).clamp(min=0)
    with torch.inference_mode():
        logits, _ = m(x, pos, cache, 0, False)
        for r in range(3):
            assert (logits[r] - full[r, P - 1 - pad[r]]).abs().max() < 1e-5
        for s in range(P, 12):  # one token per step; each row is at its own position
            cache.valid[:, s] = True
            p = s - pad
            logits, _ = m(ids[torch.arange(3), p][:, None], p[:, None], cache, s, False)
            assert (logits - full[torch.arange(3), p]).abs().max() < 1e-5


def test_route_dtype_is_the_smallest_that_holds_the_expert_ids():
    assert [route_dtype(e) for e in (0, 8, 256, 257, 2 ** 15, 2 ** 15 + 1)] == [
        torch.uint8, torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]
    assert torch.iinfo(torch.uint8).max == 256 - 1 and torch.iinfo(torch.int16).max == 2 ** 15 - 1  # largest ids


def test_routes_of_300_experts_are_int16_and_match_the_training_forward():
    cfg = ModelConfig(hidden_size=32, head_dim=16, num_hidden_layers=1, num_experts=300, num_experts_per_tok=2,
                      moe_intermediate_size=16)
    model = build_model(cfg, seed=0).eval()
    _, tok = get_model("tiny-moe")
    eng = Engine(model, tok, numerics="fp32")
    assert eng.model.route_dtype == route_dtype(300) == torch.int16
    ro = eng.generate(PROMPTS, n=2, max_new_tokens=8, seed=0)
    assert ro.routes_infer.dtype == torch.int16 and {r.dtype for r in ro.prompt_routes} == {torch.int16}
    _, _, out = teacher_forced(model, ro)
    full = torch.cat([torch.cat([ro.prompt_routes[i], ro.routes_infer[i, :int(ro.lengths[i])]]) for i in range(8)])
    assert 0 <= int(full.min()) and int(full.max()) < 300 and int(full.max()) > 255  # ids past uint8's range
    for i in range(8):  # no wrap-around anywhere: the same experts as the fp32 training forward
        P, T = len(ro.prompt_ids[i]), int(ro.lengths[i])
        assert torch.equal(ro.prompt_routes[i].long(), out.routes[i, :P])
        assert torch.equal(ro.routes_infer[i, :T].long(), out.routes[i, P:P + T])
        assert (ro.routes_infer[i, T:] == 0).all()


@pytest.mark.parametrize("numerics, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16), ("fp8", torch.bfloat16)])
def test_kv_cache_is_stored_in_the_activation_dtype(moe, numerics, dtype):
    model, tok = moe
    m = Engine(model, tok, numerics=numerics).model
    cache = m.new_cache(3, 10, "cpu")
    assert m.cache_dtype == cache.k.dtype == cache.v.dtype == dtype
    # per token: L * kv_heads * D values for K and as many for V: 4 * 2 * 32 * 2 = 512 values
    assert cache.k.nbytes + cache.v.nbytes == 3 * 10 * 512 * dtype.itemsize


@pytest.mark.parametrize("numerics", ["bf16", "fp16", "fp8"])
def test_low_precision_kv_cache_changes_no_bit_of_the_rollout(moe, numerics):
    """K/V are rounded to the activation dtype before they are cached, so an fp32 cache of the same values (the
    cache before it moved to the activation dtype) must give bitwise the same samples, log-probs and routes."""
    model, tok = moe
    eng, ref = Engine(model, tok, numerics=numerics), Engine(model, tok, numerics=numerics)
    ref.model = decode.InferenceModel(model, numerics, cache_dtype=torch.float32)
    kw = dict(n=4, max_new_tokens=40, seed=5)  # long enough that finished rows leave the batch (Cache.rows)
    a, b = eng.generate(PROMPTS, **kw), ref.generate(PROMPTS, **kw)
    assert eng.model.new_cache(1, 1, "cpu").k.dtype != ref.model.new_cache(1, 1, "cpu").k.dtype
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp_infer, b.logp_infer)
    assert torch.equal(a.routes_infer, b.routes_infer) and a.routes_infer.dtype == b.routes_infer.dtype
    assert all(torch.equal(x, y) for x, y in zip(a.prompt_routes, b.prompt_routes))


def test_temperature_zero_is_greedy_argmax_of_the_full_forward(moe):
    model, tok = moe
    ro = Engine(model, tok, numerics="fp32").generate(PROMPTS, temperature=0.0, max_new_tokens=16)
    packed, lp, out = teacher_forced(model, ro)
    argmax = response_logits(out.logits, packed).argmax(-1)  # (N, T)
    assert torch.equal(argmax[packed.mask], packed.targets[packed.mask])
    # and the greedy log-prob is that of the temperature-1 distribution (documented choice)
    assert (lp - ro.logp_infer[:, : lp.shape[1]]).abs()[packed.mask].max() <= 1e-4
    # a naive loop (full forward per token, no cache) gives the same greedy continuation
    ids = torch.tensor([tok.encode_prompt(PROMPTS[2])])
    for _ in range(16):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ro.tokens[2, : ro.lengths[2]].tolist() == ids[0, -16:].tolist()[: int(ro.lengths[2])]


def test_same_seed_same_samples_and_n_samples_are_prompt_major(moe):
    model, tok = moe
    eng = Engine(model, tok, numerics="bf16")
    a = eng.generate(PROMPTS, n=4, max_new_tokens=12, seed=7)
    b = eng.generate(PROMPTS, n=4, max_new_tokens=12, seed=torch.Generator().manual_seed(7))
    c = eng.generate(PROMPTS, n=4, max_new_tokens=12, seed=8)
    torch.set_num_threads(2)
    d = Engine(model, tok, numerics="bf16", threads=1).generate(PROMPTS, n=4, max_new_tokens=12, seed=7)
    assert torch.get_num_threads() == 2 and torch.equal(d.tokens, a.tokens)  # restored; same samples
    torch.set_num_threads(1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp_infer, b.logp_infer) and a.texts == b.texts
    assert not torch.equal(a.tokens, c.tokens)
    assert a.prompt_index.tolist() == [i // 4 for i in range(16)]
    assert a.prompt_ids[5] == tok.encode_prompt(PROMPTS[1]) and a.prompt_lens[5] == len(a.prompt_ids[5])
    assert len({tuple(a.tokens[i].tolist()) for i in range(4)}) > 1  # the n samples of a prompt differ


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_shared_prefill_equals_per_sample_prefill(moe, numerics):
    # issue 29: generate(prompts, n=G) prefills each prompt once and copies its KV to its G rows. The per-sample way
    # is the public API itself: each prompt repeated G times with n=1 is prefilled G times, row by row, and gives
    # the same prompt-major rows, so the sampler's draws (one (N, V) uniform block per decode step, rows dropped
    # at the same steps) line up draw for draw: same tokens, and log-probs equal up to the GEMM's batch size
    # (B vs B*G prefill rows), 1e-6 in fp32. No test-only hook in the engine is needed.
    model, tok = moe
    G = 4
    eng = Engine(model, tok, numerics=numerics)
    shared = eng.generate(PROMPTS, n=G, max_new_tokens=24, seed=3)
    per_sample = eng.generate([p for p in PROMPTS for _ in range(G)], n=1, max_new_tokens=24, seed=3)
    assert torch.equal(shared.tokens, per_sample.tokens) and torch.equal(shared.mask, per_sample.mask)
    assert shared.texts == per_sample.texts and shared.finish_reason == per_sample.finish_reason
    assert shared.prompt_ids == per_sample.prompt_ids
    torch.testing.assert_close(shared.logp_infer, per_sample.logp_infer, rtol=0, atol=1e-6)
    assert torch.equal(shared.routes_infer, per_sample.routes_infer)
    assert all(torch.equal(a, b) for a, b in zip(shared.prompt_routes, per_sample.prompt_routes))
    assert shared.mask.sum(1).min() < shared.mask.sum(1).max()  # rows finished at different steps (dropped rows)
    assert len({tuple(shared.tokens[i].tolist()) for i in range(G)}) > 1  # the G copies of one cache diverge


def test_sampling_frequencies_match_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(40000, 5)
    gen = torch.Generator().manual_seed(0)
    for kw in (dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.8)):
        tokens, lp = sample(logits, generator=gen, **kw)
        probs = logprobs_from_logits(logits[:1], **kw).exp()[0]
        freq = torch.bincount(tokens, minlength=5) / len(tokens)
        assert (freq - probs).abs().max() < 0.01, kw  # 4 sigma at n = 40000 is < 0.01
        assert torch.equal(lp, logprobs_from_logits(logits, **kw).gather(-1, tokens[:, None])[:, 0])


def test_truncation_by_hand():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def kept(**kw):
        return torch.isfinite(process_logits(x, **kw)).tolist()

    assert kept() == [True] * 4
    assert kept(top_p=0.45) == [True, False, False, False]  # the most likely token is always kept
    assert kept(top_p=0.6) == [True, True, False, False]  # smallest prefix whose mass reaches p
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_p=0.97) == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.6) == [True, True, False, False]
    lp = logprobs_from_logits(x, top_p=0.7)
    assert torch.allclose(lp[:2].exp(), torch.tensor([0.5 / 0.8, 0.3 / 0.8])) and lp[2:].eq(-math.inf).all()
    assert torch.equal(logprobs_from_logits(x, temperature=0.0), logprobs_from_logits(x, temperature=1.0))
    assert torch.allclose(logprobs_from_logits(x, temperature=2.0).exp(), (x / 2).softmax(-1))
    ties = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert torch.isfinite(process_logits(ties, top_k=1)).tolist() == [False, True, True, False]  # ties kept
    assert torch.isfinite(process_logits(ties, top_p=0.1)).tolist() == [False, True, False, False]  # lower id


def test_stops_eos_stop_strings_and_max_tokens(moe):
    model, tok = moe
    eng = Engine(model, tok, numerics="fp32")
    kw = dict(max_new_tokens=20, seed=1)  # one row, one seed: the same draws whatever stops it
    free = eng.generate(PROMPTS[:1], **kw)
    ids = free.tokens[0].tolist()
    assert free.finish_reason == ["length"] and len(ids) == 20 and min(ids) >= 3  # no special token: 1 char each
    text = free.texts[0]
    # stop string: the response ends with the token that completed it; the text stops just before it
    stop = text[6:8]
    cut = text.find(stop)
    ro = eng.generate(PROMPTS[:1], stop=(stop, "never there"), **kw)
    assert ro.finish_reason == ["stop"] and ro.texts == [text[:cut]]
    assert ro.tokens[0, : ro.lengths[0]].tolist() == ids[: cut + len(stop)]
    # EOS (here: pretend the 4th token is EOS): kept in the mask, nothing after it
    eos = ids[3]
    tok_eos = dataclasses.replace(tok, eos_ids=(eos,))
    ro = Engine(model, tok_eos, numerics="fp32").generate(PROMPTS[:1], **kw)
    first = ids.index(eos)
    assert ro.finish_reason == ["stop"] and ro.lengths.tolist() == [first + 1]
    assert ro.tokens[0].tolist() == ids[: first + 1] and ro.mask.all()
    ro = Engine(model, tok_eos, numerics="fp32").generate(PROMPTS[:1], ignore_eos=True, **kw)
    assert ro.tokens[0].tolist() == ids and ro.finish_reason == ["length"]


def test_context_limit_and_bad_prompts():
    cfg = ModelConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, hidden_size=32, head_dim=16,
                      num_hidden_layers=2, max_position_embeddings=16)
    model = build_model(cfg, seed=1).eval()
    _, tok = get_model("tiny-moe")
    eng = Engine(model, tok, numerics="fp32")
    ro = eng.generate(["abcdefghij", "ab"], max_new_tokens=10, ignore_eos=True, seed=0)
    # prompt + response never exceed the 16-token context: the long row stops early, reported as "length"
    assert ro.lengths.tolist() == [16 - 11, 10] and ro.finish_reason == ["length", "length"]
    with pytest.raises(UserError, match="prompt 1: prompt has 17 tokens but the model context is 16"):
        eng.generate(["ok", "x" * 16])
    with pytest.raises(UserError, match="no prompts"):
        eng.generate([])
    with pytest.raises(UserError, match="top_p must be in"):
        eng.generate(["ok"], top_p=0.0)


def test_engine_owns_its_weights_and_sync_updates_them(moe):
    model, tok = moe
    model = build_model(model.config, seed=5).eval()
    eng = Engine(model, tok, numerics="fp32")
    before = eng.generate(PROMPTS, temperature=0.0, max_new_tokens=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # the trainer updates its weights
    same = eng.generate(PROMPTS, temperature=0.0, max_new_tokens=8)
    assert torch.equal(before.tokens, same.tokens)  # nothing shared
    eng.sync(model)
    after = eng.generate(PROMPTS, temperature=0.0, max_new_tokens=8)
    assert not torch.equal(before.tokens, after.tokens)
    tensors = [eng.model.embed, eng.model.norm]
    for lay in eng.model.layers:
        for v in lay.values():
            tensors += [v] if isinstance(v, torch.Tensor) else list(v.buffers()) if hasattr(v, "buffers") else []
    assert len(tensors) > 20 and not {t.data_ptr() for t in tensors} & {p.data_ptr() for p in model.parameters()}


LLAMA = ModelConfig(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                    tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})


@pytest.mark.parametrize("arch", ["tiny-dense", "llama"])
def test_dense_models_and_from_config(arch):
    if arch == "llama":  # tied embeddings, q/k/v/o and MLP biases, Llama-3 RoPE scaling, no q/k-norm
        model, (_, tok) = build_model(LLAMA, seed=2), get_model("tiny-dense")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    else:
        model, tok = get_model(arch, seed=0)
    eng = Engine.from_config(model.eval(), tok, EngineConfig(numerics="fp32", temperature=0.7, max_new_tokens=6))
    ro = eng.generate(PROMPTS, n=2, seed=0)
    assert ro.routes_infer is None and ro.prompt_routes is None and ro.tokens.shape[0] == 8
    packed, lp, _ = teacher_forced(model, ro, temperature=0.7)
    assert (lp - ro.logp_infer[:, : lp.shape[1]]).abs()[packed.mask].max() <= 1e-4


@pytest.mark.parametrize("numerics", ["fp32", "bf16", "fp8"])
def test_padded_and_grouped_expert_dispatch_agree_exactly(moe, numerics):
    model, _ = moe
    experts = Experts(model.model.layers[0].mlp.experts, numerics)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if numerics == "fp32" else torch.bfloat16
    x = torch.randn(40, 128, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(40)])  # (40, 2) distinct experts
    idx[:20, 0] = 3  # a busy expert, as decode routing often has
    w = torch.rand(40, 2, generator=gen).to(dtype)
    experts.pad_limit = float("inf")
    padded = experts(x, idx, w)
    experts.pad_limit = 0.0
    grouped = experts(x, idx, w)
    assert torch.equal(padded, grouped)
    # and both are the model's MoE arithmetic (fp32: same expert outputs, gate-weighted, summed in expert order)
    if numerics == "fp32":
        ref = torch.zeros_like(x)
        for t in range(40):
            for k in range(2):
                ref[t] += model.model.layers[0].mlp.experts[int(idx[t, k])](x[t]) * w[t, k]
        assert (grouped - ref).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_low_precision_linear_is_one_rounding_of_the_exact_result(dtype):
    gen = torch.Generator().manual_seed(0)
    w, b = 0.05 * torch.randn(96, 128, generator=gen), 0.1 * torch.randn(96, generator=gen)
    x = torch.randn(64, 128, generator=gen).to(dtype)
    lin = CastLinear(w, b, dtype, emulate=True)
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, w.to(dtype).float())  # rounded values
    y = lin(x)
    exact = x.double() @ w.to(dtype).double().T + b.to(dtype).double()  # (64, 96) low-precision operands, no error
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert y.dtype == dtype and ((y.double() - exact).abs() <= ulp).all()  # one rounding: within one ulp


def _prefill_logits(model, numerics, native, monkeypatch, ids):
    monkeypatch.setattr(decode, "native_gemm", lambda dtype, device: native)
    m = decode.InferenceModel(model, numerics)
    assert m.emulated == (not native)
    N, T = ids.shape
    cache = m.new_cache(N, T, ids.device)
    cache.valid[:] = True
    with torch.no_grad():
        return torch.stack([m(ids[:, t:t + 1], torch.full((N, 1), t), cache, t, False)[0] for t in range(T)], 1)


def test_emulated_bf16_engine_is_native_bf16_not_fp32(moe, monkeypatch):
    """On CPUs without bf16 GEMMs the engine emulates them: the bf16 numerics (what E3's discrepancy measures) must
    stay those of native bf16, not drift to fp32."""
    model, _ = moe
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    native = _prefill_logits(model, "bf16", True, monkeypatch, ids)
    emulated = _prefill_logits(model, "bf16", False, monkeypatch, ids)
    fp32 = _prefill_logits(model, "fp32", True, monkeypatch, ids)
    gap_fp32 = (native - fp32).abs().max()
    assert gap_fp32 > 0.01  # bf16 is visibly not fp32 here
    assert (native - emulated).abs().max() < 0.25 * gap_fp32  # measured 0.07x


def test_fp8_quantisation_is_per_channel_e4m3():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    q, s = quantize_e4m3(w, dim=1)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((64,), 448.0))  # each row uses the full e4m3 range
    assert ((q.float() * s - w).abs() <= w.abs().amax(1, keepdim=True) / 448 * 16).all()  # half an e4m3 step
    model, tok = get_model("tiny-moe")
    eng = Engine(model, tok, numerics="fp8")
    lay = eng.model.layers[0]
    assert isinstance(lay["qkv"], Fp8Linear) and isinstance(lay["o"], Fp8Linear)  # the block's Linears, replaced
    assert lay["experts"].gu_scale.shape == (8, 1, 512)  # one scale per expert and output channel
    lin = Fp8Linear(w, None)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    y, ref = lin(x), x.float() @ w.T
    assert y.dtype == torch.bfloat16 and 0.005 < (y.float() - ref).norm() / ref.norm() < 0.05  # e4m3: ~3 bits


def test_train_inference_mismatch_grows_with_lower_precision(moe):
    model, tok = moe
    k3 = {}
    for numerics in ("fp32", "bf16", "fp8"):
        ro = Engine(model, tok, numerics=numerics).generate(PROMPTS, n=4, max_new_tokens=24, seed=1)
        packed, lp, _ = teacher_forced(model, ro)
        r = (lp - ro.logp_infer[:, : lp.shape[1]])[packed.mask]  # log π/μ per token
        k3[numerics] = float((r.exp() - 1 - r).mean())
    assert k3["fp32"] < 1e-9 < k3["bf16"] < k3["fp8"]


def test_generate_cli_writes_jsonl(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "12+7="}\n\n{"prompt": "hello", "id": 3}\n')
    out = tmp_path / "out.jsonl"
    args = ["generate", "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "6", "--numerics", "fp32",
            "--seed", "1", "--routes", "--output", str(out)]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt"], r["line"], r["sample"]) for r in rows] == [("12+7=", 1, 0), ("12+7=", 1, 1),
                                                                       ("hello", 3, 0), ("hello", 3, 1)]
    for r in rows:
        assert len(r["token_ids"]) == len(r["logprobs"]) == len(r["routes"]) <= 6
        assert r["finish_reason"] in ("stop", "length") and all(lp <= 0 for lp in r["logprobs"])
        assert len(r["prompt_routes"]) == len(r["prompt"]) + 1 and len(r["routes"][0]) == 4  # BOS; L = 4
    assert main(args) == 0 and [json.loads(x) for x in out.read_text().splitlines()] == rows  # seeded


@pytest.mark.parametrize("content, message", [
    ("", "p.jsonl: no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "a"\n', 'p.jsonl:2: not valid JSON'),
    ('{"prompt": "ok"}\n{"text": "a"}\n', 'p.jsonl:2: expected an object with a "prompt" field'),
    ('{"prompt": "ok"}\n\n{"prompt": "' + "x" * 600 + '"}\n', "p.jsonl:3: prompt has 601 tokens but the model "
                                                            "context is 512"),
])
def test_generate_cli_bad_input(tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts", str(prompts), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # checked before anything is written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_engine_matches_cpu_training_forward(moe):
    model, tok = moe
    ro = Engine(build_model(model.config).cuda().eval(), tok, numerics="fp32").generate(PROMPTS, n=2, seed=0)
    packed, lp, _ = teacher_forced(build_model(model.config).eval(), ro)
    assert (lp - ro.logp_infer[:, : lp.shape[1]]).abs()[packed.mask].max() <= 1e-4
