"""Cold-start SFT: trace-style mixtures, and the per-style sub-batches that keep short traces unpadded."""

import pytest
import torch

from stablerl.errors import UserError
from stablerl.hf import get_model
from stablerl.sequences import pack
from stablerl.sft import parse_style, sft_backward


def test_parse_style_one_style_or_a_normalised_mixture():
    assert parse_style("long") == {"long": 1.0}
    assert parse_style("long:1, answer:3") == {"long": 0.25, "answer": 0.75}
    assert parse_style("long:0.4,answer:0.6") == pytest.approx({"long": 0.4, "answer": 0.6}, rel=1e-15)


@pytest.mark.parametrize("spec", ["long:0.4,answer", "long:-1,answer:1", "long:0,answer:1", "long:1,long:2",
                                  ":1,answer:1", "long:nan,answer:1", "long:x"])
def test_parse_style_bad_mixture_names_the_key_and_the_part(spec):
    with pytest.raises(UserError, match=r"^sft\.style: bad mixture part .* e\.g\. long:0\.4,answer:0\.6"):
        parse_style(spec)


def test_per_style_sub_batches_give_the_one_batch_loss_and_gradient():
    torch.manual_seed(0)
    model, _ = get_model("tiny-moe", seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (7, 9, 6, 8, 7)]
    responses = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (30, 4, 27, 5, 6)]  # long / short
    long_rows, short_rows = [0, 2], [1, 3, 4]

    def grads():
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.zero_grad()
    whole = sft_backward(model, [pack(prompts, responses, 0)])
    g_whole = grads()
    model.zero_grad()
    split = sft_backward(model, [pack([prompts[i] for i in rows], [responses[i] for i in rows], 0)
                                 for rows in (long_rows, short_rows)])
    g_split = grads()
    # same tokens, same normalisation (the step's 72 response tokens); only the padding differs
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-4, atol=1e-7)
    assert whole.item() > 1.0  # an untrained model's cross-entropy: the comparison is not of two zeros
