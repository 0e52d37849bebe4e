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
from dataclasses import dataclass

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
