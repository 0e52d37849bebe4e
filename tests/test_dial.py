"""The engine-only discrepancy dial `engine.weight_bits` (issue 27's dose-response): per-channel integer rounding
of the engine's weight copy, hand-computed; off means bitwise off; the trainer's weights and eval stay untouched."""

import pytest
import torch

from stablerl.config import ConfigError, load_config
from stablerl.decode import round_weights
from stablerl.engine import Engine
from stablerl.hf import get_model
from stablerl.rollout import make_backend

PROMPTS = ["12+7=", "(3*4)-5="]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def moe():
    model, tok = get_model("tiny-moe", seed=0)
    return model.eval(), tok


def test_round_weights_hand_computed():
    w = torch.tensor([[1.0, -0.5, 0.26], [0.0, 0.0, 0.0], [-2.0, 0.9, 0.1]])
    # bits 3: qmax 3, scale = row max / 3; row 0: [3, -1.5, 0.78] -> round half to even [3, -2, 1]
    q3 = round_weights(w, 3)
    assert torch.allclose(q3[0], torch.tensor([1.0, -2 / 3, 1 / 3]), atol=1e-7)
    assert torch.equal(q3[1], torch.zeros(3))  # an all-zero channel stays zero (no 0/0)
    # row 2: scale 2/3: [-3, 1.35, 0.15] -> [-3, 1, 0]
    assert torch.allclose(q3[2], torch.tensor([-2.0, 2 / 3, 0.0]), atol=1e-7)
    # bits 2: qmax 1 (ternary): row 0 [1, -0.5, 0.26] -> [1, -0, 0]
    assert torch.equal(round_weights(w, 2)[0].abs(), torch.tensor([1.0, 0.0, 0.0]))
    assert round_weights(w, 0) is w


def test_round_weights_error_bound_int8():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q = round_weights(w, 8)
    scale = w.abs().amax(1, keepdim=True) / 127
    err = (q - w).abs()
    assert (err <= scale / 2 + 1e-7).all() and err.max() > 0
    assert ((q / scale) - (q / scale).round()).abs().max() < 1e-4


def test_dial_off_is_bitwise_and_on_moves_mu_only(moe):
    model, tok = moe
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ro0 = Engine(model, tok, numerics="fp32").generate(PROMPTS, n=2, max_new_tokens=12, seed=1)
    ro0b = Engine(model, tok, numerics="fp32", weight_bits=0).generate(PROMPTS, n=2, max_new_tokens=12, seed=1)
    assert torch.equal(ro0.tokens, ro0b.tokens) and torch.equal(ro0.logp_infer, ro0b.logp_infer)
    # 8-bit and 4-bit engines score the same tokens differently, 4-bit further than 8-bit
    ids = ro0.tokens
    gaps = []
    for bits in (8, 4):
        eng = Engine(model, tok, numerics="fp32", weight_bits=bits)
        ro = eng.generate(PROMPTS, n=2, max_new_tokens=12, seed=1)
        m = ro.mask & ro0.mask
        same = (ro.tokens == ids) & m
        gaps.append((ro.logp_infer - ro0.logp_infer)[same].abs().mean().item() if same.any() else float("inf"))
    assert 0 < gaps[0] < gaps[1]
    for k, v in model.state_dict().items():  # the trainer's weights are never touched
        assert torch.equal(v, before[k]), k


def test_dial_config_and_backends(moe, tmp_path):
    model, tok = moe
    cfg = load_config(None, ["engine.weight_bits=4", "engine.numerics=fp32"])
    assert make_backend(cfg, model, tok).model.weight_bits == 4
    assert make_backend(cfg, model, tok, numerics="fp32").model.weight_bits == 0  # eval: the policy itself
    for bad in ("1", "9", "-2"):
        with pytest.raises(ConfigError, match="engine.weight_bits: got"):
            load_config(None, [f"engine.weight_bits={bad}"])
