"""The run summary, from a run directory alone (DESIGN §2: a run's results are files, and reports read only files):
its status, the collapse rule and one summary per run. Statistics per cell and the verdict rules for F1-F5 are
stablerl.study.verdicts; the report (Markdown, PNG) is stablerl.study.report.

This module never imports the trainer, the engine or the model (tests/test_report.py checks it), so a summary can
be (re)computed for any run directory, on any machine, long after the run. Every rule is a small pure function with
its statement in its docstring; the report prints that statement next to each verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from stablerl.config import ConfigError, TrainConfig
from stablerl.metrics import read_metrics
from stablerl.util import finite, write_text_atomic

SUMMARY = "summary.json"
STATUS = "status.json"  # the trainer's word on how a run ended: {"status": "finished" | "aborted", "step", "reason"}
SUMMARY_FORMAT = "stablerl.run-summary/1"  # tells an executor's summary from the quickstart's own summary.json
REWARD = "reward/mean"


# ---- the collapse rule (written down before any study ran: docs/reproduce.md) -----------------------------------


@dataclass(frozen=True)
class CollapseRule:
    """A run collapsed at step s when its rollout reward, smoothed over the last `window` steps, is below
    `frac` x its best smoothed value so far at s, that best is >= `min_best`, and the smoothed reward does not get
    back to `frac` x best within the next `patience` steps (a dip still below at the run's last step counts as not
    recovered). A run the NaN guard aborted collapsed too, at its last step. A run whose smoothed reward never
    reached `min_best` did not learn, and cannot collapse by this rule (its accuracy says how it did)."""

    frac: float = 0.5
    window: int = 5  # the default run's one-step dips (docs/log.md: 0.86 -> 0.17 at step 31) are smoothed over
    patience: int = 10  # that dip recovered in ~8 steps: recovered, not collapsed
    min_best: float = 0.1

    def text(self) -> str:
        return (f"collapsed at step s if the rollout reward (`{REWARD}`, mean of the last {self.window} steps, fewer "
                f"at the start) falls "
                f"below {self.frac:g} x its best value so far (best >= {self.min_best:g}) and does not get back to "
                f"{self.frac:g} x best within {self.patience} steps (still below at the last step: not recovered); "
                "also collapsed if the NaN guard aborted the run")


def collapse_rule(params: dict, where: str = "") -> CollapseRule:
    """A CollapseRule from a study's `collapse:` mapping; ConfigError naming the key otherwise."""
    names = [f.name for f in dataclasses.fields(CollapseRule)]
    for k, v in params.items():
        if k not in names:
            raise ConfigError(f"{where}collapse.{k}: unknown key (valid keys: {', '.join(names)})")
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (k == "frac" and not 0 < v < 1):
            raise ConfigError(f"{where}collapse.{k}: got {v!r}, expected a number >= 0 (frac: in (0, 1))")
    rule = CollapseRule(**params)
    if rule.window < 1 or int(rule.window) != rule.window or int(rule.patience) != rule.patience:
        raise ConfigError(f"{where}collapse.window / patience: expected integers (window >= 1)")
    return rule


@dataclass(frozen=True)
class Collapse:
    collapsed: bool
    step: int | None
    reason: str


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], v) for r in rows if (v := finite(r.get(key))) is not None]


def detect_collapse(rows: list[dict], rule: CollapseRule = CollapseRule(), aborted: bool = False) -> Collapse:
    """Apply `rule` to a run's metrics rows (any order of keys; rows without a finite reward are skipped)."""
    pts = _series(rows, REWARD)
    steps = [s for s, _ in pts]
    vals = [v for _, v in pts]
    smooth = [statistics.fmean(vals[max(0, i - rule.window + 1): i + 1]) for i in range(len(vals))]
    best, best_step, dips, i = -math.inf, None, [], 0
    while i < len(smooth):
        if smooth[i] > best:
            best, best_step = smooth[i], steps[i]
        bar = rule.frac * best
        if best >= rule.min_best and smooth[i] < bar:
            back = next((j for j in range(i + 1, len(smooth))
                         if steps[j] - steps[i] <= rule.patience and smooth[j] >= bar), None)
            if back is None:
                return Collapse(True, steps[i], f"smoothed reward {smooth[i]:.3f} at step {steps[i]} < {rule.frac:g} "
                                f"x best {best:.3f} (step {best_step}), not back within {rule.patience} steps")
            dips.append(f"{steps[i]}-{steps[back]}")
            i = back
            continue
        i += 1
    last = max((r.get("step", 0) for r in rows), default=0)
    if aborted:
        return Collapse(True, last, f"aborted by the NaN guard at step {last}")
    if not pts:
        return Collapse(False, None, "no rollout reward logged")
    if best < rule.min_best:
        return Collapse(False, None, f"smoothed reward never reached {rule.min_best:g} (best {best:.3f}): did not "
                                     "learn, nothing to collapse from")
    return Collapse(False, None, f"smoothed reward stayed >= {rule.frac:g} x best ({best:.3f})"
                                 + (f"; dips recovered at steps {', '.join(dips)}" if dips else ""))


# ---- one run: status and summary -------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def aborted(rows: list[dict], max_bad_steps: int, log: str = "") -> bool:
    """For runs without a status.json (made before the trainer wrote one): the NaN guard stopped the run if its log
    says so, or its last step rows hold `max_bad_steps` bad steps (every mini-batch tried was skipped:
    `guard/skipped_minibatches` > 0 and no `loss/policy`) with no good step after them; steps that tried no update
    (all rewards equal) leave the count alone, as in the trainer."""
    if "aborting:" in log:
        return True
    bad = 0
    for r in reversed([r for r in rows if REWARD in r]):
        if "loss/policy" in r:
            break
        bad += (r.get("guard/skipped_minibatches") or 0) > 0
    return bad >= max_bad_steps


def tail_text(path: Path, chars: int = 4000) -> str:
    """The last `chars` characters of a file ("" if unreadable): logs and metrics are read from their ends."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - chars))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


FINISHED = ("done", "aborted")  # run statuses that no further work changes: counted, kept, skipped by the executor


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_status(run_dir: str | Path, steps: int | None = None) -> tuple[Literal["done", "aborted", "incomplete"], int]:
    """(status, RL steps logged) of a train run directory, from its files: `done` once metrics.jsonl has the row of
    step train.steps; `aborted` when the trainer's status.json says so (the NaN guard stopped it); else `incomplete`
    (running, killed, failed, or stopped early by train.on_warning=stop: `--resume` continues it). A run without a
    status.json (made before the trainer wrote one) is judged aborted by `aborted`: its log or its last rows."""
    run_dir = Path(run_dir)
    cfg = _read_config(run_dir)
    train = cfg.get("train") or {}
    steps = steps if steps is not None else train.get("steps")
    rows = read_metrics(run_dir / "metrics.jsonl")
    done = max((r["step"] for r in rows if REWARD in r), default=0)
    if steps is not None and done >= steps:
        return "done", done
    said = _read_json(run_dir / STATUS)
    if said is not None:
        return ("aborted" if said.get("status") == "aborted" else "incomplete"), done
    bad = int(train.get("max_bad_steps", TrainConfig.max_bad_steps))  # the config's default when the run's omits it
    if rows and aborted(rows, bad, tail_text(run_dir / "train.log")):
        return "aborted", done
    return "incomplete", done


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# Routing Replay's bias (E9 against π_θ's own routing): cos(g_seq(own), the update's g_tok), and cos(g_seq(own),
# the replayed policy's g_seq), the bias alone; summarised as <name>_mean, and <name>_mb<j>_mean per mini-batch j
REPLAY_STATS = ("replay_cosine", "routing_bias_cosine")


def summarize_run(run_dir: str | Path, rule: CollapseRule = CollapseRule(), **extra) -> dict:
    """The summary of a run directory from its files (config.yaml, metrics.jsonl, train.log): status, held-out
    accuracy (initial / final / best), rollout reward, the collapse verdict with its rule, and the means of the
    diagnostics. `extra` (the executor's exit code, wall time, command) is stored as given; without it, the ones an
    earlier summary.json of the run holds are kept (recomputing a summary must not lose what only the executor knew)."""
    run_dir = Path(run_dir)
    if not extra:
        old = _read_json(run_dir / SUMMARY) or {}
        if old.get("format") == SUMMARY_FORMAT:
            extra = {k: old[k] for k in ("exit_code", "wall_seconds", "command") if k in old}
    cfg = _read_config(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    status, done = run_status(run_dir)
    col = detect_collapse(rows, rule, aborted=status == "aborted")
    acc = _series(rows, "eval/accuracy")
    rew = [v for _, v in _series(rows, REWARD)]
    k3 = [v for _, v in _series(rows, "kl/k3")]
    # |log r| at the most stale token of each step (E8): the larger of |log max r| and |log min r|
    stale = [max(abs(math.log(r["is/staleness_max"])), abs(math.log(r["is/staleness_min"]))) for r in rows
             if all(isinstance(r.get(k), int | float) and r[k] > 0 for k in ("is/staleness_max", "is/staleness_min"))]
    pick = {k: (cfg.get(s) or {}).get(k) for s, k in (("algo", "loss"), ("algo", "replay"), ("algo", "eps_high"),
                                                     ("train", "n_minibatches"), ("train", "lr"),
                                                     ("engine", "numerics"))}
    best = max(acc, key=lambda p: p[1], default=(None, None))
    # E9 against the true (own-routing) g_seq, per E8 mini-batch j when the run probed each one
    replay = {}
    for name in REPLAY_STATS:
        key = f"fidelity/{name}"
        replay[f"{name}_mean"] = _mean([v for _, v in _series(rows, key)])
        for j in sorted({int(k.rsplit("mb", 1)[1]) for r in rows for k in r if k.startswith(key + "/mb")}):
            replay[f"{name}_mb{j}_mean"] = _mean([v for _, v in _series(rows, f"{key}/mb{j}")])
    return {
        "format": SUMMARY_FORMAT, "run_dir": str(run_dir), "status": status,
        "steps": (cfg.get("train") or {}).get("steps"), "steps_done": done,
        "config": {"seed": cfg.get("seed"), "init": cfg.get("init"), **pick},
        "initial_accuracy": acc[0][1] if acc and acc[0][0] == 0 else None,
        "final_accuracy": acc[-1][1] if acc else None, "final_accuracy_step": acc[-1][0] if acc else None,
        "best_accuracy": best[1], "best_accuracy_step": best[0],
        "final_reward": _mean(rew[-rule.window:]), "best_reward": max(rew, default=None),
        "collapse": {"collapsed": col.collapsed, "step": col.step, "reason": col.reason,
                     "rule": dataclasses.asdict(rule)},
        "kl_k3_mean": _mean(k3), "kl_k3_max": max(k3, default=None),
        "entropy_mean": _mean([v for _, v in _series(rows, "entropy/mean")]),
        "staleness_abs_log_max_mean": _mean(stale),
        "fidelity_cosine_mean": _mean([v for _, v in _series(rows, "fidelity/cosine")]),
        **replay,
        "clip_frac_mean": _mean([v for _, v in _series(rows, "clip/frac")]),
        "seconds_per_step": _mean([v for _, v in _series(rows, "time/step")]),
        **extra,
    }


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    return write_text_atomic(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2) + "\n")


def measured_step_seconds(run_dirs: list[Path]) -> float | None:
    """Mean RL step time (`time/step`) over the rows these runs have logged so far; None when there are none."""
    vals = [v for d in run_dirs for _, v in _series(read_metrics(d / "metrics.jsonl"), "time/step")]
    return _mean(vals)
