"""Memory-flat training passes against the full computation: the chunked LM head (log-probs, entropy, gradients),
micro-batches with gradient accumulation, and activation checkpointing."""


import pytest
import torch

from stablerl.algorithm import group_advantages
from stablerl.config import load_config
from stablerl.engine import Engine
from stablerl.hf import get_model
from stablerl.sampling import logprobs_from_logits
from stablerl.sequences import pack, policy_logprobs, response_logits, select
from stablerl.sft import sft_backward
from stablerl.trainer import Batch, MiniBatch, Update, minibatch_size, old_policy, seq_token_mask

PROMPTS = ["Q: 12+34\n", "Q: 5+6+7\n", "Q: 1\n", "Q: 999+1\n"]


@pytest.fixture(scope="module")
def rollout():
    model, tok = get_model("tiny-moe", seed=0)
    ro = Engine(model, tok, numerics="bf16").generate(PROMPTS, n=3, max_new_tokens=14, seed=1)
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], tok.pad_id)
    return model, ro, packed


def _full(model, packed, **sampling):
    """The reference: (N, S, V) logits, then log-probs and the entropy of the full sampling distribution."""
    lp = logprobs_from_logits(response_logits(model(packed.ids).logits, packed), **sampling)  # (N, T, V)
    logp = lp.gather(-1, packed.targets[..., None]).squeeze(-1).masked_fill(~packed.mask, 0.0)  # (N, T)
    p = lp.exp()
    ent = -(p * lp.masked_fill(p == 0, 0.0)).sum(-1)[packed.mask].sum()
    return logp, float(ent.detach())


def _grads(model) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])


@pytest.mark.parametrize("sampling", [{}, {"top_p": 0.9}, {"top_k": 5, "temperature": 0.7}])
def test_chunked_logprobs_and_entropy_equal_the_full_computation(rollout, sampling):
    model, _, packed = rollout
    ref, ref_ent = _full(model, packed, **sampling)
    with torch.no_grad():
        for chunk in (1, 7, 10_000):  # one token at a time, ragged chunks, everything at once
            out = policy_logprobs(model, packed, chunk=chunk, entropy=True, **sampling)
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(out.logp))  # the same tokens fall outside the support
            torch.testing.assert_close(out.logp[finite], ref[finite], rtol=0, atol=1e-6)
            assert out.entropy_sum == pytest.approx(ref_ent, rel=1e-6)


def test_chunked_head_gradient_equals_the_full_one(rollout):
    # with grad, each chunk is recomputed in backward (checkpointed head): the gradient must not change
    model, _, packed = rollout
    w = torch.randn(packed.mask.shape, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (_full(model, packed)[0] * w).sum().backward()
    ref = _grads(model)
    model.zero_grad()
    (policy_logprobs(model, packed, chunk=5).logp * w).sum().backward()
    # the same sums in other GEMM shapes: fp32 rounding, ~3e-7 of the gradient's scale (entries up to ~30 here)
    torch.testing.assert_close(_grads(model), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    model.zero_grad()


def test_activation_checkpointing_gives_the_same_gradients(rollout):
    model, _, packed = rollout
    w = torch.randn(packed.mask.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        (policy_logprobs(model, packed, checkpoint=ckpt).logp * w).sum().backward()
        grads.append(_grads(model))
    model.zero_grad()
    assert torch.equal(grads[0], grads[1])  # the same ops recomputed on the same inputs: bitwise


@pytest.mark.parametrize("loss", ["minirl", "grpo", "cispo", "gspo"])
def test_micro_batched_update_equals_one_pass(rollout, loss):
    # one E8 mini-batch (all 12 rows) run as one pass, and as micro-batches of 5, 5 and 2 rows with gradients
    # accumulated: same loss and gradient. stale=True with top-p takes the support look-ahead path too.
    model, ro, packed = rollout
    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 0}
    N = packed.ids.shape[0]
    rewards = torch.tensor([float(i % 3 == 0) for i in range(N)]).view(len(PROMPTS), -1)
    adv = group_advantages(rewards).flatten()  # (N,)
    lp_args = dict(**sampling, chunk=4, checkpoint=False)
    old = old_policy(model, packed, [torch.arange(N)], None, lp_args)
    cfg = load_config(None, [f"algo.loss={loss}", "engine.top_p=0.95", "engine.max_new_tokens=14",
                             "train.logit_chunk=4"])
    logp_infer = ro.logp_infer[:, : packed.mask.shape[1]].masked_fill(~packed.mask, 0.0)  # (N, T)
    update = Update.of(cfg, model, Batch(packed, logp_infer, None, adv, seq_token_mask(packed)))
    update = update.at_old(old)
    rows = torch.arange(N)
    results = []
    for micro in ([rows], list(rows.split(5))):
        model.zero_grad()
        st, _, _ = update.run(MiniBatch(rows, micro), stale=True, probe=False)
        results.append((st["loss/policy"], _grads(model)))
    model.zero_grad()
    # micro-batches chunk the LM head differently: fp32 rounding (~1e-8 on per-token terms of order 1; the loss itself
    # is a near-cancelling sum, as Σ_i Â_i = 0 per group, so it is compared absolutely)
    assert results[1][0] == pytest.approx(results[0][0], rel=0, abs=1e-7)
    scale = float(results[0][1].abs().max())
    assert scale > 0  # the test has a gradient to compare
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6 * scale)


def test_micro_batched_sft_equals_one_pass(rollout):
    model, _, packed = rollout
    grads = []
    for micro in (0, 4):
        model.zero_grad()
        loss = sft_backward(model, [select(packed, torch.arange(6)), select(packed, torch.arange(6, 12))], micro)
        grads.append((float(loss), _grads(model)))
    model.zero_grad()
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=1e-6 * float(grads[0][1].abs().max()))


def test_minibatch_size_counts_every_row_of_the_minibatch():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    size = minibatch_size(mask, torch.tensor([0, 2]), [], [])
    assert size == (2, 5, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunked_logprobs_match_cpu(rollout):
    model, _, packed = rollout
    with torch.no_grad():
        ref = policy_logprobs(model, packed, chunk=7, entropy=True)
        gpu = policy_logprobs(model.cuda(), packed.to("cuda"), chunk=7, entropy=True)
    model.cpu()
    torch.testing.assert_close(gpu.logp.cpu(), ref.logp, rtol=0, atol=1e-4)
    assert gpu.entropy_sum == pytest.approx(ref.entropy_sum, rel=1e-4)
