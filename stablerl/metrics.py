"""Where numbers go, and what they are called.

`METRICS` is the one list of the names a run logs (trainer, SFT, evaluation): what each means, when it is emitted,
and how plots, the report, the lead-time study and the summaries show it. docs/metrics.md explains them at length
(tests/test_metrics.py checks it names exactly these), and `train.warn_on` rules are checked against them at config
load (`check_rules`), so a misspelled signal fails there instead of never firing.

`metrics.jsonl` (one line per step, the file reports read) and TensorBoard event files are written by
`MetricsWriter`, both in append mode so a resumed run continues them; `truncate_after(step)` drops lines a crashed
run wrote past its last checkpoint, so the resumed file has each step exactly once.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from stablerl.errors import UserError
from stablerl.util import finite, write_text_atomic

# When a metric is in a step's row. A name appears only in rows of its condition; tests/test_metrics.py runs one
# configuration where every RL condition holds and checks each row against this.
WHEN = {
    "step": "every RL step (rows 1..train.steps)",
    "update": "RL steps that updated: some row had Â ≠ 0 (a step whose groups all have equal rewards logs none)",
    "fidelity": "update steps every train.fidelity_every (the E9 probe; not under FSDP)",
    "fidelity_mb": "fidelity steps with train.fidelity_minibatches=all and N > 1: one per mini-batch j",
    "eval": "step 0, every train.eval_every steps and the last step (SFT: every sft.eval_every and the end)",
    "moe_engine": "every RL step of an MoE model, unless algo.replay=R3 (then the trainer runs the engine's experts)",
    "moe_stale": "update steps of an MoE model with N > 1 and algo.replay=none (mini-batches 2..N)",
    "moe_cross": "every RL step of an MoE model with train.cross_step_rows > 0",
    "warn": "the step a train.warn_on rule fires",
    "sft": "every SFT step",
    "linux": "every RL step where /proc/self/status exists (Linux)",
}


@dataclass(frozen=True)
class Metric:
    """One logged name. `{i}` in a name is an MoE layer index, `{j}` an E8 mini-batch index, `{stat}` one of the
    fidelity probe's stats, `{metric}` any RL metric; the other fields say how readers show it."""

    name: str
    meaning: str  # one line; the lead-time table's description for the early-warning signals
    when: str = "step"  # a key of WHEN
    sft: bool = False  # an SFT run logs it too (eval/*, time/step)
    label: str | None = None  # legend label in a run's curves.png (stablerl.plots); needs `panel`
    panel: str | None = None  # the curves.png panel it is drawn in (a title in PANELS)
    title: str | None = None  # panel title in the report's per-cell plots (one panel per metric; `{i}`: per layer)
    log: bool = False  # the report's panel has a log-scale y
    signal: bool = False  # studied as an early-warning signal (stablerl.study.leadtime)
    summary: tuple[str, ...] = ()  # the run summary's keys computed from it (stablerl.summary.summarize_run)


# curves.png panels, in order: (title, log-scale y); each draws the metrics whose `panel` is its title
PANELS: list[tuple[str, bool]] = [
    ("held-out greedy accuracy / rollout reward", False), ("response length (tokens)", False),
    ("train-inference KL (E3)", True), ("entropy (nats/token)", False), ("IS weights and clipping (E5)", False),
    ("first-order fidelity (E9)", False), ("routing agreement (E7)", False), ("SFT loss", True),
]
_ACC, _LEN, _KL, _ENT, _IS, _FID, _ROUTE, _SFT = (t for t, _ in PANELS)


def _is_stats(part: str, what: str, **at_max) -> list[Metric]:
    """mean/min/max/ESS of an E3 factor over response tokens; `at_max`: how readers show its max."""
    out = []
    for s in ("mean", "min", "max", "ess"):
        at = dict(at_max) if s == "max" else {}
        out.append(Metric(f"is/{part}_{s}", at.pop("meaning", f"{s} over response tokens of {what}"), "update", **at))
    return out


def _route(prefix: str, what: str, when: str, layer_title: str | None = None, **at_mean) -> list[Metric]:
    """Routing agreement per MoE layer and its mean (E7); `at_mean`: how readers show the mean."""
    agree = f"share of tokens with the same expert set, {what}"
    return [Metric(f"route/{prefix}/layer{{i}}", f"{agree}, layer i", when, title=layer_title),
            Metric(f"route/{prefix}/mean", at_mean.pop("meaning", f"{agree}, mean over layers"), when, **at_mean)]


# the fidelity probe's stats (E9); each also per mini-batch j as fidelity/<stat>/mb<j>
FIDELITY_STATS = ("cosine", "abs_log_W_mean", "abs_log_W_max", "replay_cosine", "routing_bias_cosine")

METRICS: list[Metric] = [
    Metric("eval/accuracy", "held-out greedy accuracy (fp32 engine on the current weights)", "eval", True,
           "held-out greedy", _ACC, "held-out greedy accuracy",
           summary=("initial_accuracy", "final_accuracy", "final_accuracy_step", "best_accuracy",
                    "best_accuracy_step")),
    Metric("eval/mean_length", "held-out greedy response tokens", "eval", True, "held-out greedy", _LEN),
    Metric("reward/mean", "mean reward of the step's B·G rollouts", label="rollout reward", panel=_ACC,
           title="rollout reward", summary=("final_reward", "best_reward")),
    Metric("reward/accuracy", "share of rollouts with reward >= 1"),
    Metric("reward/zero_std_frac", "share of prompt groups whose G rewards are all equal (no E4 signal)"),
    Metric("reward/errors", "verifier calls that raised (scored 0)"),
    Metric("reward/timeouts", "verifier calls that hit task.reward_timeout (scored 0)"),
    Metric("length/mean", "mean rollout response tokens", label="rollouts", panel=_LEN),
    Metric("length/max", "longest rollout response, tokens"),
    Metric("length/truncated_frac", "share of rollouts that hit engine.max_new_tokens"),
    Metric("kl/k3", "train-inference KL k3 (E3)", label="k3", panel=_KL, title="train-inference KL, k3 (E3)",
           log=True, signal=True, summary=("kl_k3_mean", "kl_k3_max")),
    Metric("kl/k1", "train-inference KL k1 = mean log μ − log π_old (E3)", label="k1", panel=_KL),
    Metric("kl/max_abs_log_ratio", "max |log π_old − log μ| over sampled tokens"),
    Metric("entropy/mean", "policy entropy", label="rollout tokens", panel=_ENT, title="entropy (nats/token)",
           signal=True, summary=("entropy_mean",)),
    Metric("guard/outside_support_frac", "share of sampled tokens outside the trainer's top-p/top-k support"),
    Metric("guard/skipped_minibatches", "mini-batches skipped by the NaN/Inf guard"),
    *_is_stats("discrepancy", "d = π_old/μ (E3)", meaning="max IS weight π_old/μ (E3)", label="discrepancy max",
               panel=_IS, title="max discrepancy weight π_old/μ (E3)", log=True, signal=True),
    *_is_stats("staleness", "r = π/π_old (E8)", label="staleness max", panel=_IS,
               title="max staleness ratio π/π_old (E8)", log=True, summary=("staleness_abs_log_max_mean",)),
    *_is_stats("full", "w = π/μ (E2)"),
    Metric("is/rule_frac_truncated", "share of tokens whose discrepancy weight algo.is_rule=truncate capped", "update"),
    Metric("is/rule_frac_masked", "share of tokens algo.is_rule=mask dropped", "update"),
    Metric("is/seq_log_weight_abs_mean", "mean |Σ_t log w_i,t| per response (distance from first order)", "update"),
    Metric("is/seq_log_weight_abs_max", "max |Σ_t log w_i,t| per response", "update"),
    Metric("clip/frac", "clip fraction (E5)", "update", label="clip fraction", panel=_IS, title="clip fraction (E5)",
           signal=True, summary=("clip_frac_mean",)),
    Metric("clip/frac_low", "share of tokens clipped below 1 − ε_low (Â < 0)", "update"),
    Metric("clip/frac_high", "share of tokens clipped above 1 + ε_high (Â > 0)", "update"),
    Metric("mask/frac", "share of tokens the loss drops (clip and IS-rule masks)", "update"),
    Metric("mask/frac_seq_mean", "mean per response of the share of its tokens the loss drops", "update"),
    Metric("loss/policy", "the registered loss", "update"),
    Metric("loss/tokens", "response tokens of the updated rows", "update"),
    Metric("grad/norm", "global gradient norm before clipping", "update"),
    Metric("fidelity/cosine", "first-order fidelity cos(g_seq, g_tok) (E9)", "fidelity", label="cos(g_seq, g_tok)",
           panel=_FID, title="first-order fidelity (E9)", signal=True, summary=("fidelity_cosine_mean",)),
    Metric("fidelity/abs_log_W_mean", "mean |Σ_t log w_i,t| over the probe's responses (E9)", "fidelity"),
    Metric("fidelity/abs_log_W_max", "max |Σ_t log w_i,t| over the probe's responses (E9)", "fidelity"),
    Metric("fidelity/replay_cosine", "cos(g_seq of π_θ's own routing, g_tok of the replayed update) (E7, E9)",
           "fidelity", summary=("replay_cosine_mean",)),
    Metric("fidelity/routing_bias_cosine", "cos(g_seq of π_θ's own routing, g_seq replayed): the replay's bias",
           "fidelity", summary=("routing_bias_cosine_mean",)),
    Metric("fidelity/{stat}/mb{j}", "a fidelity/ stat at E8 mini-batch j", "fidelity_mb",
           summary=("replay_cosine_mb{j}_mean", "routing_bias_cosine_mb{j}_mean")),
    *_route("infer_vs_train", "engine (μ) vs trainer (π_old)", "moe_engine",
            "routing agreement, engine vs trainer, layer{i} (E7)", meaning="routing agreement engine vs trainer",
            label="engine vs trainer", panel=_ROUTE, signal=True),
    *_route("old_vs_current", "θ_old vs the current mini-batch's weights", "moe_stale", label="θ_old vs current",
            panel=_ROUTE),
    *_route("cross_step", "the router at θ_{t-1} vs θ_t", "moe_cross", meaning="routing agreement θ_{t-1} vs θ_t",
            signal=True),
    Metric("warn/{metric}", "the value of <metric> on the step a train.warn_on rule on it fired", "warn"),
    Metric("train/lr", "learning rate of the step"),
    Metric("time/rollout", "seconds sampling the rollouts"),
    Metric("time/rewards", "seconds scoring them"),
    Metric("time/old_logprobs", "seconds computing log π_old (θ_old's forward)"),
    Metric("time/updates", "seconds in the N mini-batch updates"),
    Metric("time/sync", "seconds syncing the new weights into the engine"),
    Metric("time/step", "seconds of the whole step", sft=True, summary=("seconds_per_step",)),
    Metric("mem/rss_gib", "resident memory of the process after the step released its heap (GiB)", "linux"),
    Metric("mem/peak_gib", "the run's peak resident memory so far (GiB; train.max_rss_frac watches it)", "linux"),
    Metric("sft/loss", "SFT response-token cross-entropy", "sft", label="response-token CE", panel=_SFT),
    Metric("sft/lr", "SFT learning rate", "sft"),
    Metric("sft/grad_norm", "SFT gradient norm before clipping", "sft"),
    Metric("sft/tokens_per_s", "SFT training tokens per second so far", "sft"),
]
METRIC = {m.name: m for m in METRICS}
# the early-warning signals the lead-time study ranks, with their descriptions
SIGNALS = {m.name: m.meaning for m in METRICS if m.signal}


def _pattern(name: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", name)
    sub = {"{i}": r"\d+", "{j}": r"\d+", "{stat}": "|".join(FIDELITY_STATS), "{metric}": ".+"}
    return re.compile("".join(f"(?:{sub[p]})" if p in sub else re.escape(p) for p in parts) + "$")


_PATTERNS = [(_pattern(m.name), m) for m in METRICS if "{" in m.name]


def lookup(key: str) -> Metric | None:
    """The registry entry of a logged key (`route/cross_step/layer3` -> the `layer{i}` entry); None if unknown."""
    return METRIC.get(key) or next((m for p, m in _PATTERNS if p.match(key)), None)


def rl_names() -> list[str]:
    """The names an RL step can log that a `train.warn_on` rule can watch (patterns left out), for hints."""
    return [m.name for m in METRICS if "{" not in m.name and m.when not in ("sft", "warn")]


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        else:  # a fresh run inherits no line and no event of a previous run in this directory
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
        self.fh = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards TensorBoard events past the resume point, as truncate_after does for the JSONL
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # JSON has no NaN/Inf: they are written as null rather than producing a file other tools cannot parse
        row = {"step": step, **{k: None if isinstance(v, float) and finite(v) is None else v
                                for k, v in metrics.items()}}
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if (x := finite(v)) is not None:
                    self.tb.add_scalar(k, x, step)

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a JSONL metrics file. A torn last line (the process was killed while writing it) is left out;
    a broken line elsewhere is a corrupt file: UserError naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: invalid JSON ({e.msg}); the file is corrupt") from None
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep the rows with step <= `step` (and drop a torn last line), atomically; no file, nothing to do."""
    if not path.exists():
        return
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", -1) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
