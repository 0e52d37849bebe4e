"""Data parallelism (stablerl.distributed): 2 CPU processes (gloo) against 1 on the same global batch, for DDP and
FSDP2, with and without R3 replay; resume after SIGKILL; the world-size rule of --resume; the torchrun launcher."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stablerl.algorithm import group_advantages
from stablerl.config import ConfigError, load_config, lr_at
from stablerl.distributed import Parallel
from stablerl.engine import Engine
from stablerl.hf import get_model
from stablerl.metrics import read_metrics
from stablerl.trainer import Learner, make_optimizer

# N = 4 prompts x 4 samples, two E8 mini-batches (the second one stale), micro-batches of 2 rows: ranks hold
# different numbers of micro-batches, so padding passes and DDP's no_sync accumulation are exercised
SMALL = ["model=tiny-moe", "train.batch_prompts=4", "train.group_size=4", "train.n_minibatches=2",
         "train.micro_batch_size=2", "engine.max_new_tokens=10", "engine.numerics=bf16", "train.lr=1e-4",
         "train.warmup_steps=1", "train.cross_step_rows=8", "task.n_train=64", "task.n_heldout=8"]
# lr 1e-4: Adam divides by sqrt(v), so a gradient element of ~1e-7 whose last bits differ (the ranks sum in another
# order) moves its weight by a few % of lr differently; at 1e-3 that reached 1.2e-5 on one expert weight
# rewards of the 4 groups: mixed, all equal (Â = 0: rows no update runs), mixed, one right
REWARDS = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rollouts(cfg, steps: int):
    """Fixed global rollouts (one per step) from the initial model: both runs learn from exactly these."""
    model, tok = get_model(cfg.model, seed=cfg.seed)
    engine = Engine(model, tok, numerics=cfg.engine.numerics)
    prompts = [f"{i}+{i + 3}=" for i in range(cfg.train.batch_prompts)]
    return [engine.generate(prompts, n=cfg.train.group_size, max_new_tokens=cfg.engine.max_new_tokens, seed=100 + s)
            for s in range(steps)]


def _learn(cfg, par: Parallel, rollouts) -> dict:
    """Run the steps' updates; -> per-step metrics, every mini-batch's reduced gradients and the final weights."""
    torch.manual_seed(0)
    model, tok = get_model(cfg.model, seed=cfg.seed)
    model.train()
    forward = par.wrap(model)
    opt = make_optimizer(model, cfg.train)
    grads = []

    clip = par.grad_norm

    def record_then_clip(params, max_norm):
        # each mini-batch's gradient once complete (reduced over the ranks), before clipping: the trainer's own call
        g = {n: None if p.grad is None else p.grad for n, p in model.named_parameters()}
        grads.append({n: None if v is None else (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                      for n, v in g.items()})
        return clip(params, max_norm)

    par.grad_norm = record_then_clip
    learner = Learner(cfg, model, forward, opt, tok.pad_id, torch.device("cpu"), par)
    metrics = []
    for step, ro in enumerate(rollouts):
        adv = group_advantages(REWARDS, cfg.algo.adv_mode).flatten()
        m, attempted, skipped = learner.step(step, ro, adv, lr_at(step, cfg.train.lr, cfg.train.warmup_steps,
                                                                  cfg.train.steps, cfg.train.lr_schedule), {})
        metrics.append(m)
    full = par.full_model(model)
    weights = None if full is None else {k: v.detach().clone() for k, v in full.state_dict().items()}
    return {"metrics": metrics, "grads": grads, "weights": weights, "adam_eps": opt.defaults["eps"]}


def _worker(rank: int, world: int, port: int, overrides: list[str], rollouts, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    par = Parallel.setup(cfg)
    try:
        res = _learn(cfg, par, rollouts)
        if par.main:
            torch.save(res, out)
    finally:
        par.close()


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}: {a} (2 processes) vs {b} (1 process)"


# N = 1 (on-policy): θ_old of the live rows comes from each rank's update forward, summed over the ranks after it
@pytest.mark.parametrize(("parallel", "replay", "n_mb"), [("ddp", "none", 2), ("fsdp", "none", 2), ("ddp", "R3", 2),
                                                         ("fsdp", "R3", 2), ("ddp", "none", 1), ("fsdp", "R3", 1)])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, parallel, replay, n_mb):
    overrides = [*SMALL, f"algo.replay={replay}", f"train.parallel={parallel}", f"train.n_minibatches={n_mb}",
                 f"train.fidelity_every={1 if parallel == 'ddp' else 0}"]
    cfg = load_config(None, overrides)
    rollouts = _rollouts(cfg, steps=2)
    one = _learn(cfg, Parallel(), rollouts)
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, _free_port(), overrides, rollouts, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    # both steps updated (N mini-batches each) and did something
    assert len(one["grads"]) == len(two["grads"]) == 2 * n_mb
    for s, (m1, m2) in enumerate(zip(one["metrics"], two["metrics"])):
        assert m1.keys() == m2.keys()
        for k in ("loss/policy", "grad/norm", "kl/k3", "entropy/mean", "clip/frac"):
            _close(m2[k], m1[k], f"step {s} {k}")
        if parallel == "ddp":  # with R3, also E9 against π_θ's own routing (its g_seq summed over the ranks)
            for k in ("fidelity/cosine", "fidelity/replay_cosine", "fidelity/routing_bias_cosine"):
                _close(m2[k], m1[k], f"step {s} {k}")
        if replay == "none":
            _close(m2["route/infer_vs_train/mean"], m1["route/infer_vs_train/mean"], f"step {s} routing")
    moved = 0.0
    for j, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
        for name, a in g1.items():
            b = g2[name]
            if a is None:  # an expert no live token chose: no gradient (FSDP gives it an exact zero)
                assert b is None or not b.any(), name
                continue
            assert (b - a).abs().max() <= 1e-5, f"mini-batch {j} grad {name}: max |Δ| {(b - a).abs().max():.2e}"
    # An expert that only padding tokens chose has a gradient of exact zeros in one process, and AdamW then moves it by
    # its momentum; micro-batches on 2 ranks hold other rows, hence other padding. Those experts are left out of the
    # weight comparison (their gradients were compared above: zero on both sides).
    padding_only = {n for g in one["grads"] for n, v in g.items() if v is not None and not v.any()}
    assert all(".mlp.experts." in n for n in padding_only)
    # Adam moves an element by lr * g / (|g| + eps) on its first step, so where |g| is of the order of eps a last-bit
    # difference of g (the ranks sum in another order) moves the weight by another fraction of lr: -1.2e-9 vs -3.1e-9
    # gave weights 1.1e-5 apart on a 2-core AVX2 CPU, though the gradients agree to 2e-9. Elements with
    # 0 < |g| < eps in some mini-batch of the one-process run (rare experts' weights: 0.5% of elements here) are
    # left out of the weight comparison; their gradients were compared above.
    eps = one["adam_eps"]
    roundoff = {n: torch.stack([(g[n].abs() < eps) & (g[n] != 0) for g in one["grads"] if g[n] is not None]).any(0)
                for n in one["grads"][0] if n not in padding_only and any(g[n] is not None for g in one["grads"])}
    n_roundoff = sum(int(m.sum()) for m in roundoff.values())
    assert n_roundoff <= 1e-2 * sum(m.numel() for m in roundoff.values()), n_roundoff
    initial = get_model(cfg.model, seed=cfg.seed)[0].state_dict()
    for name, w in one["weights"].items():
        if name in padding_only:
            continue
        diff = (two["weights"][name] - w).abs()
        assert diff.where(~roundoff.get(name, torch.zeros_like(diff, dtype=torch.bool)), 0).max() <= 1e-5, name
        moved = max(moved, float((w - initial[name]).abs().max()))
    assert moved > 5e-5  # the weights did move: the comparison is not of two untouched models


# ---- end to end: torchrun, SIGKILL + resume, world-size rule --------------------------------------------------------

RUN = ["train.batch_prompts=2", "train.group_size=4", "engine.max_new_tokens=10", "task.n_heldout=8",
       "task.n_train=64", "train.eval_every=0", "train.fidelity_every=2", "train.lr=1e-3",
       "task.reward=reward_fixtures:has_seven", "train.steps=4", "train.save_every=1", "train.keep_checkpoints=10",
       "train.dist_timeout=120"]


def _train_cmd(tmp_path, name, nproc, *extra):
    return [sys.executable, "-m", "stablerl", "train", "--no-progress", f"out_dir={tmp_path}", f"name={name}", *RUN,
            *extra, *(["--nproc", str(nproc)] if nproc else [])]


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


@pytest.mark.slow
def test_sigkill_of_a_two_process_run_then_resume_matches_uninterrupted(tmp_path):
    r = subprocess.run(_train_cmd(tmp_path, "straight", 2), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp_path / "straight" / "checkpoints" / "step_000004"
    assert (ck / "optim").is_dir() and json.loads((ck / "trainer_state.json").read_text())["extra"]["world_size"] == 2
    cmd = _train_cmd(tmp_path, "killed", 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=ENV)
    ck = tmp_path / "killed" / "checkpoints" / "step_000002"
    deadline = time.time() + 400
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ck.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = _strip(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed = _strip(read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert [row["step"] for row in resumed] == [0, 1, 2, 3, 4]
    assert resumed == straight
    # another world size: one line that says what to do, and nothing in the run directory changes
    before = (tmp_path / "killed" / "metrics.jsonl").read_text()
    r = subprocess.run(_train_cmd(tmp_path, "killed", 0) + ["--resume"], capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "written by 2 process(es), this run has 1" in err[0] and "--nproc 2" in err[0], err
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == before


def test_batch_prompts_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train.batch_prompts: 4 prompts do not split over 3 processes"):
        Parallel.setup(load_config(None, ["train.batch_prompts=4"]))


def test_nproc_launches_torchrun_with_the_same_arguments():
    from stablerl.commands.train import add_arguments, launch_command

    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(["train.steps=3", "name=x", "--nproc", "2", "--resume", "--no-progress"])
    cmd = launch_command(args)
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "stablerl",
                        "train"]
    assert cmd[8:] == ["--resume", "--no-progress", "train.steps=3", "name=x"]
