"""RL trainer end to end on tiny runs: invariants of E5/E7/E8, a complete run directory, and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stablerl.algorithm import BatchSize
from stablerl.config import load_config
from stablerl.metrics import read_metrics
from stablerl.trainer import train

TINY = ["train.batch_prompts=2", "train.group_size=4", "engine.max_new_tokens=12", "task.n_heldout=8",
        "task.n_train=64", "train.eval_every=0", "train.fidelity_every=1", "train.lr=1e-3",
        "task.reward=reward_fixtures:has_seven"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _run(tmp_path, name, extra):
    cfg = load_config(None, [f"out_dir={tmp_path}", f"name={name}", *TINY, *extra])
    train(cfg, show_progress=False)
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_on_policy_fp32_staleness_is_exactly_one_with_top_p(tmp_path):
    # N = 1: logp and logp_old come from the same weights and the same batch, so r == 1 bitwise and nothing is
    # clipped; top_p = 0.9 must not bias the ratios (both sides use the same truncated, renormalised support).
    rows = [r for r in _run(tmp_path, "onpol", ["train.steps=3", "engine.numerics=fp32", "engine.top_p=0.9",
                                                 "train.lr_schedule=cosine", "train.warmup_steps=1"])
            if "reward/zero_std_frac" in r]
    assert len(rows) == 3
    # (this run also pins the cosine schedule: warmup 1 step, then 0.1 + 0.9 · (1 + cos(π · (s − 1)/2)) / 2 of lr)
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.55e-3], rel=1e-12)
    for r in rows:
        assert r["route/infer_vs_train/mean"] == 1.0
        # only rows with Â != 0 are updated; a step where every group's rewards agree makes no update at all
        assert ("is/staleness_max" in r) == (r["reward/zero_std_frac"] < 1)
    steps = [r for r in rows if "is/staleness_max" in r]
    assert len(steps) >= 2
    for r in steps:
        assert r["is/staleness_min"] == 1.0 and r["is/staleness_max"] == 1.0
        assert r["clip/frac"] == 0.0
        assert abs(r["is/discrepancy_max"] - 1) < 1e-3 and abs(r["is/discrepancy_min"] - 1) < 1e-3
        # some group has signal: E9 is defined, and on-policy fp32 is first order
        assert r["fidelity/cosine"] > 0.9999 and r["fidelity/abs_log_W_max"] < 1e-4


def test_r3_routes_agree_and_off_policy_is_stale(tmp_path):
    rows = _run(tmp_path, "r3", ["train.steps=3", "engine.numerics=bf16", "algo.replay=R3", "train.n_minibatches=2",
                                 "train.lr=3e-3"])
    steps = [r for r in rows if "is/staleness_max" in r]
    assert len(steps) >= 2
    assert all("route/infer_vs_train/mean" not in r for r in rows)  # under R3 the trainer runs the engine's experts
    # with two mini-batches the second is off-policy: the policy moved, so some staleness ratio is not 1
    assert any(r["is/staleness_max"] > 1.0 or r["is/staleness_min"] < 1.0 for r in steps)


def test_replay_bias_probe_per_minibatch_and_it_does_not_touch_the_run(tmp_path):
    # R2 replays θ_old's own routes. At the first mini-batch θ = θ_old, so the replayed policy is π_θ itself and the
    # replay's bias is zero: the E9 cosine against the true (own-routing) g_seq equals the plain one. Probing every
    # mini-batch takes gradients but never accumulates them: the run is the same as one probing the last only.
    common = ["train.steps=3", "engine.numerics=bf16", "algo.replay=R2", "train.n_minibatches=2", "train.lr=3e-3"]
    every = [r for r in _run(tmp_path, "all", [*common, "train.fidelity_minibatches=all"]) if "loss/policy" in r]
    last = [r for r in _run(tmp_path, "last", common) if "loss/policy" in r]
    assert len(every) == len(last) >= 2
    for a, b in zip(every, last):
        assert a["loss/policy"] == b["loss/policy"] and a["grad/norm"] == b["grad/norm"]
        assert a["fidelity/replay_cosine"] == a["fidelity/replay_cosine/mb1"] == b["fidelity/replay_cosine"]
        assert abs(a["fidelity/replay_cosine/mb0"] - a["fidelity/cosine/mb0"]) < 1e-6
        assert "fidelity/cosine/mb0" not in b


def test_r3_with_fp32_engine_replays_the_trainers_own_routes(tmp_path):
    # The engine's routes laid out like the training batch (prompt then response tokens, full_routes) against the
    # trainer's own router, computed independently: with fp32 numerics they agree on every token of every layer, so
    # R3 changes nothing there, and replaying them reproduces the trainer's logits on every real token (to float
    # rounding: padding rows run expert 0 under replay, which changes the experts' GEMM shapes).
    import torch

    from stablerl.diagnostics import routing_agreement
    from stablerl.engine import Engine
    from stablerl.hf import get_model
    from stablerl.sequences import pack
    from stablerl.trainer import full_routes, seq_token_mask

    model, tok = get_model("tiny-moe", seed=0)
    ro = Engine(model, tok, numerics="fp32").generate(["Q: 12+34\n", "Q: 5+6+7\n", "Q: 1\n"], n=2,
                                                      max_new_tokens=12, seed=0)
    packed = pack(ro.prompt_ids, [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)], tok.pad_id)
    routes, real = full_routes(ro, packed), seq_token_mask(packed)  # (N, S, L, K), (N, S)
    own = model(packed.ids)
    agree = routing_agreement(routes, own.routes, real, "r")
    assert agree == {**{f"r/layer{i}": 1.0 for i in range(model.config.num_hidden_layers)}, "r/mean": 1.0}
    replayed = model(packed.ids, routes=routes)
    torch.testing.assert_close(replayed.logits[real], own.logits[real], rtol=0, atol=1e-6)
    # and through the trainer: R3 with the fp32 engine, on-policy, is first order with no staleness
    rows = [r for r in _run(tmp_path, "r3fp32", ["train.steps=2", "engine.numerics=fp32", "algo.replay=R3"])
            if "is/staleness_max" in r]
    assert rows
    for r in rows:
        assert r["is/staleness_min"] == 1.0 and r["is/staleness_max"] == 1.0 and r["clip/frac"] == 0.0
        assert abs(r["is/discrepancy_max"] - 1) < 1e-4 and abs(r["is/discrepancy_min"] - 1) < 1e-4


@pytest.mark.slow
def test_cli_smoke_writes_a_complete_run_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stablerl", "train", "--no-progress", f"out_dir={tmp_path}",
                        "name=smoke", *TINY, "train.steps=2", "train.eval_every=1", "train.save_every=1"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "smoke"
    assert load_config(run / "config.yaml").train.steps == 2
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "step"} <= samples[0].keys()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.safetensors"} <= {
        p.name for p in (run / "checkpoints" / "step_000002").iterdir()}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = ["train.steps=5", "train.save_every=1", "train.keep_checkpoints=10", *TINY]
    # both runs in a subprocess of the same environment: an in-process run would take the pytest process's torch
    # thread count, which any earlier test may have changed (other float sums, other samples)
    cmd = [sys.executable, "-m", "stablerl", "train", "--no-progress", f"out_dir={tmp_path}", *args]
    r = subprocess.run(cmd + ["name=straight"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    cmd = cmd + ["name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=ENV)
    ck = tmp_path / "killed" / "checkpoints" / "step_000002"
    deadline = time.time() + 240
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ck.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr

    def strip(rows):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "mem/"))} for row in rows]

    straight = strip(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed = strip(read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert resumed == straight
    assert Path(tmp_path / "killed" / "checkpoints" / "step_000005").exists()


# ---- guards and metrics that must say what they measure -------------------------------------------------------------


def test_a_step_is_bad_when_every_mini_batch_it_tried_was_skipped(tmp_path):
    # B = 2 prompts x G = 2, N = 4 mini-batches of one row. The reward makes every live row's gradient norm overflow
    # (inf), and a group whose two rewards agree has Â = 0 (no update tried). A step with one live and one dead
    # group skips 2 of its 4 mini-batches and tries no other: it is bad, and two such steps in a row abort the run.
    from stablerl.errors import UserError

    args = ["train.batch_prompts=2", "train.group_size=2", "train.n_minibatches=4", "train.max_bad_steps=2",
            "task.reward=reward_fixtures:huge_on_odd_first_char", "train.steps=8", "train.save_every=0"]
    with pytest.raises(UserError, match="aborting: 2 steps in a row had a NaN/Inf loss"):
        _run(tmp_path, "bad", args)
    rows = [r for r in read_metrics(tmp_path / "bad" / "metrics.jsonl") if "reward/mean" in r]
    bad = [r for r in rows if r["guard/skipped_minibatches"] > 0]
    # the abort comes at the second step that tried anything, and one of the two skipped only part of its N = 4
    assert rows[-1]["step"] == bad[1]["step"] and len(bad) == 2
    assert any(r["guard/skipped_minibatches"] < 4 for r in bad)
    # the end of the run, for the report: aborted at that step, and why
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status == {"status": "aborted", "step": bad[1]["step"],
                      "reason": f"2 steps in a row had a NaN/Inf loss or gradient (last at step {bad[1]['step']})"}


def test_old_vs_current_routing_is_logged_only_when_measured(tmp_path):
    # N = 1: the one update runs at θ_old itself, so its routes agree with θ_old's by construction: not logged.
    one = _run(tmp_path, "n1", ["train.steps=2"])
    assert json.loads((tmp_path / "n1" / "status.json").read_text()) == {"status": "finished", "step": 2,
                                                                         "reason": "all 2 steps"}
    assert not any("route/old_vs_current/mean" in r for r in one)
    two = [r for r in _run(tmp_path, "n2", ["train.steps=2", "train.n_minibatches=2"]) if "loss/policy" in r]
    assert two and all(0 < r["route/old_vs_current/mean"] <= 1 for r in two)


def test_minibatch_normalisation_counts_only_the_tokens_the_loss_sums_over():
    # Mini-batch of 4 rows x 3 tokens; rows 1 and 3 are live (rows 0 and 2 have Â = 0). The moved policy drops row 1's
    # token 1 (log π = -inf under top-p): the loss over the live rows, normalised with `minibatch_size`, must equal the
    # loss over the whole mini-batch with that token masked, for the token-mean (cispo) and sequence-mean (grpo) losses.
    from stablerl.algorithm import policy_loss
    from stablerl.trainer import minibatch_size

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # (4, 3)
    idx, rows = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3])
    keep = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # (2, 3) live rows' kept tokens
    size = minibatch_size(mask, idx, [rows], [keep])
    assert size == (4, 8, 4)  # 9 tokens less the dropped one, and row 1 has a token left
    assert minibatch_size(mask, idx, [rows[:1], rows[1:]], [keep[:1, :2], keep[1:]]) == size  # as micro-batches
    logp_old = -torch.rand(4, 3, generator=g) - 0.1
    logp = (logp_old + 0.05 * torch.randn(4, 3, generator=g)).requires_grad_()
    logp_infer = logp_old + 0.01 * torch.randn(4, 3, generator=g)
    adv = torch.tensor([0.0, 1.5, 0.0, -0.5])
    whole = mask.clone()
    whole[1, 1] = False
    for loss in ("cispo", "grpo"):
        part = policy_loss(loss, logp[rows], logp_old[rows], logp_infer[rows], adv[rows], keep, batch=size)
        full = policy_loss(loss, logp, logp_old, logp_infer, adv, whole)
        torch.testing.assert_close(part.loss, full.loss, rtol=1e-6, atol=0)
        # the normalisation the trainer used before counted the dropped token: a different loss
        stale = policy_loss(loss, logp[rows], logp_old[rows], logp_infer[rows], adv[rows], keep,
                            batch=BatchSize.of(mask[idx]))
        assert loss == "grpo" or abs(float(stale.loss.detach()) - float(full.loss.detach())) > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_rl_steps_with_micro_batches_and_r3(tmp_path, dtype):
    rows = _run(tmp_path, f"cuda-{dtype}", ["device=cuda", f"train.dtype={dtype}", "train.steps=2",
                                            "train.micro_batch_size=3", "algo.replay=R3", "train.n_minibatches=2",
                                            "train.activation_checkpointing=true"])
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["guard/skipped_minibatches"] == 0 for r in steps)


# ---- on-policy θ_old from the update's own forward (issue 29) -------------------------------------------------------


def _onpolicy_setup(micro: int, diag_rows: int = 0):
    from stablerl.engine import Engine
    from stablerl.hf import get_model
    from stablerl.trainer import Batch, Update, plan_step

    cfg = load_config(None, ["train.batch_prompts=4", "train.group_size=3", f"train.micro_batch_size={micro}",
                             f"train.diag_rows={diag_rows}", "engine.max_new_tokens=10"])
    model, tok = get_model("tiny-moe", seed=0)
    ro = Engine(model, tok, numerics="bf16").generate(["Q: 12+34\n", "Q: 5+6+7\n", "Q: 1\n", "Q: 9+1\n"], n=3,
                                                      max_new_tokens=10, seed=1)
    # groups 0 and 2 have signal, groups 1 and 3 do not (Â = 0: 6 rows no update runs)
    adv = torch.tensor([1.0, -0.5, -0.5, 0, 0, 0, -1.0, 0.5, 0.5, 0, 0, 0])
    batch = Batch.of(ro, adv, tok.pad_id, torch.device("cpu"), model.is_moe)
    plan = plan_step(cfg, 0, adv, Update.of(cfg, model, batch).par, cfg.train.micro_batch_size)
    return cfg, model, batch, plan, Update.of(cfg, model, batch)


def test_on_policy_logp_old_from_the_update_equals_a_separate_theta_old_pass():
    # N = 1, micro-batches of 2 rows (6 live rows: 3 micro-batches): the update's own forwards give θ_old's log-probs
    # and routes of every live row, equal to a separate no-grad θ_old pass over the same micro-batches (1e-6)
    from stablerl.trainer import old_policy

    cfg, model, batch, plan, update = _onpolicy_setup(micro=2)
    mb = plan.batches[0]
    assert plan.on_policy and len(mb.micro) == 3 and sum(len(r) for r in mb.micro) == 6
    assert sorted(torch.cat(plan.old_micro).tolist()) == [3, 4, 5, 9, 10, 11]  # only Â = 0 rows get their own pass
    ref = old_policy(model, batch.packed, mb.micro, None, update.lp_args)  # the separate pass, at θ_old
    fill = old_policy(model, batch.packed, [], None, update.lp_args)  # empty buffers
    model.zero_grad()
    st, _, ent = update.run(mb, stale=False, probe=False, fill=fill)
    model.zero_grad()
    live = torch.cat(mb.micro)
    torch.testing.assert_close(fill.logp[live], ref.logp[live], rtol=0, atol=1e-6)
    assert torch.equal(fill.routes[live], ref.routes[live])
    assert ent == pytest.approx(ref.entropy_sum, rel=1e-6)
    assert st["is/staleness_min"] == 1.0 and st["is/staleness_max"] == 1.0  # r == 1 exactly: logp_old = logp


def test_subsampled_diagnostics_equal_the_full_ones_when_every_row_is_scored():
    from dataclasses import replace

    from stablerl.trainer import Batch, diagnose, old_policy

    cfg, model, batch, plan, update = _onpolicy_setup(micro=0)
    old = old_policy(model, batch.packed, [torch.arange(12)], None, update.lp_args)
    full = diagnose(batch, old, None, True)
    ones = diagnose(batch, old, torch.ones(12), True)  # a "subsample" of every row, each standing for itself
    assert ones.keys() == full.keys()
    for k in full:
        assert ones[k] == pytest.approx(full[k], rel=1e-6, abs=1e-9), k
    # train.diag_rows >= the rows with Â = 0 (or 0) scores every row: no weights at all
    for k in (0, 6, 100):
        assert _onpolicy_setup(micro=0, diag_rows=k)[3].weight is None
    # diag_rows = 2 of the 6 Â = 0 rows: those 2 scored, each standing for 3; live rows weigh 1, the others 0
    w = _onpolicy_setup(micro=0, diag_rows=2)[3].weight
    assert sorted(w.tolist()) == [0.0] * 4 + [1.0] * 6 + [3.0] * 2 and float(w.sum()) == 12.0
    # the weights are those of a mean over every row: scoring row 3 alone with weight 3 for rows 3, 4, 5 equals the
    # full mean when rows 3-5 are the same row three times (hand check on kl/k1 with a row copied)
    sub = torch.ones(12)
    sub[[4, 5]] = 0.0
    sub[3] = 3.0
    copy = torch.tensor([0, 1, 2, 3, 3, 3, 6, 7, 8, 9, 10, 11])
    p = batch.packed
    b3 = Batch(type(p)(p.ids[copy], p.resp_pos[copy], p.targets[copy], p.mask[copy], p.prompt_lens[copy],
                       p.resp_lens[copy]), batch.logp_infer[copy], batch.routes_infer[copy], batch.adv[copy],
               batch.tok_mask[copy])
    o3 = replace(old, logp=old.logp[copy], routes=old.routes[copy])
    weighted = diagnose(batch, old, sub, True)
    copied = diagnose(b3, o3, None, True)
    for k in ("kl/k1", "kl/k3", "route/infer_vs_train/mean"):
        assert weighted[k] == pytest.approx(copied[k], rel=1e-5), k


def test_on_policy_micro_batched_run_with_subsampled_diagnostics(tmp_path):
    # N = 1 with micro-batches of 3 rows and 2 scored rows with Â = 0: r == 1 exactly (logp_old is the update's own
    # forward), and every diagnostic of θ_old is still logged
    rows = [r for r in _run(tmp_path, "micro", ["train.steps=2", "engine.numerics=fp32", "train.micro_batch_size=3",
                                                "train.diag_rows=2"]) if "is/staleness_max" in r]
    assert rows
    for r in rows:
        assert r["is/staleness_min"] == 1.0 and r["is/staleness_max"] == 1.0 and r["clip/frac"] == 0.0
        assert abs(r["is/discrepancy_max"] - 1) < 1e-3 and r["kl/k3"] < 1e-5 and r["entropy/mean"] > 0
        assert r["route/infer_vs_train/mean"] == 1.0 and r["guard/outside_support_frac"] == 0.0
