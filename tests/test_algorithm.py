"""Pins the math of stablerl.algorithm (DESIGN §1, E3–E6, E9) on CPU in float64.

Hand-computed values on a 2×3 batch, gradient identities, a slow per-token reference against the vectorised
losses, the first-order fidelity sweep, and bad input.
"""

import math

import pytest
import torch

from stablerl.algorithm import (
    LOSSES,
    BatchSize,
    LossOutput,
    aggregate,
    apply_is_rule,
    clip_mask,
    cosine,
    first_order_gradients,
    group_advantages,
    is_weights,
    loss_names,
    policy_loss,
    register_loss,
)

F64 = torch.float64
ALL_LOSSES = ("cispo", "grpo", "gspo", "minirl", "minirl_lennorm", "minirl_no_is")

# ----------------------------------------------------------------------------- the 2×3 hand example
# row 0: Â = +1.0, 3 response tokens; row 1: Â = −0.5, 2 response tokens + 1 padding slot
#   p = π_θ          [[0.5,  0.25, 0.8 ], [0.4,   0.1,  pad]]
#   r = π/π_old      [[1.0,  1.5,  0.9 ], [0.7,   1.1,  pad]]   staleness
#   d = π_old/μ      [[1.0,  0.8,  2.5 ], [1.25,  0.6,  pad]]   discrepancy
#   w = d·r = π/μ    [[1.0,  1.2,  2.25], [0.875, 0.66, pad]]   full IS weight
# E5 mask with ε_low 0.2, ε_high 0.28: [0,1] has r = 1.5 > 1.28 and Â > 0 (clip high); [1,0] has r = 0.7 < 0.8
# and Â < 0 (clip low). C = N · T = 6. Gradients below are ∂L/∂logp.


def example(pad=0.0):
    p = torch.tensor([[0.5, 0.25, 0.8], [0.4, 0.1, 1.0]], dtype=F64)
    r = torch.tensor([[1.0, 1.5, 0.9], [0.7, 1.1, 1.0]], dtype=F64)
    d = torch.tensor([[1.0, 0.8, 2.5], [1.25, 0.6, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = p.log()
    logp_old = logp - r.log()
    logp_infer = logp_old - d.log()
    # padding is never read: fill it with junk to prove it
    logp, logp_old, logp_infer = (x.masked_fill(~mask, pad) for x in (logp, logp_old, logp_infer))
    return logp.requires_grad_(), logp_old, logp_infer, torch.tensor([1.0, -0.5], dtype=F64), mask


L = math.log
HAND = {
    # −(1/6)[1·1·log .5 + 2.25·1·log .8 + 0.66·(−.5)·log .1]; [0,1] and [1,0] clipped
    "minirl": (
        {},
        (-L(0.5) - 2.25 * L(0.8) + 0.33 * L(0.1)) / 6,  # 0.0725612
        [[-1 / 6, 0, -2.25 / 6], [0, 0.33 / 6, 0]],
    ),
    # TIS, c = 2: d[0,2] = 2.5 -> 2, so w[0,2] = 2·0.9 = 1.8
    "minirl/truncate": (
        {"is_rule": "truncate", "is_trunc": 2.0},
        (-L(0.5) - 1.8 * L(0.8) + 0.33 * L(0.1)) / 6,  # 0.0845062
        [[-1 / 6, 0, -1.8 / 6], [0, 0.33 / 6, 0]],
    ),
    # MIS band [0.5, 2]: d[0,2] = 2.5 is outside, that token is dropped too
    "minirl/mask": (
        {"is_rule": "mask", "is_low": 0.5, "is_high": 2.0},
        (-L(0.5) + 0.33 * L(0.1)) / 6,  # −0.0111177
        [[-1 / 6, 0, 0], [0, 0.33 / 6, 0]],
    ),
    # w := r: [0,2] -> 0.9, [1,1] -> 1.1 (so −1.1·(−.5) = 0.55)
    "minirl_no_is": (
        {},
        (-L(0.5) - 0.9 * L(0.8) + 0.55 * L(0.1)) / 6,  # −0.0620742
        [[-1 / 6, 0, -0.9 / 6], [0, 0.55 / 6, 0]],
    ),
    # each row divided by its own length (3, 2), then the mean over the 2 rows
    "minirl_lennorm": (
        {},
        ((-L(0.5) - 2.25 * L(0.8)) / 3 + 0.33 * L(0.1) / 2) / 2,  # 0.0092401
        [[-1 / 6, 0, -2.25 / 6], [0, 0.33 / 4, 0]],
    ),
    # per token −d·min(r·Â, clip(r)·Â): row 0 [−1, −0.8·1.28, −2.5·0.9] = −4.274 over 3;
    # row 1 [−1.25·(0.8·−0.5), −0.6·(1.1·−0.5)] = [0.5, 0.33] over 2. ∂/∂logp = −d·r·Â/(|y_i|·N) where unclipped
    "grpo": (
        {},
        (-4.274 / 3 + 0.83 / 2) / 2,  # −0.5048333
        [[-1 / 6, 0, -2.25 / 6], [0, 0.33 / 4, 0]],
    ),
    # ŵ = min(w, 1.28) = [[1, 1.2, 1.28], [0.875, 0.66]], no mask, divided by 5 tokens
    "cispo": (
        {},
        (-L(0.5) - 1.2 * L(0.25) - 1.28 * L(0.8) + 0.4375 * L(0.4) + 0.33 * L(0.1)) / 5,  # 0.2963188
        [[-1 / 5, -1.2 / 5, -1.28 / 5], [0.4375 / 5, 0.33 / 5, 0]],
    ),
    # s = (Π r)^(1/|y|) = [1.35^(1/3), 0.77^(1/2)] = [1.1052, 0.8775], inside [0.8, 1.28]; d_i the same kind of
    # geometric mean, so d_i·s_i = (Π w)^(1/|y|) = [2.7^(1/3), 0.5775^(1/2)]. ∂/∂logp_i,t = −d_i·s_i·Â_i/(|y_i|·N)
    "gspo": (
        {},
        (-(2.7 ** (1 / 3)) + 0.5 * 0.5775**0.5) / 2,  # −0.5062548
        [[-(2.7 ** (1 / 3)) / 6] * 3, [0.5 * 0.5775**0.5 / 4] * 2 + [0]],
    ),
    # ε_high = 0.1: s_0 = 1.1052 > 1.1 with Â > 0, row 0 is clipped: loss −d_0·1.1, no gradient
    "gspo/eps_high=0.1": (
        {"eps_high": 0.1},
        (-1.1 * 2 ** (1 / 3) + 0.5 * 0.5775**0.5) / 2,  # −0.5029688
        [[0, 0, 0], [0.5 * 0.5775**0.5 / 4] * 2 + [0]],
    ),
}


@pytest.mark.parametrize("case", sorted(HAND))
def test_hand_computed_loss_and_gradient(case):
    hp, expected_loss, expected_grad = HAND[case]
    logp, logp_old, logp_infer, adv, mask = example(pad=123.0)
    out = policy_loss(case.split("/")[0], logp, logp_old, logp_infer, adv, mask, **hp)
    out.loss.backward()
    assert out.loss.dim() == 0
    torch.testing.assert_close(out.loss.item(), expected_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad, dtype=F64), atol=1e-6, rtol=0)


def test_hand_computed_stats():
    out = policy_loss("minirl", *example(), is_rule="truncate")
    s = out.stats
    w = [1.0, 1.2, 2.25, 0.875, 0.66]
    expected = {
        "clip/frac_low": 1 / 5,  # [1,0]
        "clip/frac_high": 1 / 5,  # [0,1]
        "clip/frac": 2 / 5,
        "mask/frac": 2 / 5,
        "mask/frac_seq_mean": (1 / 3 + 1 / 2) / 2,
        "is/rule_frac_truncated": 1 / 5,  # d[0,2] = 2.5 > c = 2
        "is/rule_frac_masked": 0.0,
        "is/discrepancy_mean": 6.15 / 5,
        "is/discrepancy_min": 0.6,
        "is/discrepancy_max": 2.5,
        "is/discrepancy_ess": 6.15**2 / (5 * (1 + 0.64 + 6.25 + 1.5625 + 0.36)),
        "is/staleness_mean": 5.2 / 5,
        "is/staleness_min": 0.7,
        "is/staleness_max": 1.5,
        "is/staleness_ess": 5.2**2 / (5 * (1 + 2.25 + 0.81 + 0.49 + 1.21)),
        "is/full_mean": sum(w) / 5,  # stats are of the raw weights, before the rule
        "is/full_min": 0.66,
        "is/full_max": 2.25,
        "is/full_ess": sum(w) ** 2 / (5 * sum(x * x for x in w)),  # 0.8231010
        "is/seq_log_weight_abs_mean": (L(2.7) + abs(L(0.5775))) / 2,  # |log W_i|, W = [2.7, 0.5775]
        "is/seq_log_weight_abs_max": L(2.7),
        "loss/tokens": 5.0,
    }
    assert set(s) == set(expected)
    assert all(type(v) is float for v in s.values())
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-12), key


def test_stats_keys_per_loss():
    base = {"clip/frac_low", "clip/frac_high", "clip/frac", "mask/frac", "is/discrepancy_mean", "is/staleness_max"}
    base |= {"is/full_ess", "is/seq_log_weight_abs_max"}
    for name in ALL_LOSSES:
        out = policy_loss(name, *example())
        assert isinstance(out, LossOutput)
        assert base <= set(out.stats), name
        # the rule stats exist exactly where a discrepancy rule is applied
        assert ("is/rule_frac_masked" in out.stats) == (name != "minirl_no_is"), name
    # CISPO caps the weight of [0,2] (w = 2.25 > 1.28) but masks nothing
    cispo = policy_loss("cispo", *example()).stats
    assert (cispo["clip/frac_high"], cispo["clip/frac_low"], cispo["mask/frac"]) == (0.2, 0.0, 0.0)


# ----------------------------------------------------------------------------- parts


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=F64)
    mean = group_advantages(rewards, "mean")
    assert torch.equal(mean, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]], dtype=F64))
    # unbiased std: row 0 sqrt(4·0.25/3) = 1/√3 so ±0.5·√3; row 1 has std 0 -> 0; row 2 sqrt(0.75/3) = 0.5
    s3 = 0.5 * math.sqrt(3)
    expected = torch.tensor([[s3, -s3, -s3, s3], [0.0] * 4, [-0.5, -0.5, -0.5, 1.5]], dtype=F64)
    torch.testing.assert_close(group_advantages(rewards, "mean_std"), expected, atol=1e-12, rtol=0)
    # leave-one-out: R_i − mean of the other three
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [-1 / 3, -1 / 3, -1 / 3, 1.0]], dtype=F64)
    torch.testing.assert_close(group_advantages(rewards, "loo"), expected, atol=1e-12, rtol=0)


def test_group_advantages_zero_std_is_zero_not_nan():
    # 0.1 is not exact in binary, so R − mean is ~1e-17, not 0; it must still come out exactly 0
    rewards = torch.full((2, 3), 0.1, dtype=torch.float32)
    assert torch.equal(group_advantages(rewards, "mean_std"), torch.zeros(2, 3))


def test_clip_mask_bound_is_kept():
    for dtype in (torch.float32, F64):
        hi = torch.tensor(1 + 0.28, dtype=dtype)
        lo = torch.tensor(1 - 0.2, dtype=dtype)
        above, below = torch.nextafter(hi, hi + 1), torch.nextafter(lo, lo - 1)
        ratio = torch.stack(
            [torch.stack([torch.tensor(0.1, dtype=dtype), hi, above]), torch.stack([lo, below, above])]
        )  # (2, 3)
        low, high = clip_mask(ratio, torch.tensor([1.0, -1.0], dtype=dtype), eps_low=0.2, eps_high=0.28)
        # Â > 0 is only ever clipped high, Â < 0 only low; exactly on the bound is kept
        assert low.tolist() == [[False, False, False], [False, True, False]]
        assert high.tolist() == [[False, False, True], [False, False, False]]
    # zero advantage is never clipped
    low, high = clip_mask(torch.tensor([[0.1, 9.0]]), torch.tensor([0.0]), 0.2, 0.28)
    assert not low.any() and not high.any()


def test_apply_is_rule():
    d = torch.tensor([0.4, 0.5, 1.0, 2.0, 3.0], dtype=F64)
    weight, keep = apply_is_rule(d, "truncate", trunc=2.0)
    assert weight.tolist() == [0.4, 0.5, 1.0, 2.0, 2.0] and keep.all()
    weight, keep = apply_is_rule(d, "mask", low=0.5, high=2.0)
    assert torch.equal(weight, d) and keep.tolist() == [False, True, True, True, False]  # band is closed
    weight, keep = apply_is_rule(d, "none")
    assert torch.equal(weight, d) and keep.all()


def test_aggregate_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    # token sum 15 over 3 rows: C = 3·3, or 3·max_tokens
    assert aggregate(x, mask, "constant").item() == 15 / 9
    assert aggregate(x, mask, "constant", max_tokens=10).item() == 15 / 30
    assert aggregate(x, mask, "token_mean").item() == 15 / 5
    # (2 + 4.5) / 2: the empty row drops out instead of counting as 0
    assert aggregate(x, mask, "seq_mean_token_mean").item() == 3.25


def test_is_weights_decomposition():
    logp, logp_old, logp_infer, _, mask = example(pad=float("nan"))
    iw = is_weights(logp, logp_old, logp_infer, mask)
    torch.testing.assert_close(iw.full, iw.discrepancy * iw.staleness, atol=1e-15, rtol=0)
    expected_d = torch.tensor([[1.0, 0.8, 2.5], [1.25, 0.6, 1.0]], dtype=F64)  # exactly 1 on padding
    torch.testing.assert_close(iw.discrepancy, expected_d, atol=1e-12, rtol=0)
    assert not iw.discrepancy.requires_grad and iw.staleness.requires_grad


def test_registry():
    assert loss_names() == ALL_LOSSES and set(LOSSES) == set(ALL_LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("minirl")(lambda *a: None)
    assert LOSSES["minirl"].__name__ == "minirl"  # the failed registration did not replace it
    with pytest.raises(ValueError, match="valid: cispo, grpo, gspo, minirl, minirl_lennorm, minirl_no_is"):
        policy_loss("ppo", *example())


# ----------------------------------------------------------------------------- gradient identities


def toy_policy(seed, N=6, T=7, D=5, V=11):
    """A linear softmax policy: logp (N, T) of sampled tokens as a function of theta (D, V), ragged mask."""
    g = torch.Generator().manual_seed(seed)
    theta = (0.5 * torch.randn(D, V, generator=g, dtype=F64)).requires_grad_()
    x = torch.randn(N, T, D, generator=g, dtype=F64)
    logits = x @ theta  # (N, T, V)
    y = torch.multinomial(logits.detach().softmax(-1).reshape(-1, V), 1, generator=g).reshape(N, T)
    logp = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (N, T)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (N, T)
    adv = torch.randn(N, generator=g, dtype=F64)
    return theta, logp, mask, adv, g


def grad_of(loss, theta):
    return torch.autograd.grad(loss, theta, retain_graph=True)[0]


def test_minirl_on_policy_is_reinforce_over_constant():
    theta, logp, mask, adv, _ = toy_policy(0)
    same = logp.detach()
    out = policy_loss("minirl", logp, same, same, adv, mask, max_tokens=10)
    # E5 at θ = θ_old and μ = π: −(1/C) Σ_i Σ_t Â_i ∇logp_i,t with C = N · max_tokens = 6 · 10
    reinforce = -(adv[:, None] * logp * mask).sum() / 60
    torch.testing.assert_close(grad_of(out.loss, theta), grad_of(reinforce, theta), atol=1e-12, rtol=0)
    assert out.stats["clip/frac"] == 0.0 and out.stats["is/full_ess"] == 1.0


def test_minirl_lennorm_weights_each_response_by_its_length():
    theta, logp, mask, adv, _ = toy_policy(1)
    same = logp.detach()
    out = policy_loss("minirl_lennorm", logp, same, same, adv, mask)
    lengths = mask.sum(1)  # (N,)
    reinforce = -((adv / lengths)[:, None] * logp * mask).sum() / mask.shape[0]
    torch.testing.assert_close(grad_of(out.loss, theta), grad_of(reinforce, theta), atol=1e-12, rtol=0)


def test_minirl_inside_band_is_is_weighted_reinforce():
    theta, logp, mask, adv, g = toy_policy(2)
    # |log r| <= 0.05 keeps every r inside [0.8, 1.28]; the discrepancy is large and unruled
    logp_old = logp.detach() + 0.05 * (2 * torch.rand(logp.shape, generator=g, dtype=F64) - 1)
    logp_infer = logp_old + 0.5 * torch.randn(logp.shape, generator=g, dtype=F64)
    out = policy_loss("minirl", logp, logp_old, logp_infer, adv, mask)
    assert out.stats["clip/frac"] == 0.0
    w = (logp.detach() - logp_infer).exp()  # (N, T) π/μ
    reinforce = -(w * adv[:, None] * logp * mask).sum() / logp.numel()
    torch.testing.assert_close(grad_of(out.loss, theta), grad_of(reinforce, theta), atol=1e-12, rtol=0)


def test_minirl_no_is_ignores_logp_infer():
    theta, logp, mask, adv, g = toy_policy(3)
    logp_old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)
    a = policy_loss("minirl_no_is", logp, logp_old, logp_old - 1.0, adv, mask, is_rule="mask")
    b = policy_loss("minirl_no_is", logp, logp_old, torch.randn(logp.shape, generator=g, dtype=F64), adv, mask)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(grad_of(a.loss, theta), grad_of(b.loss, theta))
    assert a.stats["is/discrepancy_mean"] != b.stats["is/discrepancy_mean"]  # μ did change


def test_cispo_passes_no_gradient_through_its_weight():
    _, logp_t, mask, adv, g = toy_policy(4)
    logp = logp_t.detach().requires_grad_()
    logp_old = logp.detach() + 0.2 * torch.randn(logp.shape, generator=g, dtype=F64)
    logp_infer = logp_old + 0.2 * torch.randn(logp.shape, generator=g, dtype=F64)
    policy_loss("cispo", logp, logp_old, logp_infer, adv, mask).loss.backward()
    capped = (logp.detach() - logp_infer).exp().clamp(max=1.28)  # (N, T) sg[min(w, 1+ε_high)]
    n = mask.sum()
    torch.testing.assert_close(logp.grad, -(capped * adv[:, None] * mask) / n, atol=1e-12, rtol=0)
    # had the weight been differentiated, uncapped tokens would carry an extra −w·Â·logp/n
    through = -(capped * adv[:, None] * mask * (1 + logp.detach() * (capped < 1.28))) / n
    assert (logp.grad - through).abs().max() > 1e-2


def test_grpo_gradient_equals_masked_lennorm_gradient():
    # PPO's min(r·Â, clip(r)·Â) has gradient r·Â·∇logp exactly where E5 keeps the token, 0 where it masks
    theta, logp, mask, adv, g = toy_policy(5)
    logp_old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)
    logp_infer = logp_old + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)
    for rule in ("none", "truncate", "mask"):
        a = policy_loss("grpo", logp, logp_old, logp_infer, adv, mask, is_rule=rule)
        b = policy_loss("minirl_lennorm", logp, logp_old, logp_infer, adv, mask, is_rule=rule)
        assert a.stats["clip/frac"] > 0
        torch.testing.assert_close(grad_of(a.loss, theta), grad_of(b.loss, theta), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_masked_tokens_contribute_exactly_zero_gradient(name):
    logp, logp_old, logp_infer, adv, mask = example()
    out = policy_loss(name, logp, logp_old, logp_infer, adv, mask, is_rule="mask", is_high=2.0)
    grad = torch.autograd.grad(out.loss, logp)[0]
    assert grad[1, 2].item() == 0.0  # padding
    if name in ("minirl", "minirl_lennorm", "grpo"):
        assert grad[0, 1].item() == 0.0 and grad[1, 0].item() == 0.0  # clipped by E5
        assert grad[0, 2].item() == 0.0  # d = 2.5 outside the MIS band
    # junk (even NaN and inf) at padding changes nothing, bit for bit
    for pad in (float("nan"), float("inf"), -7.0):
        junk = example(pad=pad)
        out2 = policy_loss(name, *junk, is_rule="mask", is_high=2.0)
        assert torch.equal(out2.loss, out.loss)
        assert torch.equal(torch.autograd.grad(out2.loss, junk[0])[0], grad)
        assert out2.stats == out.stats


# ----------------------------------------------------------------------------- slow reference


def reference_loss(name, logp, logp_old, logp_infer, adv, mask, eps_low=0.2, eps_high=0.28, **rule_hp):
    """Per-token Python loops straight from the formulas (E5, E6), independent of the vectorised parts."""
    is_rule, c = rule_hp.get("is_rule", "none"), rule_hp.get("is_trunc", 2.0)
    lo, hi = rule_hp.get("is_low", 0.5), rule_hp.get("is_high", 2.0)

    def rule(d):  # -> (weight, keep)
        if is_rule == "truncate":
            return min(d, c), True
        if is_rule == "mask":
            return d, lo <= d <= hi
        return d, True

    def clipped(ratio, a):
        return (a > 0 and ratio > 1 + eps_high) or (a < 0 and ratio < 1 - eps_low)

    def ppo(ratio, a):  # min(r·Â, clip(r)·Â)
        return torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)

    N, T = mask.shape
    rows = [[t for t in range(T) if mask[i, t]] for i in range(N)]
    total, n_tokens, n_rows = 0.0, sum(map(len, rows)), sum(1 for r in rows if r)
    for i, toks in enumerate(rows):
        a = adv[i].item()
        row = 0.0
        for t in toks:
            ratio = torch.exp(logp[i, t] - logp_old[i, t])
            d = math.exp(logp_old[i, t].item() - logp_infer[i, t].item())
            dw, keep = rule(d)
            if name in ("minirl", "minirl_lennorm", "minirl_no_is"):
                w = ratio.item() if name == "minirl_no_is" else dw * ratio.item()
                keep = (keep or name == "minirl_no_is") and not clipped(ratio.item(), a)
                row = row - (w * a * logp[i, t] if keep else 0.0)
            elif name == "grpo":
                row = row - (dw * ppo(ratio, a) if keep else 0.0)
            elif name == "cispo":
                row = row - (min(dw * ratio.item(), 1 + eps_high) * a * logp[i, t] if keep else 0.0)
        if name == "gspo" and toks:
            s = torch.exp(sum(logp[i, t] - logp_old[i, t] for t in toks) / len(toks))
            dw, keep = rule(math.exp(sum(logp_old[i, t].item() - logp_infer[i, t].item() for t in toks) / len(toks)))
            row = -(dw * ppo(s, a)) if keep else 0.0
        if name in ("minirl_lennorm", "grpo") and toks:
            row = row / len(toks)
        total = total + row
    if name in ("minirl", "minirl_no_is"):
        return total / (N * T)
    if name == "cispo":
        return total / n_tokens
    return total / n_rows


def random_batch(seed, N=6, T=8):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(N, T, generator=g, dtype=F64) * 0.9 + 0.05).requires_grad_()
    logp_old = logp.detach() + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    logp_infer = logp_old + 0.4 * torch.randn(N, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[2] = 0  # one empty response
    mask = torch.arange(T)[None] < lengths[:, None]  # (N, T) ragged
    adv = torch.randn(N, generator=g, dtype=F64)
    adv[0] = 0.0
    # whole-response shifts so the sequence-level (GSPO) clip and rule fire too, not only the token-level ones
    logp_old[3] -= 0.8  # s_3 ≈ e^0.8 = 2.2 > 1.28 with Â > 0: clipped high
    logp_old[4] += 0.8  # s_4 ≈ e^-0.8 = 0.45 < 0.8 with Â < 0: clipped low
    adv[3], adv[4] = abs(adv[3]), -abs(adv[4])
    logp_infer[3:5] = logp_old[3:5] + 0.4 * torch.randn(2, T, generator=g, dtype=F64)  # only staleness moved
    logp_infer[1] -= 0.8  # geometric-mean discrepancy ≈ 2.2, outside any band here
    return logp, logp_old, logp_infer, adv, mask


RULES = [{}, {"is_rule": "truncate", "is_trunc": 1.5}, {"is_rule": "mask", "is_low": 0.7, "is_high": 1.4}]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rule", range(len(RULES)))
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_reference_matches_vectorised(name, rule, seed):
    logp, logp_old, logp_infer, adv, mask = random_batch(seed)
    out = policy_loss(name, logp, logp_old, logp_infer, adv, mask, **RULES[rule])
    ref = reference_loss(name, logp, logp_old, logp_infer, adv, mask, **RULES[rule])
    torch.testing.assert_close(out.loss, ref, atol=1e-12, rtol=0)
    g_out, g_ref = (torch.autograd.grad(x, logp)[0] for x in (out.loss, ref))
    torch.testing.assert_close(g_out, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", range(len(RULES)))
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_rows_with_zero_advantage_can_be_left_out(name, rule):
    """The trainer's skip: the loss on the rows with Â ≠ 0, told the whole batch's sizes, has the whole batch's
    value and gradient (rows 0 and 5 have Â = 0; row 2 is empty and keeps counting in the sizes)."""
    logp, logp_old, logp_infer, adv, mask = random_batch(0)
    adv[5] = 0.0
    whole = policy_loss(name, logp, logp_old, logp_infer, adv, mask, max_tokens=8, **RULES[rule])
    live = (adv != 0).nonzero().squeeze(1)
    assert live.tolist() == [1, 2, 3, 4]
    sub = logp[live]
    part = policy_loss(name, sub, logp_old[live], logp_infer[live], adv[live], mask[live], max_tokens=8,
                       batch=BatchSize.of(mask), **RULES[rule])
    assert BatchSize.of(mask) == (6, int(mask.sum()), 5)
    torch.testing.assert_close(part.loss, whole.loss, rtol=1e-14, atol=0)
    g_whole = torch.autograd.grad(whole.loss, logp)[0]
    g_part = torch.autograd.grad(part.loss, logp)[0]
    assert g_whole[adv == 0].abs().max().item() == 0.0  # the premise: no gradient where Â = 0
    torch.testing.assert_close(g_part, g_whole, rtol=1e-14, atol=0)
    # without the sizes the rows given would be taken for the whole batch: a different normalisation
    alone = policy_loss(name, sub, logp_old[live], logp_infer[live], adv[live], mask[live], max_tokens=8,
                        **RULES[rule])
    assert not torch.isclose(alone.loss, whole.loss, rtol=1e-6)


def test_random_batches_exercise_every_branch():
    # the reference comparison only means something if clipping and both rules actually fire
    for seed in (0, 1):
        batch = random_batch(seed)
        s = policy_loss("minirl", *batch).stats
        assert s["clip/frac_low"] > 0 and s["clip/frac_high"] > 0
        assert policy_loss("minirl", *batch, **RULES[1]).stats["is/rule_frac_truncated"] > 0
        assert policy_loss("minirl", *batch, **RULES[2]).stats["is/rule_frac_masked"] > 0
        s = policy_loss("gspo", *batch, **RULES[2]).stats
        assert s["is/rule_frac_masked"] > 0 and s["clip/frac_low"] > 0 and s["clip/frac_high"] > 0


# ----------------------------------------------------------------------------- E9 first-order fidelity


def fidelity(sigma, seeds=range(16)):
    """Mean cos(g_seq, g_tok) over seeds when log(π/μ) per token is σ·N(0, 1) noise."""
    cosines = []
    for seed in seeds:
        theta, logp, mask, adv, g = toy_policy(seed, N=8, T=12, D=8, V=16)
        logp_infer = logp.detach() + sigma * torch.randn(logp.shape, generator=g, dtype=F64)
        cosines.append(cosine(*first_order_gradients(logp, logp_infer, adv, mask, [theta])))
    return sum(cosines) / len(cosines)


SIGMAS = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]


def test_fidelity_is_one_when_all_ratios_are_one():
    theta, logp, mask, adv, _ = toy_policy(0)
    g_seq, g_tok = first_order_gradients(logp, logp.detach(), adv, mask, [theta])
    # W_i = w_i,t = 1: both are Σ_i Â_i Σ_t ∇logp, the same vector
    torch.testing.assert_close(g_seq, g_tok, atol=1e-12, rtol=0)
    assert cosine(g_seq, g_tok) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("lo, hi", list(zip(SIGMAS, SIGMAS[1:])))
def test_fidelity_falls_as_log_ratio_noise_grows(lo, hi):
    assert fidelity(hi) < fidelity(lo)


def test_fidelity_gap_is_second_order_in_noise():
    # the surrogate is a first-order approximation: 1 − cos grows like σ², so tripling σ multiplies it by ~9
    ratio = (1 - fidelity(0.03)) / (1 - fidelity(0.01))
    assert 8 < ratio < 10


def test_sequence_weight_overflow_is_normalised():
    theta, logp, mask, adv, g = toy_policy(6)
    mask = torch.ones_like(mask)  # equal lengths, so a per-token shift moves every log W_i by the same amount
    logp_infer = logp.detach() + 0.1 * torch.randn(logp.shape, generator=g, dtype=F64)
    g_seq, g_tok = first_order_gradients(logp, logp_infer, adv, mask, [theta], retain_graph=True)
    # log W_i += 7·200 = 1400: exp overflows float64, the max-normalised weights do not
    g_seq2, g_tok2 = first_order_gradients(logp, logp_infer - 200.0, adv, mask, [theta])
    assert torch.isfinite(g_seq2).all()
    torch.testing.assert_close(g_seq2, g_seq, atol=1e-12, rtol=0)
    assert cosine(g_seq2, g_tok2) == pytest.approx(cosine(g_seq, g_tok), abs=1e-12)


def test_first_order_gradients_unused_params_and_cosine_edge_cases():
    theta, logp, mask, adv, _ = toy_policy(7)
    unused, frozen = torch.zeros(3, dtype=F64, requires_grad=True), torch.ones(2, dtype=F64)
    g_seq, g_tok = first_order_gradients(logp, logp.detach(), adv, mask, [frozen, theta, unused], retain_graph=True)
    assert g_seq.shape == (2 + theta.numel() + 3,)
    assert torch.equal(g_tok[:2], torch.zeros(2, dtype=F64)) and torch.equal(g_tok[-3:], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(g_tok[2:-3], grad_of((adv[:, None] * logp * mask).sum(), theta).flatten())
    assert math.isnan(cosine(torch.zeros(4), torch.ones(4)))
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == -1.0
    with pytest.raises(ValueError, match="^logp: must require grad"):
        first_order_gradients(logp.detach(), logp.detach(), adv, mask, [theta])


def test_replay_fidelity_against_hand_computed_directions():
    # Two one-token responses, θ = 0 in R²; logp is linear in θ: own routing ∇logp = a_i, replayed ∇logp = z_i.
    # Own: log W = (ln 2, 0) -> W / max W = (1, 1/2); g_seq(own) = 1·(+1)·(1, 0) + ½·(−1)·(0, 1) = (1, −½).
    # Replayed: w = (1, 3); g_tok = 1·(+1)·(1, 1) + 3·(−1)·(0, 1) = (1, −2); g_seq(replayed) ∝ (1/3, −2/3).
    # cos(g_seq(own), g_tok) = (1 + 1) / (√1.25 · √5) = 0.8; cos(g_seq(replayed), g_tok) = 1 (one token: W = w).
    from stablerl.diagnostics import fidelity

    theta = torch.zeros(2, dtype=F64, requires_grad=True)
    a, z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64)
    own = (a @ theta + torch.tensor([math.log(2), 0.0], dtype=F64))[:, None]  # (2, 1)
    own2 = (a @ theta + torch.tensor([math.log(2), 0.0], dtype=F64))[:, None]  # a second graph of it
    replayed = (z @ theta + torch.tensor([0.0, math.log(3)], dtype=F64))[:, None]  # (2, 1)
    adv, mask, infer = torch.tensor([1.0, -1.0], dtype=F64), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1)
    out = fidelity(replayed, infer.to(F64), adv, mask, [theta], retain_graph=True, logp_own=own)
    assert out["fidelity/cosine"] == pytest.approx(1.0, abs=1e-12)
    assert out["fidelity/replay_cosine"] == pytest.approx(0.8, abs=1e-12)
    assert out["fidelity/abs_log_W_mean"] == pytest.approx(math.log(3) / 2, abs=1e-12)  # of the replayed policy
    # the bias alone: cos(g_seq(own), g_seq(replayed)) = cos((1, −½), (1/3, −2/3)) = 0.8 as well (one token each)
    assert out["fidelity/routing_bias_cosine"] == pytest.approx(0.8, abs=1e-12)
    # without replay both policies are one: the same number as E9, and no bias
    plain = fidelity(own2, infer.to(F64), adv, mask, [theta])
    assert plain["fidelity/replay_cosine"] == plain["fidelity/cosine"]
    assert plain["fidelity/routing_bias_cosine"] == pytest.approx(1.0, abs=1e-12)
    # truncated sampling: π_θ's own routing gives response 2's token probability 0, so W_2 = 0 and only response 1
    # is left in g_seq(own) = (1, 0): cos with g_tok = (1, −2) is 1/√5; with no response left, NaN (no error)
    dead = torch.tensor([[False], [True]])
    own3 = torch.where(dead, float("-inf"), a @ theta[:, None] + torch.tensor([[math.log(2)], [0.0]], dtype=F64))
    replayed3 = (z @ theta + torch.tensor([0.0, math.log(3)], dtype=F64))[:, None]
    cut = fidelity(replayed3, infer.to(F64), adv, mask, [theta], retain_graph=True, logp_own=own3)
    assert cut["fidelity/replay_cosine"] == pytest.approx(1 / math.sqrt(5), abs=1e-12)
    none = fidelity(replayed3, infer.to(F64), adv, mask, [theta], logp_own=torch.where(mask, float("-inf"), own3))
    assert math.isnan(none["fidelity/replay_cosine"]) and none["fidelity/cosine"] == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("arg", ["logp", "logp_old", "logp_infer", "adv", "mask"])
def test_shape_mismatch_names_the_argument(arg):
    inputs = dict(zip(["logp", "logp_old", "logp_infer", "adv", "mask"], example()))
    inputs[arg] = inputs[arg][:1] if arg != "mask" else inputs[arg][:, :2]
    with pytest.raises(ValueError, match=f"^{'logp' if arg == 'mask' else arg}: expected shape"):
        policy_loss("minirl", **inputs)


@pytest.mark.parametrize("arg", ["logp", "logp_old", "logp_infer", "adv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_argument(arg, bad):
    inputs = dict(zip(["logp", "logp_old", "logp_infer", "adv", "mask"], example()))
    x = inputs[arg].detach().clone()
    x.view(-1)[1] = bad  # a response token ([0, 1]) or the second advantage
    inputs[arg] = x
    with pytest.raises(ValueError, match=f"^{arg}: NaN or inf at"):
        policy_loss("minirl", **inputs)


def test_bad_mask_and_types():
    logp, logp_old, logp_infer, adv, mask = example()
    with pytest.raises(ValueError, match="^mask: expected dtype torch.bool"):
        policy_loss("minirl", logp, logp_old, logp_infer, adv, mask.double())
    with pytest.raises(ValueError, match="^mask: no response tokens"):
        policy_loss("minirl", logp, logp_old, logp_infer, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="^adv: expected a torch.Tensor"):
        policy_loss("minirl", logp, logp_old, logp_infer, [1.0, -0.5], mask)
    with pytest.raises(ValueError, match="^logp_old: expected a floating dtype"):
        policy_loss("minirl", logp, logp_old.long(), logp_infer, adv, mask)


@pytest.mark.parametrize(
    "hp, message",
    [
        ({"eps": 0.2}, r"unknown loss hyperparameter\(s\) \['eps'\]; accepted: eps_low, eps_high, max_tokens"),
        ({"adv_mode": "mean"}, r"unknown loss hyperparameter\(s\) \['adv_mode'\]"),
        ({"is_rule": "clip"}, r"^is_rule: unknown rule 'clip'; valid: none, truncate, mask"),
        ({"eps_low": -0.1}, r"^eps_low: expected a finite number >= 0"),
        ({"eps_low": 1.0}, r"^eps_low: must be < 1"),
        ({"eps_high": float("nan")}, r"^eps_high: expected a finite number"),
        ({"is_trunc": 0.0}, r"^is_trunc: must be > 0"),
        ({"is_low": 3.0}, r"^is_low: must be <= is_high"),
        ({"max_tokens": 0}, r"^max_tokens: expected a positive int"),
        ({"max_tokens": 2.5}, r"^max_tokens: expected a positive int"),
        ({"batch": (4, 10, 4)}, r"^batch: expected a BatchSize"),
        ({"batch": BatchSize(4, -1, 4)}, r"^batch: expected a BatchSize of non-negative ints"),
    ],
)
def test_bad_hyperparameters(hp, message):
    with pytest.raises(ValueError, match=message):
        policy_loss("minirl", *example(), **hp)


def test_bad_advantage_and_aggregation_input():
    with pytest.raises(ValueError, match="^mode: unknown advantage mode 'std'; valid: mean, mean_std, loo"):
        group_advantages(torch.zeros(2, 4), "std")
    with pytest.raises(ValueError, match=r"^rewards: expected a float tensor of shape \(B, G\)"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="^rewards: contains NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="^rewards: mode 'loo' needs at least 2 samples"):
        group_advantages(torch.zeros(3, 1), "loo")
    with pytest.raises(ValueError, match="^mode: unknown aggregation 'sum'"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), "sum")


def test_inputs_are_not_mutated_and_low_precision_is_upcast():
    logp, logp_old, logp_infer, adv, mask = example(pad=5.0)
    before = [x.detach().clone() for x in (logp, logp_old, logp_infer, adv, mask)]
    policy_loss("gspo", logp, logp_old, logp_infer, adv, mask).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (logp, logp_old, logp_infer, adv, mask)))
    # bf16 log-probs are computed on in float32: the loss matches float32 inputs rounded the same way
    half = [x.detach().to(torch.bfloat16) for x in example()[:3]]
    out = policy_loss("minirl", half[0].requires_grad_(), half[1], half[2], adv.float(), mask)
    ref = policy_loss("minirl", *(x.float() for x in half), adv.float(), mask)
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, ref.loss)
