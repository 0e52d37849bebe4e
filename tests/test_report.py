"""Reports from run directories alone: the collapse rule on synthetic curves, run summaries, the verdict rules on
synthetic cells, and the Markdown + PNG rendering; the report side never imports the trainer."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stablerl.cli import main
from stablerl.errors import UserError
from stablerl.metrics import read_metrics
from stablerl.stats import fisher_exact
from stablerl.study.report import find_runs, judge, plan_copy, rejudge, write_report
from stablerl.study.summary import CollapseRule, aborted, detect_collapse, run_status, summarize_run
from stablerl.study.verdicts import (
    CellStats,
    Thresholds,
    collapses_without,
    comparable,
    learns_worse,
    most_stable,
    off_policy,
)

PNG = b"\x89PNG\r\n\x1a\n"


def rows(rewards, evals=None, extra=None):
    """Metrics rows as the trainer writes them: step 0 = the cold start's eval, then one row per RL step."""
    out = [{"step": 0, "eval/accuracy": (evals or {}).get(0, 0.3)}]
    for s, r in enumerate(rewards, start=1):
        row = {"step": s, "reward/mean": r, "loss/policy": 0.0, "guard/skipped_minibatches": 0, "kl/k3": 1e-4,
               "entropy/mean": 0.1, "is/discrepancy_max": 1.5, "is/staleness_max": 1.2, "is/staleness_min": 0.9,
               "clip/frac": 0.01, "route/infer_vs_train/layer0": 0.99, "route/infer_vs_train/layer1": 0.98,
               "time/step": 1.5, **(extra or {})}
        if s in (evals or {}):
            row["eval/accuracy"] = evals[s]
        if s % 10 == 0:
            row["fidelity/cosine"] = 0.99
        out.append(row)
    return out


RISE = [0.2 + 0.6 * min(1, s / 20) for s in range(60)]  # 0.2 -> 0.8 by step 20
COLLAPSE = RISE[:30] + [0.1] * 30  # then 0.1 from step 31 on, for good
DIP = RISE[:30] + [0.05] * 4 + RISE[34:]  # down for 4 steps at 31-34, then back
LATE = RISE[:56] + [0.0] * 4  # down for the last 4 steps: still below at the end


@pytest.mark.parametrize("curve, collapsed, step, words", [
    (COLLAPSE, True, 33, "not back within 10 steps"),  # the 5-step mean crosses 0.4 at step 33
    (RISE, False, None, "stayed >= 0.5 x best"),
    (DIP, False, None, "dips recovered at steps 33-37"),  # below 0.4 from step 33, back at 37
    (LATE, True, 59, "not back within 10 steps"),
    ([0.02, 0.05, 0.0, 0.01] * 10, False, None, "never reached 0.1"),
])
def test_collapse_rule_on_synthetic_curves(curve, collapsed, step, words):
    got = detect_collapse(rows(curve))
    assert (got.collapsed, got.step) == (collapsed, step) and words in got.reason, got


def test_collapse_rule_parameters_and_aborted_runs():
    # a 4-step dip is a collapse when the rule only waits 2 steps for the recovery
    assert detect_collapse(rows(DIP), CollapseRule(patience=2)).collapsed
    # the NaN guard: 3 bad steps (every mini-batch skipped); a step with nothing to update leaves the count alone
    bad = {"reward/mean": 0.5, "guard/skipped_minibatches": 2}
    run = rows(RISE[:10]) + [{"step": 11, **bad}, {"step": 12, "reward/mean": 0.5, "guard/skipped_minibatches": 0},
                             {"step": 13, **bad}, {"step": 14, **bad}]
    assert aborted(run, 3) and not aborted(run, 4) and not aborted(run[:-1], 3)
    assert aborted(rows(RISE[:3]), 3, log="stablerl train: error: aborting: 3 steps in a row had a NaN/Inf loss")
    got = detect_collapse(run, aborted=True)
    assert got.collapsed and got.step == 14 and "NaN guard" in got.reason


def write_run(d: Path, curve, evals=None, steps=None, seed=0, log="", extra=None):
    d.mkdir(parents=True)
    cfg = {"seed": seed, "train": {"steps": steps or len(curve), "max_bad_steps": 3},
           "algo": {"loss": "minirl", "replay": "none"}, "engine": {"numerics": "bf16"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(curve, evals, extra)))
    if log:
        (d / "train.log").write_text(log)


def test_summary_from_files(tmp_path):
    write_run(tmp_path / "a", COLLAPSE, {0: 0.3, 20: 0.9, 40: 0.5, 60: 0.2})
    s = summarize_run(tmp_path / "a", exit_code=0)
    assert s["status"] == "done" and s["steps_done"] == 60 and s["steps"] == 60 and s["exit_code"] == 0
    assert (s["initial_accuracy"], s["final_accuracy"], s["best_accuracy"], s["best_accuracy_step"]) == (0.3, 0.2, 0.9,
                                                                                                        20)
    assert s["collapse"]["collapsed"] and s["collapse"]["step"] == 33 and s["collapse"]["rule"]["frac"] == 0.5
    assert s["final_reward"] == pytest.approx(0.1) and s["kl_k3_mean"] == pytest.approx(1e-4)
    assert s["staleness_abs_log_max_mean"] == pytest.approx(math.log(1.2))  # max(|log 1.2|, |log 0.9|)
    assert s["fidelity_cosine_mean"] == pytest.approx(0.99) and s["config"]["loss"] == "minirl"
    # interrupted (no row for step 60 yet) / aborted by the NaN guard, as its log says
    write_run(tmp_path / "b", RISE[:20], steps=60)
    write_run(tmp_path / "c", RISE[:20], steps=60, log="stablerl train: error: aborting: 3 steps in a row had NaN")
    assert run_status(tmp_path / "b") == ("incomplete", 20) and run_status(tmp_path / "c") == ("aborted", 20)


def test_status_json_is_the_trainers_word_and_old_runs_fall_back_to_inference(tmp_path):
    # the trainer's status.json decides, whatever the log says: aborted, or finished early (on_warning=stop), which
    # is not done (--resume continues it); once the row of train.steps is there the run is done either way
    said = {"aborted": ("aborted", 20), "finished": ("incomplete", 20)}
    for status, want in said.items():
        d = tmp_path / status
        write_run(d, RISE[:20], steps=60, log="stablerl train: error: aborting: 3 steps in a row had NaN")
        (d / "status.json").write_text(json.dumps({"status": status, "step": 20, "reason": "one line"}))
        assert run_status(d) == want
    write_run(tmp_path / "done", RISE[:20])
    (tmp_path / "done" / "status.json").write_text(json.dumps({"status": "aborted", "step": 20, "reason": "x"}))
    assert run_status(tmp_path / "done") == ("done", 20)
    # without status.json and without max_bad_steps in its config, a run's last rows are judged with the config
    # class's default (3): two bad steps are not an abort, three are
    bad = {"reward/mean": 0.5, "guard/skipped_minibatches": 1}
    for n, want in ((2, "incomplete"), (3, "aborted")):
        d = tmp_path / f"old{n}"
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 60}}))
        extra = [{"step": 20 + k, **bad} for k in range(1, n + 1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(RISE[:20]) + extra))
        assert run_status(d) == (want, 20 + n)


def cell(name, collapsed, acc=None, init=None):
    """A cell of finished synthetic runs: one per entry of `collapsed`."""
    acc = acc or [0.8] * len(collapsed)
    init = init or [0.3] * len(collapsed)
    return CellStats(name, tuple({"status": "done", "collapse": {"collapsed": c}, "final_accuracy": a,
                                  "initial_accuracy": i} for c, a, i in zip(collapsed, acc, init)))


Y, N = True, False


def test_f1_most_stable():
    # Fisher's exact test, two-sided: 3/3 vs 0/3 collapsed has p = 2 / C(6, 3) = 0.1, never significant at 0.05;
    # 9/9 vs 0/9 has p = 2 / C(18, 9) = 2 / 48620; 6/9 vs 0/9: p = 2 * C(9,6) C(9,0) / C(18,6) = 168 / 18564 = 0.00905
    assert fisher_exact(6, 3, 0, 9) == pytest.approx(168 / 18564, rel=1e-9)
    peers = [cell("no_is", [Y] * 6 + [N] * 3), cell("lennorm", [N] * 8 + [Y])]
    got = most_stable(cell("minirl", [N] * 9), peers)
    assert got.outcome == "supported" and "Fisher p = 0.00905 vs minirl" in got.numbers
    # the same rates on 3 seeds: not significant
    got = most_stable(cell("minirl", [N, N, N]), [cell("no_is", [Y, Y, Y])])
    assert got.outcome == "inconclusive" and "no peer collapsed significantly more often (p > 0.05)" in got.numbers
    assert "(Fisher p = 0.1 vs minirl)" in got.numbers
    assert most_stable(cell("minirl", [N, Y, Y]), peers).outcome == "not supported"  # MiniRL itself collapses
    # a peer collapsed less often: only significantly counts against MiniRL
    assert most_stable(cell("minirl", [N, N, Y]), [cell("p", [N, N, N])]).outcome == "inconclusive"
    assert most_stable(cell("minirl", [N] * 6 + [Y] * 3), [cell("p", [N] * 30)]).outcome == "not supported"
    got = most_stable(cell("minirl", [N, N, N]), [cell("p", [N, N, N]), cell("q", [N, N, Y])])
    assert got.outcome == "inconclusive" and "no peer collapsed in most seeds" in got.numbers
    got = most_stable(cell("minirl", [N, N]), peers)
    assert got.outcome == "inconclusive" and "fewer than 3 finished seeds: minirl (2)" in got.numbers


def test_f2_collapses_without_is():
    base = cell("minirl", [N] * 8 + [Y])
    got = collapses_without(cell("no_is", [Y] * 8 + [N]), base)
    assert got.outcome == "supported" and "no_is collapsed 8/9" in got.numbers and "minirl collapsed 1/9" in got.numbers
    # 7/9 vs 2/9: p = 0.0567 (hypergeometric, margins 9/9 and 9 collapsed of 18), just above alpha
    assert fisher_exact(7, 2, 2, 7) == pytest.approx(0.0567, abs=5e-5)
    got = collapses_without(cell("no_is", [Y] * 7 + [N] * 2), cell("minirl", [N] * 7 + [Y] * 2))
    assert got.outcome == "inconclusive" and "not significantly" in got.numbers and "Fisher p = 0.0567" in got.numbers
    assert collapses_without(cell("no_is", [Y, Y, N]), cell("minirl", [N, N, Y])).outcome == "inconclusive"
    assert collapses_without(cell("no_is", [N, N, Y]), base).outcome == "not supported"
    assert collapses_without(cell("no_is", [Y, Y, Y]), cell("minirl", [Y, Y, N])).outcome == "inconclusive"
    assert collapses_without(cell("no_is", [Y, Y]), base).outcome == "inconclusive"


def test_f3_learns_worse_needs_a_stable_baseline_and_an_interval_off_zero():
    base = cell("minirl", [N, N, N], [0.90, 0.92, 0.94])
    # d = 0.20, each sd 0.02: se = sqrt(2 * 0.0004 / 3) = 0.01633, Welch df = 4, t(0.975, 4) = 2.7764: 95% CI
    # 0.20 +- 0.0453
    got = learns_worse(base, cell("lennorm", [N, N, N], [0.70, 0.72, 0.74]))
    assert got.outcome == "supported" and "difference +20.0 points (95% Welch CI +15.5 to +24.5)" in got.numbers
    got = learns_worse(base, cell("lennorm", [N, N, N], [0.85, 0.95, 0.99]))
    assert got.outcome == "inconclusive" and "the interval holds 0" in got.numbers
    assert learns_worse(base, cell("lennorm", [N, N, N], [0.97, 0.98, 0.99])).outcome == "not supported"
    # the variant collapses: significant with 9 seeds a side, not with 3
    assert learns_worse(base, cell("lennorm", [Y, Y, N], [0.9, 0.92, 0.94])).outcome == "inconclusive"
    base9 = cell("minirl", [N] * 9, [0.9] * 9)
    assert learns_worse(base9, cell("lennorm", [Y] * 8 + [N], [0.9] * 9)).outcome == "supported"
    # the stable-baseline guard: a collapsing baseline makes F3 a restatement of F1
    got = learns_worse(cell("minirl", [Y, Y, N], [0.3, 0.4, 0.9]), cell("lennorm", [N, N, N], [0.1, 0.1, 0.1]))
    assert got.outcome == "inconclusive" and "the baseline is not stable (it collapsed in 2/3 seeds)" in got.numbers


def f4_grid(ns, fail_noclip=True, fail_norep=True, r2=(N, N, N), r3=(N, N, N), r2_large=None, r3_large=None, k=1):
    """The F4 grid; each cell's seeds repeated `k` times (k = 3: 9 seeds, enough for Fisher's test to separate)."""
    g = {}
    for n in ns:
        g[(n, "noclip", "none")] = g[(n, "noclip", "R2")] = g[(n, "noclip", "R3")] = cell(
            "nc", [Y, Y, Y] * k if fail_noclip else [N, N, N] * k)
        g[(n, "clip", "none")] = cell("c", [Y, Y, N] * k if fail_norep else [N, N, N] * k)
        g[(n, "clip", "R2")] = cell("r2", list(r2_large if n == ns[-1] and r2_large else r2) * k)
        g[(n, "clip", "R3")] = cell("r3", list(r3_large if n == ns[-1] and r3_large else r3) * k)
    return g


def test_f4_off_policy_needs_clipping_and_replay():
    ns = ["N2", "N4", "N8"]
    got = off_policy(f4_grid(ns, r2_large=(Y, Y, N), k=3))  # R2 breaks at N = 8 where R3 holds
    assert got.outcome == "supported" and [v.outcome for _, v in got.parts] == ["supported"] * 3
    # the same rates on 3 seeds: no-clip's 9 pooled runs against 3 separate (p = 1 / C(12, 3)), clip + none's 2/3
    # against 0/3 does not (p = 0.4), nor R2 from R3 at N = 8
    got = off_policy(f4_grid(ns, r2_large=(Y, Y, N)))
    assert [v.outcome for _, v in got.parts] == ["supported", "inconclusive", "inconclusive"]
    got = off_policy(f4_grid(ns, fail_noclip=False, r2_large=(Y, Y, N), k=3))  # no clip does not collapse
    assert got.outcome == "not supported" and got.parts[0][1].outcome == "not supported"
    got = off_policy(f4_grid(ns, k=3))  # R2 and R3 alike at every N: part (c) cannot tell
    assert got.outcome == "inconclusive" and got.parts[2][1].outcome == "inconclusive"
    got = off_policy(f4_grid(ns, r3_large=(Y, Y, Y), k=3))  # R3 worse than R2 at large N
    assert got.outcome == "not supported" and got.parts[2][1].outcome == "not supported"
    got = off_policy(f4_grid(["N4"]))  # --quick: one N
    assert got.parts[2][1].outcome == "inconclusive" and "two values of N" in got.parts[2][1].numbers


def test_f5_comparable_cold_starts():
    a = cell("mix", [N, N, N], [0.90, 0.92, 0.94], [0.3, 0.3, 0.3])
    b = cell("long", [N, N, N], [0.88, 0.93, 0.95], [0.6, 0.6, 0.6])
    assert comparable([a, b]).outcome == "supported"
    assert comparable([a, cell("short", [N, N, N], [0.5, 0.52, 0.5], [0.1] * 3)]).outcome == "not supported"
    assert comparable([a, cell("short", [Y, Y, N], [0.9] * 3, [0.1] * 3)]).outcome == "inconclusive"
    got = comparable([a, cell("same", [N, N, N], [0.5] * 3, [0.31] * 3)])
    assert got.outcome == "inconclusive" and "did not differ" in got.numbers
    assert comparable([a, b], Thresholds(min_seeds=4)).outcome == "inconclusive"


STUDY = """\
name: demo
seeds: [0, 1, 2]
cells:
  minirl: []
  minirl_no_is: [algo.loss=minirl_no_is]
  lennorm: [algo.loss=minirl_lennorm]
findings:
  F2: {rule: collapses_without, roles: {without: minirl_no_is, baseline: minirl}, claim: dropping IS collapses}
  F3: {rule: learns_worse, roles: {baseline: minirl, variant: lennorm}, claim: length normalisation learns worse}
"""


def make_study(root: Path) -> Path:
    d = root / "out" / "demo"
    d.mkdir(parents=True)
    (d / "study.yaml").write_text(STUDY)
    (d / "commands.log").write_text("2026-12-02T00:00:00+00:00\tstablerl study demo.yaml --out out\n")
    for s in range(3):
        write_run(d / "minirl" / f"seed{s}", RISE, {0: 0.3, 30: 0.8, 60: 0.9 + 0.01 * s}, seed=s)
        write_run(d / "minirl_no_is" / f"seed{s}", COLLAPSE if s < 2 else RISE, {0: 0.3, 60: 0.2}, seed=s)
    for s in range(2):  # one seed short: F3 is inconclusive
        write_run(d / "lennorm" / f"seed{s}", RISE, {0: 0.3, 60: 0.6}, seed=s)
    cold = d / "cold" / "mix"
    cold.mkdir(parents=True)
    (cold / "config.yaml").write_text("seed: 0\n")
    (cold / "metrics.jsonl").write_text('{"step": 0, "sft/loss": 1.0}\n')
    (cold / "sft.json").write_text(json.dumps({"style": "long:0.5,answer:0.5", "heldout_accuracy": 0.33}))
    return d


def test_report_markdown_tables_verdicts_and_pngs(tmp_path):
    d = make_study(tmp_path)
    path = write_report([d], tmp_path / "rep")
    md = path.read_text()
    assert md.startswith("# demo: report") and "made by `stablerl study demo.yaml --out out`" in md
    # 2/3 against 0/3 collapsed: the rates the rule asks for, but Fisher p = 0.4 (3 seeds cannot be significant)
    assert "| F2 | dropping IS collapses | **inconclusive** | I · I · I · I |" in md
    assert "| F3 | length normalisation learns worse | **inconclusive** | I · I · I · I |" in md
    assert ("**Verdict: inconclusive.** the rates differ as the rule asks but not significantly (p > 0.05); "
            "minirl_no_is collapsed 2/3") in md and "Rule `collapses_without`:" in md
    assert "fewer than 3 finished seeds: lennorm (2)" in md
    # final 90, 91, 92 %: mean 91, sd 1, t(0.975, 2) = 4.303: 91 +- 4.303 / sqrt(3) = 91 +- 2.48
    assert "minirl collapsed 0/3, final acc 91.0% ± 1.0% (95% CI 88.5 to 93.5%)" in md
    assert "| minirl | 3 | 0/3 | 91.0 ± 1.0 |" in md  # final accuracy 90, 91, 92 %: mean ± sample std
    assert "| lennorm | 2 (+1 missing) | 0/2 |" in md
    assert "| mix | long:0.5,answer:0.5 | 33.0% |" in md and "**collapsed**: smoothed reward" in md
    # two runs collapsed: the early-warning section ranks the signals (tests/test_leadtime.py pins the numbers)
    assert "## Early warning" in md and "8 runs, 2 collapsed; thresholds chosen on 4 runs (1 collapsed)" in md
    # judged fairly (leave-one-cell-out): both collapses are in one cell, so no threshold can be scored on a collapse
    assert "8 runs in 3 cells, 2 collapsed" in md and "No signal can be judged from these runs." in md
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["F2.png", "F3.png"] and "![F2](F2.png)" in md and "![F3](F3.png)" in md
    assert all((tmp_path / "rep" / p).read_bytes().startswith(PNG) for p in pngs)
    assert not list((tmp_path / "rep").glob("*.tmp*"))
    saved = json.loads((tmp_path / "rep" / "summaries.json").read_text())
    assert saved["verdicts"]["F2"]["outcome"] == "inconclusive" and len(saved["runs"]) == 8
    assert saved["verdicts"]["F2"]["fragile"] is False
    # a study run in slices names every invocation, oldest first, a repeated one (a resume) once
    with (d / "commands.log").open("a") as fh:
        fh.write("2026-12-03T00:00:00+00:00\tstablerl study demo.yaml --out out --cells lennorm\n"
                 "2026-12-03T01:00:00+00:00\tstablerl study demo.yaml --out out --cells lennorm\n")
    write_run(d / "lennorm" / "seed2", RISE[:20], steps=60)  # still running: left out of the statistics and alarms
    md = write_report([d], tmp_path / "rep").read_text()
    assert ("made by `stablerl study demo.yaml --out out`, then `stablerl study demo.yaml --out out --cells "
            "lennorm`.") in md
    assert "| lennorm | 2 (+1 missing) | 0/2 |" in md and "8 runs, 2 collapsed;" in md


MID = RISE[:30] + [0.3] * 30  # down to 0.3 for good: below 0.5 x best (0.8), above 0.3 x best


def test_rule_sensitivity_marks_a_verdict_that_flips_fragile(tmp_path):
    # 9 seeds a side: every no-IS run drops to 0.3, a collapse at frac 0.5 (bar 0.4) and none at frac 0.3 (bar
    # 0.24); so F2 is supported (9/9 vs 0/9, p = 2 / C(18, 9)) at frac 0.5 and not supported at 0.3, either window
    d = tmp_path / "out" / "demo"
    d.mkdir(parents=True)
    (d / "study.yaml").write_text(STUDY.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8]"))
    for s in range(9):
        write_run(d / "minirl" / f"seed{s}", RISE, {0: 0.3, 60: 0.9}, seed=s)
        write_run(d / "minirl_no_is" / f"seed{s}", MID, {0: 0.3, 60: 0.5}, seed=s)
    md = write_report([d], tmp_path / "rep").read_text()
    assert "| F2 | dropping IS collapses | **supported** | S · N · S · N **fragile** |" in md
    assert "**Verdict: supported (fragile).** minirl_no_is collapsed 9/9" in md and "Fisher p = 4.11e-05" in md
    saved = json.loads((tmp_path / "rep" / "summaries.json").read_text())["verdicts"]["F2"]
    assert saved["fragile"] is True and saved["sensitivity"] == {
        "patience=10,frac=0.5": "supported", "patience=10,frac=0.3": "not supported",
        "patience=20,frac=0.5": "supported", "patience=20,frac=0.3": "not supported"}


def test_rejudging_from_read_rows_equals_judging_from_the_files(tmp_path):
    # the sensitivity table re-detects collapses from the rows already read: the same verdicts and collapses as a
    # full recomputation of every summary under that rule
    d = make_study(tmp_path)
    study, runs, _ = find_runs([d])
    base = judge(study, runs, CollapseRule(), Thresholds())
    metrics = {f.run_dir: read_metrics(f.run_dir / "metrics.jsonl") for f in runs}
    for rule in (CollapseRule(patience=20), CollapseRule(frac=0.3), CollapseRule(min_best=0.9)):
        fast, full = rejudge(study, runs, base, metrics, rule, Thresholds()), judge(study, runs, rule, Thresholds())
        assert [s["collapse"] for s in fast.summaries] == [s["collapse"] for s in full.summaries]
        assert fast.verdicts == full.verdicts
    # the last rule above does change the collapses, so the comparison is not vacuous
    strict = judge(study, runs, CollapseRule(min_best=0.9), Thresholds())  # best reward 0.8: nothing can collapse
    assert [s["collapse"]["collapsed"] for s in strict.summaries] != [s["collapse"]["collapsed"]
                                                                     for s in base.summaries]


DOSE = """\
name: dose
seeds: [0, 1]
sweeps:
  dose:
    axes:
      level: {low: [], high: [engine.weight_bits=4]}
      estimator: {no_is: [algo.loss=minirl_no_is], truncate: [algo.is_rule=truncate]}
"""


def test_dose_response_against_the_measured_k3(tmp_path):
    d = tmp_path / "out" / "dose"
    d.mkdir(parents=True)
    (d / "study.yaml").write_text(DOSE)
    for s in range(2):
        for cell, k3, curve, acc in (("low_no_is", 1e-3, RISE, 0.9), ("low_truncate", 1e-3, RISE, 0.92),
                                     ("high_no_is", 3e-2, COLLAPSE if s == 0 else RISE, 0.2 if s == 0 else 0.8),
                                     ("high_truncate", 1e-3, RISE, 0.9)):
            write_run(d / f"dose_{cell}" / f"seed{s}", curve, {0: 0.3, 60: acc}, seed=s, extra={"kl/k3": k3})
    md = write_report([d], tmp_path / "rep").read_text()
    assert "## Dose-response: dose" in md and "![dose-response dose](dose_dose.png)" in md
    assert "| low | 1.0e-03 · 0/2 · 90.0 (90.0 to 90.0) | 1.0e-03 · 0/2 · 92.0 (92.0 to 92.0) |" in md
    # (0.2, 0.8): mean 0.5, sd 0.4243, t(0.975, 1) = 12.706: 0.5 +- 12.706 * 0.4243 / sqrt(2) = 0.5 +- 3.812
    # high_truncate measured the same k3 as low_truncate: a tie on the x axis is drawn in level order
    assert "| high | 0.030 · 1/2 · 50.0 (-331.2 to 431.2) | 1.0e-03 · 0/2 · 90.0 (90.0 to 90.0) |" in md
    assert (tmp_path / "rep" / "dose_dose.png").read_bytes().startswith(PNG)
    assert "## Cells" not in md  # the sweep's cells are drawn by the dose-response, not again as plain cells
    # a sweep without runs yet: one line that says how to run it, no empty plot
    for cell in ("low_no_is", "low_truncate", "high_no_is", "high_truncate"):
        shutil.rmtree(d / f"dose_{cell}")
    (tmp_path / "rep" / "dose_dose.png").unlink()
    write_run(d / "other" / "seed0", RISE, {0: 0.3, 60: 0.9})
    md = write_report([d], tmp_path / "rep").read_text()
    assert "No finished runs of the 4 cells yet (`stablerl reproduce --full --cells 'dose_*'`)." in md
    assert not (tmp_path / "rep" / "dose_dose.png").exists()


def test_report_cli_on_plain_run_directories(tmp_path, capsys):
    for cell_name, curve in (("a", RISE), ("b", COLLAPSE)):
        for s in range(2):
            write_run(tmp_path / "runs" / cell_name / f"seed{s}", curve, {0: 0.3, 60: 0.5}, seed=s)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Cells" in md and "| a | 2 | 0/2 |" in md and "| b | 2 | 2/2 |" in md and "## Verdicts" not in md
    assert (tmp_path / "rep" / "cells.png").read_bytes().startswith(PNG)
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_report_never_imports_the_trainer(tmp_path):
    d = make_study(tmp_path)
    code = ("import sys; from pathlib import Path; from stablerl.study.report import write_report; "
            f"write_report([Path({str(d)!r})], Path({str(tmp_path / 'rep')!r})); "
            "bad = [m for m in ('stablerl.trainer', 'stablerl.engine', 'stablerl.model') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


PHASE = """\
name: phase
seeds: [0, 1, 2]
cells: {}
sweeps:
  grid:
    axes:
      numerics: {bf16: [engine.numerics=bf16], fp8: [engine.numerics=fp8]}
      N: {N1: [], N4: [train.n_minibatches=4]}
      replay: {none: [], R3: [algo.replay=R3]}
"""


def test_phase_diagram_heat_maps_with_measured_axes(tmp_path):
    # fp8 x N4 without replay collapses in 2 of 3 seeds; everything else is stable. k3 of the fp8 row is 10x bf16's.
    d = tmp_path / "out" / "phase"
    d.mkdir(parents=True)
    (d / "study.yaml").write_text(PHASE)
    for num in ("bf16", "fp8"):
        for n in ("N1", "N4"):
            for rep in ("none", "R3"):
                for s in range(3):
                    bad = (num, n, rep) == ("fp8", "N4", "none") and s < 2
                    run = d / f"grid_{num}_{n}_{rep}" / f"seed{s}"
                    write_run(run, COLLAPSE if bad else RISE, {0: 0.3, 60: 0.2 if bad else 0.9}, seed=s)
                    k3 = 1e-3 if num == "fp8" else 1e-4
                    st = 1.5 if n == "N4" else 1.0
                    rows_ = [{**r, "kl/k3": k3, "is/staleness_max": st} if "reward/mean" in r else r
                             for r in rows(COLLAPSE if bad else RISE, {0: 0.3, 60: 0.2 if bad else 0.9})]
                    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    md = write_report([d], tmp_path / "rep").read_text()
    assert "## Phase diagram: grid" in md and "![phase diagram grid](phase_grid.png)" in md
    # measured axes: max(|log 1.5|, |log 0.9|) = 0.405 at N4, |log 0.9| = 0.105 at N1
    assert "| replay=none: collapsed k/n (final acc %) | N1 (\\|log r\\| 0.105) | N4 (\\|log r\\| 0.405) |" in md
    assert "| fp8 (k3 1.0e-03) | 0/3 (90.0) | 2/3 (43.3) |" in md
    assert "| bf16 (k3 1.0e-04) | 0/3 (90.0) | 0/3 (90.0) |" in md
    assert "| replay=R3: collapsed k/n (final acc %) | N1" in md
    assert (tmp_path / "rep" / "phase_grid.png").read_bytes().startswith(PNG)
    assert "## Other cells" not in md  # the sweep's cells are drawn as the phase diagram, not as curves


def test_replay_bias_section_per_minibatch(tmp_path):
    # Two N = 2 cells probed at every mini-batch: R2's cosine falls from 0.99 at j = 0 to 0.9 / 0.8 (seeds 0 / 1) at
    # j = 1; R3's stays at 0.95. An on-policy cell (N = 1) has no replay bias to show and is left out.
    d = tmp_path / "runs"
    for name, n, replay, by_seed in (("n2_R2", 2, "R2", [(0.99, 0.9), (0.99, 0.8)]),
                                     ("n2_R3", 2, "R3", [(0.95, 0.95), (0.95, 0.95)]),
                                     ("onpol", 1, "none", [(1.0, 1.0), (1.0, 1.0)])):
        for s, (c0, c1) in enumerate(by_seed):
            run = d / name / f"seed{s}"
            write_run(run, RISE, {0: 0.3, 60: 0.8}, seed=s)
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["train"]["n_minibatches"], cfg["algo"]["replay"] = n, replay
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            probe = {"fidelity/replay_cosine/mb0": c0, "fidelity/replay_cosine/mb1": c1, "fidelity/replay_cosine": c1}
            if replay == "R2":  # R2's bias alone: none at j = 0 (θ = θ_old there), some at j = 1
                probe |= {"fidelity/routing_bias_cosine/mb0": 1.0, "fidelity/routing_bias_cosine/mb1": 0.96,
                          "fidelity/routing_bias_cosine": 0.96}
            rows_ = [{**r, **probe} if "fidelity/cosine" in r else r for r in rows(RISE, {0: 0.3, 60: 0.8})]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    assert summarize_run(d / "n2_R2" / "seed1")["replay_cosine_mb1_mean"] == pytest.approx(0.8)
    md = write_report([d], tmp_path / "rep").read_text()
    assert "## Routing Replay bias (E9 per mini-batch)" in md
    md = md.split("## Routing Replay bias")[1].split("\n## ")[0]  # the section alone
    assert "| onpol |" not in md and "![Routing Replay bias](replay_bias.png)" in md
    assert "| n2_R2 | 2 | R2 | 2 | 0.85 ± 0.071 | 0.990 / 0.850 | 0.96 ± 0 | 1.000 / 0.960 | 80.0 ± 0.0 | 0/2 |" in md
    assert "| n2_R3 | 2 | R3 | 2 | 0.95 ± 0 | 0.950 / 0.950 | - | - | 80.0 ± 0.0 | 0/2 |" in md
    assert (tmp_path / "rep" / "replay_bias.png").read_bytes().startswith(PNG)


def test_copy_runs_keeps_finished_runs_and_cold_starts_to_remake_the_report(tmp_path):
    d = make_study(tmp_path)
    (d / "cold" / "mix" / "model").mkdir()
    (d / "cold" / "mix" / "model" / "config.json").write_text("{}")
    write_run(d / "lennorm" / "seed2", RISE[:20], steps=60, seed=2)  # interrupted: left out
    (d / "minirl" / "seed0" / "checkpoints" / "step_000060").mkdir(parents=True)
    (d / "minirl" / "seed0" / "checkpoints" / "step_000060" / "model.safetensors").write_bytes(b"x")
    rep = tmp_path / "rep"
    assert main(["report", str(d), "--out", str(rep), "--copy-runs"]) == 0
    kept = rep / "kept" / "demo"
    assert (kept / "study.yaml").read_text() == STUDY and (kept / "commands.log").exists()
    assert sorted(p.parent.relative_to(kept).as_posix() for p in kept.rglob("metrics.jsonl")) == [
        "cold/mix", "lennorm/seed0", "lennorm/seed1", *(f"minirl/seed{s}" for s in range(3)),
        *(f"minirl_no_is/seed{s}" for s in range(3))]
    assert (kept / "cold" / "mix" / "model" / "config.json").exists() and not list(kept.rglob("checkpoints"))
    # the copy alone makes the same report (the interrupted run aside: 1 missing either way)
    assert main(["report", str(kept), "--out", str(tmp_path / "again")]) == 0
    verdicts = [ln for ln in (tmp_path / "again" / "report.md").read_text().splitlines() if ln.startswith("| F")]
    assert verdicts == [ln for ln in (rep / "report.md").read_text().splitlines() if ln.startswith("| F")]
    # copying a copy onto itself, or into the runs it copies, is refused before anything is written
    with pytest.raises(UserError, match="overlaps the run directory"):
        plan_copy([kept], rep / "kept")
    with pytest.raises(UserError, match="overlaps the run directory"):
        plan_copy([d], d / "rep" / "kept")
    assert main(["report", str(kept), "--out", str(tmp_path / "rep" / "kept" / "demo" / "r"), "--copy-runs"]) == 2
    assert not (kept / "r").exists()
