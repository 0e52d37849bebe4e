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

    def short(self) -> str:
        return (f"{self.name} collapsed {self.collapsed}/{self.n}, final acc {pct(self.mean('final_accuracy'))} "
                f"± {pct(self.std('final_accuracy'))}")


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


def _spread(a: CellStats, b: CellStats, key: str = "final_accuracy") -> tuple[float, float]:
    """(mean of a - mean of b, the seed spread: the larger of the two standard deviations)."""
    return a.mean(key) - b.mean(key), max(a.std(key), b.std(key))


def contrast(fails: CellStats, holds: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """`fails` collapses and `holds` does not: supported if `fails` collapsed in >= 2/3 of its seeds and `holds` in
    <= 1/3; not supported if `fails` collapsed in <= 1/3 (it did not collapse); inconclusive otherwise (both
    collapse: the setting is too hard to tell; or rates in between), or with fewer than 3 seeds in either."""
    nums = f"{fails.short()}; {holds.short()}"
    if v := _few([fails, holds], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if fails.rate >= th.collapses and holds.rate <= th.stable:
        return Verdict("supported", nums)
    if fails.rate <= th.stable:
        return Verdict("not supported", nums)
    return Verdict("inconclusive", nums)


def collapses_without(without: CellStats, baseline: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """F2: dropping the IS correction collapses. `contrast(without, baseline)`: supported if the cell without IS
    collapsed in >= 2/3 of its seeds while the baseline (with IS) collapsed in <= 1/3; not supported if the cell
    without IS collapsed in <= 1/3; inconclusive otherwise or with fewer than 3 seeds."""
    return contrast(without, baseline, th)


def most_stable(baseline: CellStats, peers: list[CellStats], th: Thresholds = Thresholds()) -> Verdict:
    """F1: on-policy, MiniRL is the most stable. Supported if the baseline collapsed in <= 1/3 of its seeds, no peer
    collapsed less often, and at least one peer collapsed in >= 2/3 of its seeds. Not supported if the baseline
    collapsed in more than 1/3 of its seeds or some peer collapsed less often. Inconclusive otherwise (no peer
    collapses: the setting does not separate them) or with fewer than 3 seeds in any cell."""
    nums = "; ".join(c.short() for c in [baseline, *peers])
    if v := _few([baseline, *peers], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if baseline.rate > th.stable or any(p.rate < baseline.rate for p in peers):
        return Verdict("not supported", nums)
    if any(p.rate >= th.collapses for p in peers):
        return Verdict("supported", nums)
    return Verdict("inconclusive", "no peer collapsed in most seeds; " + nums)


def learns_worse(baseline: CellStats, variant: CellStats, th: Thresholds = Thresholds()) -> Verdict:
    """F3: length normalisation learns worse. With d = mean final held-out accuracy of the baseline minus the
    variant's and s = the larger of their standard deviations over seeds: supported if d > s, or the variant
    collapses (>= 2/3 of seeds) while the baseline is stable (<= 1/3); not supported if -d > s (the variant is
    better); inconclusive if |d| <= s (within the seed spread) or with fewer than 3 seeds."""
    d, s = _spread(baseline, variant)
    nums = f"{baseline.short()}; {variant.short()}; difference {100 * d:+.1f} points, seed spread {100 * s:.1f}"
    if v := _few([baseline, variant], th):
        return Verdict(v.outcome, f"{v.numbers}; {nums}")
    if d > s or (variant.rate >= th.collapses and baseline.rate <= th.stable):
        return Verdict("supported", nums)
    if -d > s:
        return Verdict("not supported", nums)
    return Verdict("inconclusive", "within the seed spread; " + nums)


def compare(a: CellStats, b: CellStats, th: Thresholds = Thresholds()) -> int:
    """+1 if `a` is better than `b`: it collapsed less often by at least 1/3 of the seeds, or (collapse rates
    closer than that) its mean final accuracy is higher by more than the seed spread; -1 if `b` is better; 0 if
    neither."""
    if abs(a.rate - b.rate) >= th.stable - 1e-9:
        return 1 if a.rate < b.rate else -1
    d, s = _spread(a, b)
    return 0 if abs(d) <= s else 1 if d > 0 else -1


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
