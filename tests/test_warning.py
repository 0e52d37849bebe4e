"""Early warning: the cross-step routing metric on a constructed flip, the warning rules, and the trainer's hook."""

import pytest
import torch
from test_trainer import TINY

from stablerl.checkpoint import list_checkpoints
from stablerl.config import ConfigError, load_config
from stablerl.diagnostics import routing_agreement
from stablerl.metrics import read_metrics
from stablerl.model import PRESETS, build_model
from stablerl.sequences import pack
from stablerl.trainer import RouteProbe, expert_routes, train
from stablerl.warning import Rule, Watch


def test_cross_step_routing_sees_a_constructed_flip():
    # Swapping the router rows of experts 0 and 1 in the last MoE layer changes the expert set of exactly the tokens
    # that had one of the two (a token with both or neither keeps its set); the layers before it see no change.
    model = build_model(PRESETS["tiny-moe"], seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 99, (int(n),), generator=g).tolist() for n in (5, 9, 7, 12)]
    responses = [torch.randint(3, 99, (int(n),), generator=g).tolist() for n in (8, 3, 11, 6)]
    probe = RouteProbe.of(pack(prompts, responses, pad_id=0), torch.arange(4))
    before = expert_routes(model, probe)  # (n, S, L, K)
    last = len(model.model.layers) - 1
    gate = model.model.layers[last].mlp.gate.weight
    with torch.no_grad():
        gate[[0, 1]] = gate[[1, 0]].clone()
    after = expert_routes(model, probe)
    has = torch.stack([(before[:, :, last] == e).any(-1) for e in (0, 1)])  # (2, n, S)
    flipped = (has[0] ^ has[1])[probe.mask_seq]  # real tokens only
    assert 0.05 < flipped.float().mean() < 0.95  # the construction flips some tokens, not all
    got = routing_agreement(before, after, probe.mask_seq, "route/cross_step")
    assert got[f"route/cross_step/layer{last}"] == pytest.approx(1 - flipped.float().mean().item(), abs=1e-7)
    assert all(got[f"route/cross_step/layer{i}"] == 1.0 for i in range(last))


def test_a_rule_fires_once_per_excursion():
    cross, fid = "route/cross_step/mean", "fidelity/cosine"
    w = Watch.of(["kl/k3>0.01", f"{cross}<0.97", f"{fid}<0.9"])
    seq = [{"kl/k3": 0.001, cross: 0.96}, {"kl/k3": 0.02}, {"kl/k3": 0.05}, {"kl/k3": float("nan")}, {"kl/k3": 0.03},
           {"kl/k3": 0.005, cross: 0.96}, {"kl/k3": 0.011, cross: 0.99}, {cross: 0.95, fid: 0.5}, {}]
    fired = [[str(r) for r in w.check(m)] for m in seq]
    # k3 fires at 0.02 and not again while above; a NaN (the abort guard's business) is neither side, so 0.03 is
    # the same excursion; back at 0.005, then 0.011 fires again. Cross-step routing is beyond at the first step
    # (0.96): that is the configuration, not a change, so it fires only after it has been back (0.99) and crossed
    # again (0.95). Fidelity, first logged later (every k steps), fires on its first value beyond.
    assert fired == [[], ["kl/k3>0.01"], [], [], [], [], ["kl/k3>0.01"], [f"{cross}<0.97", f"{fid}<0.9"], []]
    assert Rule.parse(" entropy/mean < 1e-3 ") == Rule("entropy/mean", "<", 1e-3)
    for bad in ("kl/k3", "kl/k3>=0.1", "kl/k3>abc", ">0.1"):
        with pytest.raises(ValueError, match="bad warning rule"):
            Rule.parse(bad)
    with pytest.raises(ConfigError, match=r"train.warn_on: bad warning rule 'kl/k3=1'"):
        load_config(None, ["train.warn_on=[kl/k3=1]"])


def test_the_hook_warns_once_then_stops_with_a_checkpoint(tmp_path):
    # The warmup takes the learning rate from 1e-4 (step 1) to 2e-4 and 3e-4 (lr 1e-3 over 10 steps):
    # train/lr > 1.5e-4 crosses at step 2 and stays beyond: one warning, at step 2; on_warning=stop ends the run
    # there, with a checkpoint to resume from. Cross-step routing is logged at every step of the (MoE) run.
    args = [f"out_dir={tmp_path}", *TINY, "train.steps=3", "train.save_every=0", "train.warmup_steps=10",
            "train.lr_schedule=constant", "train.warn_on=[train/lr>1.5e-4]"]
    cont = load_config(None, [*args, "name=cont"])
    done = train(cont, show_progress=False)
    assert done.steps == 3 and done.final_eval_step == 3  # finished: its last eval is the last step's
    rows = [r for r in read_metrics(tmp_path / "cont" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows if "warn/train/lr" in r] == [2]
    assert rows[1]["warn/train/lr"] == rows[1]["train/lr"] == pytest.approx(2e-4)
    assert all(0 < r["route/cross_step/mean"] <= 1 and "route/cross_step/layer0" in r for r in rows)
    stop = load_config(None, [*args, "name=stop", "train.on_warning=stop"])
    res = train(stop, show_progress=False)
    # stopped before its last step: the final accuracy is the last eval's (step 0 here, no eval since), and says so
    assert res.steps == 2 and res.final_eval_step == 0 and res.final_accuracy == res.initial_accuracy
    assert [r["step"] for r in read_metrics(tmp_path / "stop" / "metrics.jsonl") if "reward/mean" in r] == [1, 2]
    assert [p.name for p in list_checkpoints(tmp_path / "stop")] == ["step_000002"]
    # resumed: the rule goes on from the side its signal was on. train/lr > 2.5e-4 crosses at step 3 (3e-4); a run
    # stopped after step 2 and resumed must still fire there, though step 3 is the first step it checks
    late = [a.replace("train/lr>1.5e-4", "train/lr>2.5e-4") for a in args]
    train(load_config(None, [*late, "name=resumed", "train.steps=2"]), show_progress=False)
    train(load_config(None, [*late, "name=resumed"]), resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "warn/train/lr" in r] == [3]
    off = load_config(None, [*args, "name=nocross", "train.cross_step_rows=0", "train.steps=1"])
    train(off, show_progress=False)
    assert not any("route/cross_step/mean" in r for r in read_metrics(tmp_path / "nocross" / "metrics.jsonl"))
