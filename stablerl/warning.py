"""Early warning of collapse: threshold rules on a run's logged signals.

The paper explains collapse by the first-order approximation failing once the training–inference discrepancy or
the policy staleness grows (E3, E9). The signals that measure them are logged (kl/k3, entropy/mean,
is/discrepancy_max, clip/frac, route/infer_vs_train/mean, route/cross_step/mean, fidelity/cosine: the
`signal` entries of stablerl.metrics.METRICS). A rule such as `kl/k3>0.01` watches any RL metric of that registry
(`check_rules`, at config load); the trainer evaluates its rules every step (`train.warn_on`) and acts on the first
crossing (`train.on_warning`). Which signal leads collapse, by how much, and how often it cries wolf is
measured over a study's runs by `stablerl.study.leadtime`, not assumed here.

No torch here: rules are plain data, tested on plain floats.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

from stablerl.metrics import lookup, rl_names
from stablerl.util import finite

RULE = re.compile(r"^\s*([A-Za-z0-9_/.\-]+)\s*(<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Rule:
    """`signal > threshold` (or `<`): true on the steps where the logged signal lies beyond the threshold."""

    signal: str
    op: str  # ">" or "<"
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Rule:
        m = RULE.match(text)
        if not m:
            raise ValueError(f"bad warning rule {text!r}: expected <metric><op><number> with op '>' or '<', e.g. "
                             "'kl/k3>0.01' or 'route/cross_step/mean<0.97'")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"bad warning rule {text!r}: {m.group(3)!r} is not a number") from None
        return cls(m.group(1), m.group(2), value)

    def beyond(self, value: float | None) -> bool:
        """The signal is on the alarming side. A missing or non-finite value is not (NaN is the abort guard's)."""
        if value is None or not math.isfinite(value):
            return False
        return value > self.threshold if self.op == ">" else value < self.threshold

    def __str__(self) -> str:
        return f"{self.signal}{self.op}{self.threshold:g}"


@dataclass
class Watch:
    """The trainer's view of its rules: `check(metrics)` returns the rules that crossed at this step. A rule fires
    on the step its signal crosses from the safe side to beyond the threshold, and again only after it has come
    back: one warning per excursion, not one per step of a long one. A warning marks a change, so a signal that is
    beyond at the run's first step (a property of the configuration, e.g. clip fraction 0 on-policy) does not fire
    until it has been back once; a signal first logged later (fidelity every k steps) fires on its first value
    beyond. The lead-time study (stablerl.study.leadtime.first_alarm) counts alarms the same way. NaN or a missing value
    counts as neither side. A resumed run replays its logged rows through `check` first (the trainer does)."""

    rules: tuple[Rule, ...]
    beyond: dict[Rule, bool] = field(default_factory=dict)  # per rule: beyond at its last value; absent: none yet
    started: bool = False  # a step has been checked: a first value from now on is judged as a change

    @classmethod
    def of(cls, texts: tuple[str, ...] | list[str]) -> Watch:
        return cls(tuple(Rule.parse(t) for t in texts))

    def check(self, metrics: dict) -> list[Rule]:
        fired = []
        for r in self.rules:
            v = finite(metrics.get(r.signal))
            if v is None:
                continue
            now, before = r.beyond(v), self.beyond.get(r)
            if now and (before is False or (before is None and self.started)):
                fired.append(r)
            self.beyond[r] = now
        self.started = True
        return fired


def check_rules(rules: str | tuple[str, ...] | list[str]) -> tuple[Rule, ...]:
    """`train.warn_on` at config load: each rule parses and watches a metric an RL step logs (stablerl.metrics);
    ValueError in one line naming the closest names otherwise: a misspelled signal would never fire, leaving the
    warning silently off. A single rule string counts as a one-element list."""
    out = []
    for text in (rules,) if isinstance(rules, str) else rules:
        rule = Rule.parse(text)
        m = lookup(rule.signal)
        if m is None or m.when in ("sft", "warn"):
            close = difflib.get_close_matches(rule.signal, rl_names(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "the names are in docs/metrics.md"
            raise ValueError(f"rule {text!r}: no RL metric is named {rule.signal!r} ({hint})")
        out.append(rule)
    return tuple(out)
