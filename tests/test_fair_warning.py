"""Early warning judged fairly (issue 27): the reward baseline, the vectorised alarm table against first_alarm, the
leave-one-cell-out split (no cell on both sides), the config baseline and the warning call, on hand-made runs."""

import random

from stablerl.study.leadtime import (
    CellCurve,
    Curve,
    alarm_table,
    first_alarm,
    judge_fairly,
    leave_cell_out,
    mixed_cells,
    reward_drop_alarm,
)


def run(name, cell, collapse, x, reward, lr=1e-4):
    rows = [{"step": s, "x": x[s], "reward/mean": reward[s]} for s in range(len(x))]
    return CellCurve(Curve(name, collapse, rows), cell, (("lr", lr), ("seed", int(name[-1]))))


def collapsing(name, cell, lr=1e-4):
    # x jumps at step 4; reward 0.8 then 0.1 from step 6: 5-step means at steps 6, 7, 8 are 0.66, 0.52, 0.38, and
    # the best so far is 0.8, so "< 0.7 x best = 0.56" first holds at step 7. The collapse rule's step is taken as 9.
    return run(name, cell, 9, [0.5] * 4 + [2.0] * 8, [0.8] * 6 + [0.1] * 6, lr)


def stable(name, cell, lr=1e-4):
    return run(name, cell, None, [0.5] * 12, [0.8] * 12, lr)


def test_reward_drop_alarm_hand_computed():
    r = collapsing("a/0", "a")
    assert reward_drop_alarm(r.curve) == 7
    assert reward_drop_alarm(stable("b/0", "b").curve) is None
    early = run("c/0", "c", 6, [0.5] * 12, [0.8] * 6 + [0.1] * 6)  # the alarm would come after the collapse step
    assert reward_drop_alarm(early.curve) is None


def test_alarm_table_equals_first_alarm():
    rng = random.Random(0)
    runs = []
    for i in range(6):
        xs = [rng.choice([0.1, 0.5, 0.9, 1.3]) for _ in range(15)]
        rows = [{"step": s, **({"x": xs[s]} if (s % 3 or i % 2) else {})} for s in range(15)]  # gaps in some runs
        if i == 5:  # a signal first logged late: its first value beyond may fire
            rows = [{"step": s, **({"x": xs[s]} if s >= 4 else {})} for s in range(15)]
        runs.append(CellCurve(Curve(f"r{i}", 11 if i % 3 == 0 else None, rows), f"c{i % 3}"))
    tab = alarm_table("x", runs)
    assert len(tab.rules) == 2 * 4  # four distinct values, both directions
    for k, rule in enumerate(tab.rules):
        for i, r in enumerate(runs):
            want = first_alarm(r.curve, rule)
            assert (None if tab.steps[k, i] < 0 else int(tab.steps[k, i])) == want, (rule, i)


def test_leave_cell_out_never_fits_on_the_held_cell():
    runs = [collapsing("a/0", "a"), stable("a/1", "a"), collapsing("b/0", "b"), collapsing("b/1", "b"),
            stable("c/0", "c"), stable("c/1", "c")]
    seen = []

    def choose(fit):
        seen.append({r.cell for r in fit})
        return None

    held, within, rules = leave_cell_out(runs, choose)
    assert seen == [{"b", "c"}, {"a", "c"}, {"a", "b"}]  # one fold per cell, sorted, the held cell never in fit
    assert (held.detected, held.collapsed, held.false_alarms, held.stable) == (0, 3, 0, 3) and rules == ("never",)
    assert mixed_cells(runs) == {"a"} and (within.collapsed, within.stable) == (1, 1)


def test_judge_fairly_signal_leads_reward_and_config_baseline():
    runs = [collapsing("a/0", "a"), stable("a/1", "a"), collapsing("b/0", "b", lr=3e-4),
            collapsing("b/1", "b", lr=3e-4), stable("c/0", "c"), stable("c/1", "c")]
    rows = {r.name: r for r in judge_fairly(runs, signals=["x"])}
    base = rows["reward baseline"]
    # the reward baseline fires at step 7 on every collapsed run (lead 9 - 7 = 2), never on a stable one
    assert (base.held.detected, base.held.false_alarms, base.held.leads) == (3, 0, (2, 2, 2))
    # x crosses 0.5 -> 2 at step 4 only on collapsing runs: chosen on the other cells at 0 false alarms, it detects
    # all 3 held-out collapses 5 steps ahead: as many as the baseline, earlier -> a warning
    x = rows["x"]
    assert (x.held.detected, x.held.false_alarms, x.held.leads) == (3, 0, (5, 5, 5)) and x.warning is True
    assert (x.within.detected, x.within.false_alarms, x.within.j) == (1, 0, 1.0)
    # config baseline: fold a (fit b, c) picks lr==3e-4 (J 1) and misses a/0; fold b (fit a, c): every lr is 1e-4,
    # the first candidate (lr<=1e-4) fires on all with J 0 and misses b; fold c (fit a, b) picks lr==3e-4 (J 2/3)
    cfg = rows["config baseline"]
    assert (cfg.held.detected, cfg.held.false_alarms) == (0, 0)
    assert cfg.rules[0] == "lr==0.0003"
