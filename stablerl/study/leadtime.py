"""Which logged signal warns of collapse, how early, and how often it cries wolf (issue 17), from run files alone.

For every signal (k3, entropy, max IS weight, clip fraction, routing agreement engine-vs-trainer and cross-step,
first-order fidelity: stablerl.metrics.SIGNALS) a threshold rule is chosen on one half of the runs and judged on the
other:
- the runs are split by name, collapsed and stable ones alternately, so each half holds both kinds;
- on the choosing half, every observed value is a candidate threshold, in both directions; the rule kept maximises
  (share of collapsed runs it fires on at or before their collapse step) - (share of stable runs it fires on at
  all), Youden's J; ties go to the longer median lead;
- on the held-out half it is scored as it stands: detections k/n, lead time (collapse step - first alarm, in steps)
  and false alarms k/n. The table is ranked by the held-out J, then by lead.
An alarm is a crossing: the signal beyond the threshold after an earlier value on the safe side (first_alarm).

A run's collapse step is the collapse rule's (stablerl.study.summary.detect_collapse), so it lags the first bad step
by up to the rule's smoothing window: a lead of 0-2 steps is no warning in practice. No torch; plain metrics rows in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stablerl.metrics import SIGNALS
from stablerl.util import finite
from stablerl.warning import Rule, Watch


@dataclass(frozen=True)
class Curve:
    """One run: its name, its collapse step (None: stable) and its rows."""

    name: str
    collapse_step: int | None
    rows: list[dict]

    def series(self, signal: str) -> list[tuple[int, float]]:
        """(step, value) of a signal, only up to the collapse step: an alarm after collapse is no warning."""
        end = math.inf if self.collapse_step is None else self.collapse_step
        return [(r["step"], v) for r in self.rows if (v := finite(r.get(signal))) is not None and r["step"] <= end]


def first_alarm(curve: Curve, rule: Rule) -> int | None:
    """The step train.warn_on's Watch would first fire on the run's RL steps up to its collapse: where the signal
    crosses from the safe side to beyond the threshold. A value beyond at the run's first RL step marks the
    configuration, not a change, and is no alarm: otherwise e.g. `clip/frac<1e-4` would "lead" every on-policy
    collapse by its whole length (clip fraction is 0 there by construction), and rank first by telling cells apart.
    A signal first logged later (fidelity every k steps) alarms on its first value beyond."""
    watch = Watch((rule,))
    end = math.inf if curve.collapse_step is None else curve.collapse_step
    return next((r["step"] for r in curve.rows if 1 <= r["step"] <= end and watch.check(r)), None)


@dataclass(frozen=True)
class Score:
    detected: int  # collapsed runs the rule fired on, at or before their collapse step
    collapsed: int
    false_alarms: int  # stable runs it fired on
    stable: int
    leads: tuple[int, ...]  # collapse step - first alarm, per detected run

    @property
    def j(self) -> float:
        """Youden's J: detection rate - false-alarm rate (0 = no better than chance, 1 = perfect)."""
        return self.detected / max(1, self.collapsed) - self.false_alarms / max(1, self.stable)

    @property
    def lead(self) -> float | None:
        return statistics.median(self.leads) if self.leads else None


def score(rule: Rule, runs: list[Curve]) -> Score:
    det, fa, leads = 0, 0, []
    for c in runs:
        s = first_alarm(c, rule)
        if c.collapse_step is None:
            fa += s is not None
        elif s is not None:
            det += 1
            leads.append(c.collapse_step - s)
    return Score(det, sum(c.collapse_step is not None for c in runs), fa,
                 sum(c.collapse_step is None for c in runs), tuple(leads))


def choose(signal: str, runs: list[Curve], max_candidates: int = 400) -> tuple[Rule, Score] | None:
    """The threshold rule on `signal` with the best J on `runs` (ties: longer median lead, then the first found);
    None when no collapsed run logged the signal."""
    if not any(c.collapse_step is not None and c.series(signal) for c in runs):
        return None
    values = sorted({v for c in runs for _, v in c.series(signal)})
    if len(values) > max_candidates:  # quantiles of the observed values: enough resolution, bounded work
        values = [values[round(i * (len(values) - 1) / (max_candidates - 1))] for i in range(max_candidates)]
    best = None
    for v in values:
        for op in (">", "<"):
            # '>' fires strictly above v: the candidate v itself is the last value that does not fire
            rule = Rule(signal, op, v)
            sc = score(rule, runs)
            key = (sc.j, sc.lead if sc.lead is not None else -math.inf)
            if best is None or key > best[0]:
                best = (key, rule, sc)
    return best[1], best[2]


def split(runs: list[Curve]) -> tuple[list[Curve], list[Curve]]:
    """(choosing half, held-out half): by name, collapsed and stable runs alternately into the two halves."""
    a, b = [], []
    for kind in (True, False):
        group = sorted((c for c in runs if (c.collapse_step is not None) == kind), key=lambda c: c.name)
        a += group[0::2]
        b += group[1::2]
    return a, b


@dataclass(frozen=True)
class Row:
    signal: str
    rule: Rule
    fit: Score  # on the choosing half
    held: Score  # on the held-out half


def rank_signals(runs: list[Curve], signals: list[str] | None = None) -> list[Row]:
    """One row per signal that collapsed runs of the choosing half logged, ranked by held-out J, then lead."""
    fit_runs, held_runs = split(runs)
    rows = []
    for sig in signals or list(SIGNALS):
        got = choose(sig, fit_runs)
        if got is not None:
            rows.append(Row(sig, got[0], got[1], score(got[0], held_runs)))
    return sorted(rows, key=lambda r: (-r.held.j, -(r.held.lead if r.held.lead is not None else -1), r.signal))


def markdown(rows: list[Row], runs: list[Curve]) -> str:
    fit_runs, held_runs = split(runs)
    n_col = sum(c.collapse_step is not None for c in runs)
    head = (f"{len(runs)} runs, {n_col} collapsed; thresholds chosen on {len(fit_runs)} runs "
            f"({sum(c.collapse_step is not None for c in fit_runs)} collapsed), scored on the other {len(held_runs)} "
            f"({sum(c.collapse_step is not None for c in held_runs)} collapsed).\n\n")
    if n_col < 2:
        return head + ("Fewer than 2 collapsed runs: nothing to choose a threshold on and score it against. No "
                       "signal can be ranked from these runs.\n")
    lines = ["| rank | signal | rule (chosen on half 1) | J half 1 | detected (held-out) | median lead, steps "
             "(range) | false alarms (held-out) | J held-out |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        h = r.held
        lead = "–" if h.lead is None else f"{h.lead:g} ({min(h.leads)}..{max(h.leads)})"
        lines.append(f"| {i} | {SIGNALS.get(r.signal, r.signal)} | `{r.rule}` | {r.fit.j:+.2f} | "
                     f"{h.detected}/{h.collapsed} | {lead} | {h.false_alarms}/{h.stable} | {h.j:+.2f} |")
    return head + "\n".join(lines) + "\n"


# ---- judged fairly (issue 27): thresholds chosen with whole cells held out, two baselines, within-cell --------------
# A run's seeds share its configuration, so a threshold chosen on one seed and scored on a sibling measures how well
# the signal names the *cell*. Here every cell is scored by a rule chosen on the other cells only (leave-one-cell-out),
# and two baselines are judged the same way: the rollout reward itself, and a rule that reads only the config.

REWARD_KEY = "reward/mean"


@dataclass(frozen=True)
class CellCurve:
    """A run with its cell (the study cell its seeds share) and its config summary (key -> value)."""

    curve: Curve
    cell: str
    config: tuple[tuple[str, object], ...] = ()


def reward_drop_alarm(curve: Curve, window: int = 5, frac: float = 0.7, key: str = REWARD_KEY) -> int | None:
    """The reward baseline: the first RL step at which the `window`-step mean rollout reward is below `frac` x its
    best value so far (fixed in advance, nothing fitted). Only steps up to the collapse count, as for the signals."""
    end = math.inf if curve.collapse_step is None else curve.collapse_step
    steps = [(r["step"], v) for r in curve.rows if (v := finite(r.get(key))) is not None and 1 <= r["step"] <= end]
    best = -math.inf
    for i in range(window - 1, len(steps)):
        m = statistics.fmean(v for _, v in steps[i - window + 1: i + 1])
        if m < frac * best:
            return steps[i][0]
        best = max(best, m)
    return None


@dataclass(frozen=True)
class ConfigRule:
    """A config-only predictor: fires at step 1 on every run whose config satisfies all its conditions."""

    conds: tuple[tuple[str, str, object], ...]  # (key, "==" | "<=" | ">=", value)

    def holds(self, config: dict) -> bool:
        for k, op, v in self.conds:
            x = config.get(k)
            if x is None or (op == "==" and x != v) or (op == ">=" and not (_num(x) and x >= v)) or (
                    op == "<=" and not (_num(x) and x <= v)):
                return False
        return True

    def __str__(self) -> str:
        return " and ".join(f"{k}{op}{v:g}" if _num(v) else f"{k}={v}" for k, op, v in self.conds) or "never"


def _num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _config_candidates(runs: list[CellCurve]) -> list[ConfigRule]:
    """Single conditions on each config key (== for every value; <= and >= for numbers) and pairs of them."""
    single = set()
    for r in runs:
        for k, v in r.config:  # the seed is not configuration: a rule on it would name runs, not settings
            if k == "seed":
                continue
            if isinstance(v, str | bool) or _num(v):
                single.add((k, "==", v))
                if _num(v):
                    single |= {(k, ">=", v), (k, "<=", v)}
    single = sorted(single, key=str)
    pairs = [(a, b) for i, a in enumerate(single) for b in single[i + 1:] if a[0] != b[0]]
    return [ConfigRule((c,)) for c in single] + [ConfigRule(p) for p in pairs]


Alarm = Callable[[CellCurve], "int | None"]


def score_alarm(alarm: Alarm, runs: list[CellCurve]) -> Score:
    det, fa, leads = 0, 0, []
    for r in runs:
        s = alarm(r)
        if r.curve.collapse_step is None:
            fa += s is not None
        elif s is not None:
            det += 1
            leads.append(r.curve.collapse_step - s)
    return Score(det, sum(r.curve.collapse_step is not None for r in runs), fa,
                 sum(r.curve.collapse_step is None for r in runs), tuple(leads))


def signal_alarm(rule: Rule) -> Alarm:
    return lambda r: first_alarm(r.curve, rule)


def config_alarm(rule: ConfigRule) -> Alarm:
    return lambda r: 1 if rule.holds(dict(r.config)) else None


def reward_alarm(r: CellCurve) -> int | None:
    return reward_drop_alarm(r.curve)


def _rate(k: int, n: int) -> float:
    return k / n if n else 0.0


def best_config_rule(runs: list[CellCurve]) -> tuple[ConfigRule, Alarm] | None:
    """The config-only rule with the best Youden J on `runs` (ties: the first in candidate order)."""
    best = None
    for rule in _config_candidates(runs):
        sc = score_alarm(config_alarm(rule), runs)
        if best is None or sc.j > best[0]:
            best = (sc.j, rule)
    return None if best is None else (best[1], config_alarm(best[1]))


@dataclass(frozen=True)
class AlarmTable:
    """Every threshold rule on one signal at once: `steps[k, i]` is the first alarm of `rules[k]` on run i (-1:
    none), computed like first_alarm (a crossing from the safe side; a value beyond at the run's first RL step is
    no alarm); `cells[k]`: the cells whose logged values include the threshold (a fold may only pick thresholds
    seen in its own cells)."""

    rules: list[Rule]
    steps: np.ndarray  # (R, runs) int
    cells: list[frozenset[str]]


def alarm_table(signal: str, runs: list[CellCurve]) -> AlarmTable:
    where: dict[float, set[str]] = {}
    series = []
    for r in runs:
        ser = r.curve.series(signal)
        first_row = next((row["step"] for row in r.curve.rows if row["step"] >= 1), None)
        ser = [(st, v) for st, v in ser if st >= 1]
        series.append((ser, bool(ser) and ser[0][0] != first_row))
        for _, v in ser:
            where.setdefault(v, set()).add(r.cell)
    thr = np.array(sorted(where))  # (M,)
    rules, cells = [], []
    for op in (">", "<"):
        rules += [Rule(signal, op, float(t)) for t in thr]
        cells += [frozenset(where[float(t)]) for t in thr]
    steps = np.full((2 * len(thr), len(runs)), -1, dtype=np.int64)
    for i, (ser, first_may_fire) in enumerate(series):
        if not ser:
            continue
        st = np.array([x for x, _ in ser])
        v = np.array([y for _, y in ser])  # (n,)
        for o, beyond in enumerate((v[None, :] > thr[:, None], v[None, :] < thr[:, None])):  # (M, n)
            prev = np.concatenate([np.full((len(thr), 1), not first_may_fire), beyond[:, :-1]], 1)
            fire = beyond & ~prev  # a crossing, or a first value beyond when the signal starts late
            hit = fire.any(1)
            steps[o * len(thr): (o + 1) * len(thr), i] = np.where(hit, st[fire.argmax(1)], -1)
    return AlarmTable(rules, steps, cells)


def _choose_from_table(tab: AlarmTable, runs: list[CellCurve], fit: np.ndarray, max_fa: float):
    """The rule with the most detections on the `fit` runs at a false-alarm rate <= max_fa, among thresholds seen in
    fit cells (ties: longer median lead, then the lower index); None if none qualifies."""
    col = np.array([r.curve.collapse_step if r.curve.collapse_step is not None else -1 for r in runs])
    fit_cells = {r.cell for r, f in zip(runs, fit) if f}
    ok_thr = np.array([bool(c & fit_cells) for c in tab.cells])
    fired = tab.steps >= 0  # (R, runs)
    is_col, is_stable = (col >= 0) & fit, (col < 0) & fit
    det = (fired & is_col).sum(1)
    fa = (fired & is_stable).sum(1)
    fa_rate = fa / max(1, is_stable.sum())
    best = None
    for k in np.flatnonzero(ok_thr & (fa_rate <= max_fa + 1e-12)):
        leads = (col - tab.steps[k])[fired[k] & is_col]
        key = (int(det[k]), float(np.median(leads)) if len(leads) else -math.inf)
        if best is None or key > best[0]:
            best = (key, k)
    if best is None:
        return None
    k = best[1]
    idx = {id(r): i for i, r in enumerate(runs)}
    return tab.rules[k], (lambda r, k=k: (None if (s := int(tab.steps[k, idx[id(r)]])) < 0 else s))


@dataclass(frozen=True)
class FairRow:
    name: str  # a signal, or "reward baseline" / "config baseline"
    held: Score  # leave-one-cell-out: every cell scored by the rule chosen on the other cells
    within: Score  # the same alarms, on the cells whose seeds both collapsed and did not
    rules: tuple[str, ...]  # the distinct rules chosen across folds
    warning: bool | None  # beats the reward baseline at equal false alarms (None: a baseline)


def mixed_cells(runs: list[CellCurve]) -> set[str]:
    """Cells with at least one collapsed and one stable seed: where within-cell discrimination can be measured."""
    kinds: dict[str, set[bool]] = {}
    for r in runs:
        kinds.setdefault(r.cell, set()).add(r.curve.collapse_step is not None)
    return {c for c, k in kinds.items() if len(k) == 2}


def leave_cell_out(runs: list[CellCurve], choose_fn) -> tuple[Score, Score, tuple[str, ...]]:
    """(held-out score over all cells, its part on mixed cells, rules chosen): each cell's runs are scored by the
    alarm `choose_fn(other cells' runs)` returns (None: it never fires)."""
    cells = sorted({r.cell for r in runs})
    mixed = mixed_cells(runs)
    held: list[tuple[CellCurve, int | None]] = []
    rules = []
    for c in cells:
        fit = [r for r in runs if r.cell != c]
        got = choose_fn(fit)
        rules.append("never" if got is None else str(got[0]))
        held += [(r, None if got is None else got[1](r)) for r in runs if r.cell == c]
    return (_score_pairs(held), _score_pairs([(r, s) for r, s in held if r.cell in mixed]),
            tuple(dict.fromkeys(rules)))


def _score_pairs(pairs: list[tuple[CellCurve, int | None]]) -> Score:
    fixed = {id(r): s for r, s in pairs}
    return score_alarm(lambda r: fixed[id(r)], [r for r, _ in pairs])


def judge_fairly(runs: list[CellCurve], signals: list[str] | None = None) -> list[FairRow]:
    """The reward baseline, the config baseline and every signal, judged leave-one-cell-out. A signal's threshold
    is chosen, on the other cells, for the most detections at no more false alarms than the reward baseline has on
    those same cells (equal false alarms); it is called a warning only if on the held-out cells it then raises no more
    false alarms than the reward baseline and detects more collapses, or as many with a longer median lead."""
    base_held, base_within, _ = leave_cell_out(runs, lambda fit: ("5-step mean reward < 0.7 x best", reward_alarm))
    out = [FairRow("reward baseline", base_held, base_within, ("5-step mean reward < 0.7 x best",), None)]
    cfg_held, cfg_within, cfg_rules = leave_cell_out(
        runs, best_config_rule)
    out.append(FairRow("config baseline", cfg_held, cfg_within, cfg_rules, None))
    for sig in signals or list(SIGNALS):
        if not any(r.curve.series(sig) for r in runs):
            continue

        tab = alarm_table(sig, runs)

        def choose_sig(fit, tab=tab):
            base = score_alarm(reward_alarm, fit)
            mine = {id(r) for r in fit}
            return _choose_from_table(tab, runs, np.array([id(r) in mine for r in runs]),
                                      _rate(base.false_alarms, base.stable))

        held, within, rules = leave_cell_out(runs, choose_sig)
        lead, base_lead = (-math.inf if x is None else x for x in (held.lead, base_held.lead))
        beats = held.false_alarms <= base_held.false_alarms and (
            held.detected > base_held.detected or (held.detected == base_held.detected and lead > base_lead))
        out.append(FairRow(sig, held, within, rules, beats))
    return out


def fair_markdown(rows: list[FairRow], runs: list[CellCurve]) -> str:
    cells, mixed = {r.cell for r in runs}, mixed_cells(runs)
    n_col = sum(r.curve.collapse_step is not None for r in runs)
    head = (f"{len(runs)} runs in {len(cells)} cells, {n_col} collapsed; every cell scored by the rule chosen on the "
            f"other cells (leave-one-cell-out); within-cell: the {len(mixed)} cells whose seeds both collapsed and did "
            "not. A signal's threshold is chosen at no more false alarms than the reward baseline on the same cells; "
            "it is a warning only if, held out, it raises no more false alarms and detects more collapses (or as many, "
            "earlier). Lead: "
            "collapse step - first alarm (the config baseline fires at step 1).\n\n")
    if n_col < 2 or len({r.cell for r in runs if r.curve.collapse_step is not None}) < 2:
        return head + ("Fewer than 2 collapsed runs, or collapses in one cell only: no threshold can be chosen on "
                       "other cells and scored on a collapse. No signal can be judged from these runs.\n")
    lines = ["| signal | detected | false alarms | J | median lead (range) | within-cell detected | within-cell "
             "false alarms | within-cell J | warning? | rules chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, w = r.held, r.within
        lead = "–" if h.lead is None else f"{h.lead:g} ({min(h.leads)}..{max(h.leads)})"
        verdict = "baseline" if r.warning is None else "yes" if r.warning else "no"
        shown = ", ".join(f"`{x}`" for x in r.rules[:3]) + (f" (+{len(r.rules) - 3} more)" if len(r.rules) > 3 else "")
        lines.append(f"| {SIGNALS.get(r.name, r.name)} | {h.detected}/{h.collapsed} | {h.false_alarms}/{h.stable} | "
                     f"{h.j:+.2f} | {lead} | {w.detected}/{w.collapsed} | {w.false_alarms}/{w.stable} | {w.j:+.2f} | "
                     f"{verdict} | {shown} |")
    return head + "\n".join(lines) + "\n"
