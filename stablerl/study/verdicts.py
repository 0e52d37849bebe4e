"""The verdict rules: statistics per cell over seeds, and the rules that turn them into supported / not supported /
inconclusive for the paper's findings F1-F5 (DESIGN §1), with which cells play each rule's roles in a study
(`finding_roles`). Every rule is a small pure function with its statement in its docstring; the report prints that
statement next to each verdict. Reads run summaries only (no trainer).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stablerl.config import ConfigError
from stablerl.stats import Interval, fisher_exact, mean_ci, welch_ci
from stablerl.study.summary import FINISHED

if TYPE_CHECKING:  # types only: the study definition imports this module to check its findings' roles
    from stablerl.study.definition import Finding, Study


# ---- cells: statistics over seeds ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStats:
    """The runs of one cell that finished (done or aborted by the NaN guard: both are results); `missing` counts
    its other runs (not run, running, failed)."""

    name: str
    runs: tuple[dict, ...] = ()
    missing: int = 0

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def collapsed(self) -> int:
        return sum(bool(r["collapse"]["collapsed"]) for r in self.runs)

    @property
    def rate(self) -> float:
        return self.collapsed / self.n if self.n else math.nan

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs if isinstance(r.get(key), int | float)]

    def mean(self, key: str) -> float:
        v = self.values(key)
        return statistics.fmean(v) if v else math.nan

    def std(self, key: str) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        v = self.values(key)
        return statistics.stdev(v) if len(v) > 1 else 0.0 if v else math.nan

    def acc_ci(self) -> Interval | None:
        """Mean final held-out accuracy over seeds with its t 95% interval; None with fewer than 2 seeds."""
        acc = self.values("final_accuracy")
        return mean_ci(acc) if len(acc) > 1 else None

    def short(self) -> str:
        ci = self.acc_ci()
        return (f"{self.name} collapsed {self.collapsed}/{self.n}, final acc {pct(self.mean('final_accuracy'))} "
                f"± {pct(self.std('final_accuracy'))}"
                + (f" (95% CI {pct(ci.low, '')} to {pct(ci.high)})" if ci else ""))


def cell_stats(name: str, summaries: list[dict], expected: int = 0) -> CellStats:
    """`expected`: the runs the study defines for the cell (its seeds), so that runs never started count as missing."""
    done = tuple(s for s in summaries if s.get("status") in FINISHED)
    return CellStats(name, done, max(expected, len(summaries)) - len(done))


def pct(x: float | None, unit: str = "%", missing: str = "-") -> str:
    """100·x with one decimal, then `unit`; `missing` for None or NaN (a cell without finished runs)."""
    return missing if x is None or math.isnan(x) else f"{100 * x:.1f}{unit}"


# ---- verdict rules --------------------------------------------------------------------------------------------

Outcome = Literal["supported", "not supported", "inconclusive"]


@dataclass(frozen=True)
class Thresholds:
    """The numbers every verdict rule uses, in one place."""

    min_seeds: int = 3  # fewer finished seeds in a cell: inconclusive
    collapses: float = 2 / 3  # a cell collapses when at least this fraction of its seeds did
    stable: float = 1 / 3  # a cell is stable when at most this fraction of its seeds did
    comparable: float = 0.05  # F5: a held-out accuracy gap below this (absolute) is comparable whatever the spread
    alpha: float = 0.05  # a difference counts when significant at this level: Fisher's exact test on collapse
    # counts, Welch's (1 - alpha) interval on final accuracy (issue 27; docs/reproduce.md)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    numbers: str  # the numbers the rule looked at
    rule: str = ""  # the rule's name and statement (filled in by evaluate_findings)
    parts: tuple[tuple[str, Verdict], ...] = field(default=())


def _few(cells: list[CellStats], th: Thresholds) -> Verdict | None:
    few = [c for c in cells if c.n < th.min_seeds]
    if few:
        return Verdict("inconclusive", "fewer than {} finished seeds: {}".format(
            th.min_seeds, ", ".join(f"{c.name} ({c.n})" for c in few)))
    return None


def fisher(a: CellStats, b: CellStats) -> float:
    """Two-sided p of Fisher's exact test: do `a` and `b` collapse at different rates?"""
    return fisher_exact(a.collapsed, a.n - a.collapsed, b.collapsed, b.n - b.collapsed)


def acc_diff(a: CellStats, b: CellStats, th: Thresholds) -> Interval:
    """Mean final accuracy of `a` minus `b` with Welch's (1 - alpha) interval (stablerl.stats.Interval); unbounded
    when a side has no accuracy."""
    xa, xb = a.values("final_accuracy"), b.values("final_accuracy")
    return welch_ci(xa, xb, 1 - th.alpha) if xa and xb else Interval(math.nan, -math.inf, math.inf, 0)


def _diff_text(ci: Interval, th: Thresholds) -> str:
    return (f"difference {100 * ci.mean:+.1f} points ({100 * (1 - th.alpha):g}% Welch CI {100 * ci.low:+.1f} to "
            f"{100 * ci.high:+.1f})")


def contrast(fails: CellStats, holds: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """`fails` collapses and `holds` does not: supported if `fails` collapsed in >= 2/3 of its seeds, `holds` in
    <= 1/3, and the two rates differ significantly (Fisher's exact test, two-sided p <= alpha = 0.05: 3 seeds a side
    can never reach it, 9 can); not supported if `fails` collapsed in <= 1/3 (it did not collapse); inconclusive
    otherwise (both collapse: the setting is too hard to tell; rates in between; or not significant), or with fewer
    than 3 seeds in either."""
    p = fisher(fails, holds)
    nums = f"{fails.short()}; {holds.short()}; Fisher p = {p:.3g}"
    if v := _few([fails, holds], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if fails.rate >= th.collapses and holds.rate <= th.stable:
        return Verdict("supported", nums) if p <= th.alpha else Verdict(
            "inconclusive", f"the rates differ as the rule asks but not significantly (p > {th.alpha:g}); {nums}")
    if fails.rate <= th.stable:
        return Verdict("not supported", nums)
    return Verdict("inconclusive", nums)


def collapses_without(without: CellStats, baseline: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """F2: dropping the IS correction collapses. `contrast(without, baseline)`: supported if the cell without IS
    collapsed in >= 2/3 of its seeds while the baseline (with IS) collapsed in <= 1/3; not supported if the cell
    without IS collapsed in <= 1/3; inconclusive otherwise or with fewer than 3 seeds."""
    return contrast(without, baseline, th)


def most_stable(baseline: CellStats, peers: list[CellStats], th: Thresholds = Thresholds()) -> Verdict:
    """F1: on-policy, MiniRL is the most stable. Not supported if the baseline collapsed in more than 1/3 of its
    seeds, or some peer collapsed less often, significantly (Fisher p <= alpha). Supported if the baseline collapsed
    in <= 1/3, and at least one peer collapsed in >= 2/3 of its seeds, significantly more often than the baseline
    (Fisher p <= alpha). Inconclusive otherwise (no peer collapses: the setting does not separate them; or the
    differences are not significant) or with fewer than 3 seeds in any cell."""
    ps = [fisher(baseline, q) for q in peers]
    nums = "; ".join([baseline.short(), *(f"{q.short()} (Fisher p = {p:.3g} vs {baseline.name})"
                                          for q, p in zip(peers, ps))])
    if v := _few([baseline, *peers], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if baseline.rate > th.stable or any(q.rate < baseline.rate and p <= th.alpha for q, p in zip(peers, ps)):
        return Verdict("not supported", nums)
    if any(q.rate >= th.collapses and p <= th.alpha for q, p in zip(peers, ps)):
        return Verdict("supported", nums)
    why = ("no peer collapsed in most seeds" if not any(q.rate >= th.collapses for q in peers)
           else f"no peer collapsed significantly more often (p > {th.alpha:g})")
    return Verdict("inconclusive", f"{why}; {nums}")


def learns_worse(baseline: CellStats, variant: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """F3: length normalisation learns worse, judged only where the baseline learns: inconclusive if the baseline
    collapsed in more than 1/3 of its seeds (the comparison would restate F1) or with fewer than 3 seeds. With d =
    the baseline's mean final held-out accuracy minus the variant's and Welch's (1 - alpha) interval on d: supported
    if the interval lies above 0, or the variant collapsed in >= 2/3 of its seeds significantly more often (Fisher p
    <= alpha); not supported if the interval lies below 0 (the variant is better); inconclusive if it holds 0."""
    ci, p = acc_diff(baseline, variant, th), fisher(variant, baseline)
    nums = f"{baseline.short()}; {variant.short()}; {_diff_text(ci, th)}; Fisher p = {p:.3g}"
    if v := _few([baseline, variant], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if baseline.rate > th.stable:
        return Verdict("inconclusive", f"the baseline is not stable (it collapsed in {baseline.collapsed}/"
                                       f"{baseline.n} seeds); {nums}")
    if ci.low > 0 or (variant.rate >= th.collapses and p <= th.alpha):
        return Verdict("supported", nums)
    if ci.high < 0:
        return Verdict("not supported", nums)
    return Verdict("inconclusive", "the interval holds 0; " + nums)


def compare(a: CellStats, b: CellStats, th: Thresholds = Thresholds()) -> int:
    """+1 if `a` is better than `b`: it collapsed less often by at least 1/3 of the seeds, significantly (Fisher p <=
    alpha), or (rates not that different) its mean final accuracy is higher with Welch's (1 - alpha) interval above 0;
    -1 if `b` is better; 0 if neither."""
    if abs(a.rate - b.rate) >= th.stable - 1e-9 and fisher(a, b) <= th.alpha:
        return 1 if a.rate < b.rate else -1
    ci = acc_diff(a, b, th)
    return 1 if ci.low > 0 else -1 if ci.high < 0 else 0


def _pool(name: str, cells: list[CellStats]) -> CellStats:
    return CellStats(name, tuple(r for c in cells for r in c.runs), sum(c.missing for c in cells))


def _all(parts: list[Verdict]) -> Outcome:
    """Supported when every part is, not supported when any part is not, inconclusive otherwise."""
    if parts and all(p.outcome == "supported" for p in parts):
        return "supported"
    return "not supported" if any(p.outcome == "not supported" for p in parts) else "inconclusive"


def off_policy(grid: dict[tuple[str, str, str], CellStats], th: Thresholds = Thresholds()) -> Verdict:
    """F4: off-policy (N >= 2) needs both clipping and Routing Replay; R2 suffices at small N, R3 is needed at large N.
    `grid` maps (N, clip, replay) -> cell, with clip in {clip, noclip} and replay in {none, R2, R3}, N in sweep order
    (smallest first). With `best` = the clipped cell with R2 or R3 that collapsed less (R2 on a tie), at each N:
    (a) clipping: `contrast(no-clip cells pooled over replay, best)`; (b) replay: `contrast(clip + none, best)`;
    each part supported if supported at every N, not supported if not supported at some N, else inconclusive.
    (c) R2 vs R3: holds if at the smallest N clip+R2 is stable (<= 1/3) and `compare(R2, R3) >= 0`, and at the
    largest N `compare(R3, R2) > 0`; fails if either comparison goes the other way (or R2 collapses at the smallest
    N); inconclusive otherwise, or with one N only. F4 is supported if (a), (b), (c) all are; not supported if any
    is not; inconclusive otherwise."""
    ns = list(dict.fromkeys(k[0] for k in grid))
    parts: dict[str, list[Verdict]] = {"a": [], "b": []}
    for n in ns:
        r2, r3 = grid[(n, "clip", "R2")], grid[(n, "clip", "R3")]
        best = r3 if r3.rate < r2.rate else r2
        parts["a"].append(contrast(_pool(f"{n} no clip", [grid[(n, "noclip", r)] for r in ("none", "R2", "R3")]),
                                   best, th))
        parts["b"].append(contrast(grid[(n, "clip", "none")], best, th))
    out = [(f"(a) clipping needed, N = {', '.join(ns)}", Verdict(_all(parts["a"]), " | ".join(
               f"{n}: {v.outcome}: {v.numbers}" for n, v in zip(ns, parts["a"])))),
           (f"(b) replay needed, N = {', '.join(ns)}", Verdict(_all(parts["b"]), " | ".join(
               f"{n}: {v.outcome}: {v.numbers}" for n, v in zip(ns, parts["b"]))))]
    lo, hi = ns[0], ns[-1]
    cells = [grid[(n, "clip", r)] for n in (lo, hi) for r in ("R2", "R3")]
    nums = "; ".join(c.short() for c in cells)
    if len(ns) < 2:
        c = Verdict("inconclusive", f"needs at least two values of N; {nums}")
    elif v := _few(cells, th):
        c = Verdict(v.outcome, f"{v.numbers}; {nums}")
    else:
        small = compare(grid[(lo, "clip", "R2")], grid[(lo, "clip", "R3")], th)
        large = compare(grid[(hi, "clip", "R3")], grid[(hi, "clip", "R2")], th)
        r2_ok = grid[(lo, "clip", "R2")].rate <= th.stable
        if small >= 0 and r2_ok and large > 0:
            c = Verdict("supported", nums)
        elif small < 0 or large < 0 or grid[(lo, "clip", "R2")].rate >= th.collapses:
            c = Verdict("not supported", nums)
        else:
            c = Verdict("inconclusive", nums)
    out.append((f"(c) R2 at N = {lo}, R3 at N = {hi}", c))
    return Verdict(_all([v for _, v in out]), "; ".join(f"{k}: {v.outcome}" for k, v in out), parts=tuple(out))


def comparable(cells: list[CellStats], th: Thresholds = Thresholds()) -> Verdict:
    """F5: once training is stable, different cold starts end at comparable accuracy. Inconclusive with fewer than
    3 seeds in a cell, if a cell is not stable (collapsed in more than 1/3 of its seeds), or if the cold starts did
    not differ (their initial held-out accuracies span no more than 5 points). Otherwise supported if the mean final
    accuracies span no more than the larger of 5 points and the largest standard deviation over seeds; not
    supported if they span more."""
    nums = "; ".join(f"{c.short()} (initial {pct(c.mean('initial_accuracy'))})" for c in cells)
    if v := _few(cells, th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if any(c.rate > th.stable for c in cells):
        return Verdict("inconclusive", "a cell is not stable; " + nums)
    init = [c.mean("initial_accuracy") for c in cells]
    final = [c.mean("final_accuracy") for c in cells]
    tol = max(th.comparable, *(c.std("final_accuracy") for c in cells))
    span = f"final accuracies span {100 * (max(final) - min(final)):.1f} points (tolerance {100 * tol:.1f}); "
    if not any(math.isnan(x) for x in init) and max(init) - min(init) <= th.comparable:
        return Verdict("inconclusive", "the cold starts did not differ; " + span + nums)
    return Verdict("supported" if max(final) - min(final) <= tol else "not supported", span + nums)


# rule name -> (function, {role: "cell" | "cells" | "sweep"}); a study's findings name a rule and fill its roles
RULES = {
    "most_stable": (most_stable, {"baseline": "cell", "peers": "cells"}),
    "collapses_without": (collapses_without, {"without": "cell", "baseline": "cell"}),
    "learns_worse": (learns_worse, {"baseline": "cell", "variant": "cell"}),
    "off_policy": (off_policy, {"grid": "sweep"}),
    "comparable": (comparable, {"cells": "cells"}),
}
# the axes (and values) of the sweep an off_policy finding reads; N in the sweep's order, smallest first
SWEEP_AXES = {"N": None, "clip": {"clip", "noclip"}, "replay": {"none", "R2", "R3"}}


def evaluate_findings(study: Study, stats: dict[str, CellStats], th: Thresholds = Thresholds()) -> dict[str, Verdict]:
    """Each finding of `study` -> the verdict of its rule over the cells playing its roles (a cell with no finished
    runs counts as 0 seeds: inconclusive), with the rule's statement attached."""
    def get(name: str) -> CellStats:
        return stats.get(name) or CellStats(name)

    out = {}
    for f in study.findings.values():
        fn, spec = RULES[f.rule]
        roles = finding_roles(study, f)
        kw = {role: get(v) if spec[role] == "cell" else [get(c) for c in v] if spec[role] == "cells"
              else {k: get(c) for k, c in v.items()} for role, v in roles.items()}
        statement = " ".join((fn.__doc__ or "").split())
        out[f.name] = dataclasses.replace(fn(**kw, th=th), rule=f"`{f.rule}`: {statement}")
    return out


# ---- findings: which cells play which role --------------------------------------------------------------------


def finding_roles(study: Study, f: Finding) -> dict[str, Any]:
    """The cells that play each role of finding `f`'s verdict rule (RULES): {role: cell, [cells], or
    {(N, clip, replay): cell} for a sweep}. ConfigError naming the finding for an unknown rule, a missing role, or a
    cell or sweep the study does not define; checked when the study is loaded, long before any verdict."""
    at = f"{f.where}findings.{f.name}"
    if f.rule not in RULES:
        raise ConfigError(f"{at}.rule: unknown rule {f.rule!r} (rules: {', '.join(RULES)})")
    spec = RULES[f.rule][1]
    if set(f.roles) != set(spec):
        raise ConfigError(f"{at}.roles: rule {f.rule} needs roles {', '.join(spec)}; "
                          f"got {', '.join(f.roles) or 'none'}")
    out: dict[str, Any] = {}
    for role, kind in spec.items():
        v = f.roles[role]
        names = v if kind == "cells" else [v]
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise ConfigError(f"{at}.roles.{role}: expected {'a list of cell names' if kind == 'cells' else 'a name'}"
                              f", got {v!r}")
        pool = study.sweeps if kind == "sweep" else study.cells
        for x in names:
            if x not in pool:
                close = difflib.get_close_matches(x, list(pool), n=1)
                raise ConfigError(f"{at}.roles.{role}: the study has no {'sweep' if kind == 'sweep' else 'cell'} "
                                  f"{x!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        out[role] = _sweep_grid(study, v, at) if kind == "sweep" else v
    return out


def _sweep_grid(study: Study, sweep: str, at: str) -> dict[tuple[str, ...], str]:
    """{(value of each SWEEP_AXES axis, in that order): cell name} of a sweep whose axes the rule can read."""
    axes = study.sweeps[sweep]
    for axis, need in SWEEP_AXES.items():
        if axis not in axes or (need and not need <= set(axes[axis])):
            raise ConfigError(f"{at}: sweep {sweep!r} needs the axes {', '.join(SWEEP_AXES)} (values: "
                              + "; ".join(f"{a}: {', '.join(sorted(v)) if v else 'any'}" for a, v in SWEEP_AXES.items())
                              + f"); it has {', '.join(f'{a}: {list(v)}' for a, v in axes.items())}")
    return {tuple(dict(c.axes)[a] for a in SWEEP_AXES): c.name for c in study.cells.values() if c.sweep == sweep}
