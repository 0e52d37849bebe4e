"""Parity with `transformers` (the oracle) and the routing record/replay contract (DESIGN E7)."""

import json

import pytest
import torch

from stablerl.hf import get_model, load_model, save_model
from stablerl.model import PRESETS, Transformer, build_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                          intermediate_size=96, norm_topk_prob=True, mlp_only_layers=[1])
        m = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "qwen3":
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, intermediate_size=96,
                                                                   tie_word_embeddings=True))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=96,
                                                                   rope_theta=5000.0))
    with torch.no_grad():  # HF zero-inits the router and ones the norms: randomise everything for a real test
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.1)
            if p.ndim == 1:
                p.add_(1.0)
    return m.eval()


def hf_routes(m, ids):
    """Top-k experts per MoE layer from HF's own router outputs: (N, T, L, K)."""
    out = m(ids, output_router_logits=True)
    k = m.config.num_experts_per_tok
    per_layer = [torch.topk(r.softmax(-1), k, dim=-1).indices.view(*ids.shape, k) for r in out.router_logits
                 if r is not None]
    return out.logits, torch.stack(per_layer, dim=2)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3", "llama"])
def test_hf_parity_both_directions(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    ids = torch.randint(0, 99, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours(ids)
        if kind == "qwen3_moe":
            ref, ref_routes = hf_routes(hf, ids)
            assert out.routes.shape == (3, 17, 2, 2)  # layer 1 is dense (mlp_only_layers)
            assert torch.equal(out.routes.sort(-1).values, ref_routes.sort(-1).values)
        else:
            ref = hf(ids).logits
            assert out.routes is None
        scale = ref.abs().max()
        assert (out.logits - ref).abs().max() / scale < 1e-5
        # and back: stablerl saves, transformers loads, same logits
        save_model(ours, tmp_path / "ours")
        back = type(hf).from_pretrained(tmp_path / "ours").eval()
        assert (back(ids).logits - ref).abs().max() / scale < 1e-5


def test_save_load_roundtrip_sharded(tmp_path):
    model, tok = get_model("tiny-moe", seed=3)
    save_model(model, tmp_path / "ckpt", tok, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again, tok2 = get_model(tmp_path / "ckpt")
    ids = torch.randint(3, 99, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2.encode("12+7=") == tok.encode("12+7=")


def test_presets_are_seeded_and_sized():
    a, b = build_model(PRESETS["tiny-moe"], seed=0), build_model(PRESETS["tiny-moe"], seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert 2_000_000 < a.num_params() < 6_000_000
    assert a.num_params(active=True) < a.num_params() / 2


def _tiny_moe():
    torch.manual_seed(0)
    return build_model(PRESETS["tiny-moe"], seed=0).eval()


def test_replay_own_routes_is_bitwise():
    m = _tiny_moe()
    ids = torch.randint(3, 99, (4, 12))
    with torch.no_grad():
        out = m(ids)
        again = m(ids, routes=out.routes)
    assert torch.equal(out.logits, again.logits)
    assert torch.equal(out.routes, again.routes)


def test_replay_forces_other_experts_and_router_gets_gradient():
    m = _tiny_moe()
    ids = torch.randint(3, 99, (2, 8))
    with torch.no_grad():
        natural = m(ids).routes  # (N, T, L, K)
    forced = (natural + 3) % m.config.num_experts  # a different, still distinct, pair for every token
    ran = {}
    hooks = [m.model.layers[0].mlp.experts[e].register_forward_hook(
        lambda mod, inp, out, e=e: ran.__setitem__(e, inp[0].shape[0])) for e in range(8)]
    out = m(ids, routes=forced)
    for h in hooks:
        h.remove()
    assert torch.equal(out.routes, forced)
    want = torch.bincount(forced[:, :, 0].flatten(), minlength=8)
    assert {e: c for e, c in ran.items()} == {e: int(c) for e, c in enumerate(want) if c}
    out.logits.logsumexp(-1).mean().backward()
    for layer in m.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0


def test_bf16_routing_disagreement_is_measurable():
    """bf16 vs fp32 forward of the tiny MoE picks different experts on some tokens (the E3 routing mismatch)."""
    m = _tiny_moe()
    with torch.no_grad():  # a trained-like spread of router logits: scale the random router up
        for layer in m.model.layers:
            layer.mlp.gate.weight.mul_(20)
    ids = torch.randint(3, 99, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r32 = m(ids).routes.sort(-1).values
        r16 = m.to(torch.bfloat16)(ids).routes.sort(-1).values
    differ = (r32 != r16).any(-1).float().mean(dim=(0, 1))  # (L,) fraction of tokens with a different expert set
    print("bf16-vs-fp32 routing disagreement per layer:", [round(float(x), 4) for x in differ])
    assert (differ > 0).all() and (differ < 0.5).all()


# The public config.json of each checkpoint (the keys that define the computation), as published with the weights.
QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                  tie_word_embeddings=True, attention_bias=False, bos_token_id=151643, eos_token_id=151645)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=40960, tie_word_embeddings=False, attention_bias=False,
                     bos_token_id=151643, eos_token_id=151645)


@pytest.mark.parametrize("name, ref, total, active", [("qwen3-0.6b", QWEN3_0_6B, 596_049_920, 596_049_920),
                                                      ("qwen3-30b-a3b", QWEN3_30B_A3B, 30_532_122_624, 3_353_032_704)])
def test_real_shape_presets_match_their_checkpoints(name, ref, total, active):
    hf = PRESETS[name].to_hf()
    assert {k: hf[k] for k in ref} == ref
    with torch.device("meta"):  # no memory: 30B-A3B would need ~122 GB in fp32
        m = Transformer(PRESETS[name])
    assert (m.num_params(), m.num_params(active=True)) == (total, active)  # "0.6B"; "30B" total, "A3B" active


def test_small_moe_preset_is_in_the_100_to_200m_range():
    with torch.device("meta"):
        m = Transformer(PRESETS["small-moe"])
    assert 100e6 <= m.num_params() <= 200e6 and m.is_moe and m.config.model_type == "qwen3_moe"
