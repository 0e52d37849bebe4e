"""Lead time and false alarms of early-warning signals on synthetic curves with hand-checked answers."""

import pytest

from stablerl.study.leadtime import Curve, choose, first_alarm, markdown, rank_signals, score, split
from stablerl.warning import Rule


def _curve(name, k3, collapse=None, ent=None):
    rows = [{"step": s, "kl/k3": v} for s, v in enumerate(k3, 1)]
    if ent is not None:
        for r, e in zip(rows, ent):
            r["entropy/mean"] = e
    return Curve(name, collapse, rows)


def test_score_counts_detections_leads_and_false_alarms():
    runs = [_curve("c1", [0.001, 0.02, 0.05, 0.09], collapse=4),  # fires at step 2: lead 2
            _curve("c2", [0.001, 0.001, 0.001, 0.03, 0.2], collapse=3),  # fires only after its collapse: missed
            _curve("s1", [0.001, 0.015, 0.001]),  # one excursion: a false alarm
            _curve("s2", [0.001, 0.002, 0.003])]
    sc = score(Rule("kl/k3", ">", 0.01), runs)
    assert (sc.detected, sc.collapsed, sc.false_alarms, sc.stable, sc.leads) == (1, 2, 1, 2, (2,))
    assert sc.j == pytest.approx(1 / 2 - 1 / 2) and sc.lead == 2


def test_an_alarm_is_a_crossing_not_a_starting_value():
    # a signal beyond the threshold from step 1 on (as clip/frac < 1e-4 is on-policy, where it is 0 by construction)
    # marks the configuration, not a change: no alarm; one that starts beyond, comes back and crosses again alarms at
    # the crossing (step 4)
    rule = Rule("kl/k3", ">", 0.01)
    assert first_alarm(_curve("a", [0.02, 0.03, 0.05], collapse=3), rule) is None
    assert first_alarm(_curve("b", [0.02, 0.005, 0.006, 0.02, 0.1], collapse=5), rule) == 4
    assert score(rule, [_curve("s", [0.02, 0.02, 0.02])]).false_alarms == 0
    # a signal first logged at step 10 (fidelity every 10 steps) alarms on that first value: it is not the start
    sparse = Curve("f", 12, [{"step": s, **({"fidelity/cosine": 0.5} if s == 10 else {})} for s in range(13)])
    assert first_alarm(sparse, Rule("fidelity/cosine", "<", 0.9)) == 10


def test_choose_finds_the_separating_threshold_and_direction():
    # collapsed runs climb above 0.02 before collapsing; stable ones stay below 0.01
    runs = [_curve("c1", [0.001, 0.03, 0.04, 0.05], collapse=4), _curve("c2", [0.002, 0.002, 0.025, 0.03], collapse=4),
            _curve("s1", [0.001, 0.009, 0.004, 0.002]), _curve("s2", [0.003, 0.005, 0.008, 0.001])]
    rule, sc = choose("kl/k3", runs)
    # the largest stable value (0.009) is the strictest threshold with no false alarm; '>' fires strictly above it
    assert rule == Rule("kl/k3", ">", 0.009) and sc.j == 1.0 and sc.leads == (2, 1)
    # entropy falling before collapse: the chosen direction is '<'
    ent = [_curve("c1", [0] * 4, 4, [1.0, 0.5, 0.2, 0.1]), _curve("c2", [0] * 4, 4, [1.0, 0.9, 0.3, 0.1]),
           _curve("s1", [0] * 4, None, [1.0, 0.9, 0.8, 0.85]), _curve("s2", [0] * 4, None, [0.95, 0.9, 0.7, 0.9])]
    rule, sc = choose("entropy/mean", ent)
    # the smallest stable value (0.7) is the loosest '<' threshold with no false alarm: the longest lead, (2, 1)
    assert rule == Rule("entropy/mean", "<", 0.7) and sc.j == 1.0 and sc.leads == (2, 1)


def test_rank_scores_on_the_held_out_half_only():
    # k3 separates every run; entropy separates the choosing half but not the held-out one
    col = [_curve(f"c{i}", [0.001, 0.05, 0.06], 3, [0.5, 0.9, 0.9] if i % 2 == 0 else [0.5, 0.5, 0.5])
           for i in range(4)]
    sta = [_curve(f"s{i}", [0.001, 0.002, 0.001], None, [0.5, 0.5, 0.5] if i % 2 == 0 else [0.5, 0.9, 0.5])
           for i in range(4)]
    fit, held = split(col + sta)
    assert [c.name for c in fit] == ["c0", "c2", "s0", "s2"] and [c.name for c in held] == ["c1", "c3", "s1", "s3"]
    rows = rank_signals(col + sta, ["entropy/mean", "kl/k3"])
    assert [r.signal for r in rows] == ["kl/k3", "entropy/mean"]
    k3, ent = rows
    assert (k3.held.detected, k3.held.false_alarms, k3.held.j, k3.held.lead) == (2, 0, 1.0, 1)
    assert ent.fit.j == 1.0 and (ent.held.detected, ent.held.false_alarms, ent.held.j) == (0, 2, -1.0)
    table = markdown(rows, col + sta)
    assert "| 1 | train-inference KL k3 (E3) | `kl/k3>0.002` | +1.00 | 2/2 | 1 (1..1) | 0/2 | +1.00 |" in table


def test_too_few_collapses_say_so():
    runs = [_curve("c", [0.1, 0.2], 2), _curve("s", [0.1, 0.1])]
    assert "Fewer than 2 collapsed runs" in markdown(rank_signals(runs), runs)
