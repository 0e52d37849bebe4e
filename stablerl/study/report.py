"""The report: Markdown and PNG plots from run directories alone (`stablerl report DIRS...`, and the end of
`stablerl study` / `stablerl reproduce`).

A directory holding a `study.yaml` (written by `stablerl study` / `stablerl reproduce`) is read as that study: its
cells, seeds and findings, with a verdict per finding. Any other directory is searched for run directories (a
`metrics.jsonl` next to a `config.yaml`), grouped into cells by name (`<cell>/seed<k>`, or the run's own name); a
study file given separately applies its findings to them. Imports no trainer, engine or model (as
stablerl.study.summary).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stablerl.errors import UserError
from stablerl.metrics import METRIC, METRICS, read_metrics
from stablerl.plots import finish_panel, panel_axes, save_png
from stablerl.stats import wilson
from stablerl.study.definition import Study, load_study
from stablerl.study.leadtime import CellCurve, Curve, fair_markdown, judge_fairly, markdown, rank_signals
from stablerl.study.summary import (
    FINISHED,
    REPLAY_STATS,
    CollapseRule,
    collapse_rule,
    detect_collapse,
    run_status,
    summarize_run,
)
from stablerl.study.verdicts import (
    CellStats,
    Thresholds,
    Verdict,
    cell_stats,
    evaluate_findings,
    finding_roles,
    pct,
)
from stablerl.util import finite, write_text_atomic

# (metric key, panel title, log-scale y) of the per-cell plots: the registry's metrics with a report title;
# `route/infer_vs_train/layer{i}` panels are added per layer found
PANELS = [(m.name, m.title, m.log) for m in METRICS if m.title and "{" not in m.name]
LAYER = "route/infer_vs_train/layer"
SEED = re.compile(r"^seed(\d+)$")


@dataclass(frozen=True)
class Found:
    run_dir: Path
    cell: str
    label: str  # the run's path from the directory given, its study's name included


def find_runs(dirs: list[Path]) -> tuple[Study | None, list[Found], list[Path]]:
    """(the study of the first directory holding a study.yaml, the train runs, the cold-start (SFT) runs)."""
    study, runs, cold = None, [], []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d}: not a directory; give run directories or a study's directory (<out>/<study>)")
        if (d / "study.yaml").exists():
            study = study or load_study(d / "study.yaml")
        for m in sorted(d.rglob("metrics.jsonl")):
            run = m.parent
            if "checkpoints" in run.relative_to(d).parts or not (run / "config.yaml").exists():
                continue
            if (run / "sft.json").exists():
                cold.append(run)
                continue
            seed = SEED.match(run.name)
            runs.append(Found(run, run.parent.name if seed else run.name, str(run.relative_to(d.parent))))
    if not runs and not cold:
        raise UserError(f"{', '.join(map(str, dirs))}: no run directories found (a run directory holds metrics.jsonl "
                        "and config.yaml)")
    return study, runs, cold


# ---- plots --------------------------------------------------------------------------------------------------------


def _band(runs: list[list[dict]], key: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the seeds that logged `key` at that step."""
    by_step: dict[int, list[float]] = {}
    for rows in runs:
        for r in rows:
            if (v := finite(r.get(key))) is not None:
                by_step.setdefault(r["step"], []).append(v)
    return [(s, sum(v) / len(v), min(v), max(v)) for s, v in sorted(by_step.items())]


def plot_cells(path: Path, title: str, cells: dict[str, list[list[dict]]]) -> Path | None:
    """One panel per metric, one line per cell (the seed mean) with its min-max band over seeds; None if no panel has
    data. Object API with the Agg canvas, as stablerl/plots.py."""
    layers = sorted({k for runs in cells.values() for rows in runs for r in rows for k in r if k.startswith(LAYER)},
                    key=lambda k: int(k.removeprefix(LAYER)))
    per_layer = METRIC[LAYER + "{i}"]
    panels = []
    for key, name, log in [*PANELS, *((k, per_layer.title.format(i=k.removeprefix(LAYER)), per_layer.log)
                                      for k in layers)]:
        lines = [(cell, pts) for cell, runs in cells.items() if (pts := _band(runs, key))]
        if lines and not (log and any(lo <= 0 for _, pts in lines for _, _, lo, _ in pts)):
            panels.append((name, lines, log))
    if not panels:
        return None
    fig, axes = panel_axes(len(panels), 4.6, 3.2)
    for ax, (name, lines, log) in zip(axes, panels):
        for cell, pts in lines:
            s, mean, lo, hi = zip(*pts)
            (line,) = ax.plot(s, mean, label=cell, linewidth=1.2, marker="o" if len(pts) <= 30 else None,
                              markersize=3)
            ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        finish_panel(ax, name, log, legend_size=6)
    fig.suptitle(f"{title}: seed mean, band = min-max over seeds", fontsize=10)
    return save_png(fig, path, dpi=100)


# ---- Markdown -----------------------------------------------------------------------------------------------------


def _pm(c: CellStats, key: str, pct: bool = True) -> str:
    m, s = c.mean(key), c.std(key)
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3g} ± {s:.2g}"


def cell_table(stats: list[CellStats]) -> list[str]:
    """Markdown rows: one per cell, means ± standard deviations over its finished seeds."""
    out = ["| cell | seeds | collapsed | final acc % | best acc % | initial acc % | final reward | mean k3 | "
           "mean fidelity | mean max \\|log r\\| |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in stats:
        seeds = f"{c.n}" + (f" (+{c.missing} missing)" if c.missing else "")
        out.append(f"| {c.name} | {seeds} | {c.collapsed}/{c.n} | {_pm(c, 'final_accuracy')} | "
                   f"{_pm(c, 'best_accuracy')} | {_pm(c, 'initial_accuracy')} | {_pm(c, 'final_reward', False)} | "
                   f"{_pm(c, 'kl_k3_mean', False)} | {_pm(c, 'fidelity_cosine_mean', False)} | "
                   f"{_pm(c, 'staleness_abs_log_max_mean', False)} |")
    return out


def _flat_cells(roles: dict) -> list[str]:
    names: list[str] = []
    for v in roles.values():
        for c in [v] if isinstance(v, str) else v.values() if isinstance(v, dict) else v:
            names += [c] if c not in names else []
    return names


def made_by(dirs: list[Path]) -> str | None:
    """The command(s) that made the runs, from the study's commands.log (one line per invocation), oldest first: a
    study run in slices (`--cells`) names every slice, not only the last one."""
    log = next((Path(d) / "commands.log" for d in dirs if (Path(d) / "commands.log").exists()), None)
    if log is None:
        return None
    lines = dict.fromkeys(ln.split("\t", 1)[-1] for ln in log.read_text().splitlines() if ln.strip())
    return "`, then `".join(lines) or None  # a repeated invocation (a resume) once


@dataclass(frozen=True)
class Judgement:
    """The runs judged by one collapse rule and one set of verdict thresholds: what a report states. Judging the same
    runs under other rule settings (another `CollapseRule`, other `Thresholds`) is another `judge` call."""

    summaries: list[dict]  # one per train run, in find_runs order, with its "cell" and "run" (label)
    by_cell: dict[str, list[dict]]  # the same summaries per cell
    order: list[str]  # the cells with runs: the study's first, in its order, then the others
    stats: dict[str, CellStats]  # per cell, the study's cells without runs included (0 seeds)
    verdicts: dict[str, Verdict]  # per finding of the study (none without a study)


def judge(study: Study | None, runs: list[Found], rule: CollapseRule, th: Thresholds) -> Judgement:
    """Summaries recomputed from the run files under `rule` (so that it applies to old runs too), statistics per cell
    and a verdict per finding under `th`."""
    return _judged(study, runs, [{**summarize_run(f.run_dir, rule), "cell": f.cell, "run": f.label} for f in runs], th)


def _judged(study: Study | None, runs: list[Found], summaries: list[dict], th: Thresholds) -> Judgement:
    by_cell: dict[str, list[dict]] = {}
    for f, s in zip(runs, summaries):
        by_cell.setdefault(f.cell, []).append(s)
    order = [c for c in (study.cells if study else []) if c in by_cell] + [c for c in by_cell
                                                                            if not study or c not in study.cells]
    stats = {c: cell_stats(c, by_cell.get(c, []), len(study.seeds_of(c)) if study else 0)
             for c in [*(study.cells if study else []), *order]}
    return Judgement(summaries, by_cell, order, stats, evaluate_findings(study, stats, th) if study else {})


# issue 27: every verdict is recomputed under these collapse-rule settings (recovery window `patience` x threshold
# `frac` of the best smoothed reward); a verdict that changes between them is marked fragile
SENSITIVITY = tuple((patience, frac) for patience in (10, 20) for frac in (0.5, 0.3))


def rejudge(study: Study, runs: list[Found], j: Judgement, metrics: dict[Path, list[dict]], rule: CollapseRule,
            th: Thresholds) -> Judgement:
    """`j`'s runs judged under another collapse `rule`: only each run's collapse is recomputed (from its metrics
    rows, already read), everything else of its summary is the same."""
    summaries = []
    for f, s in zip(runs, j.summaries):
        c = detect_collapse(metrics[f.run_dir], rule, aborted=s["status"] == "aborted")
        summaries.append(s | {"collapse": {"collapsed": c.collapsed, "step": c.step, "reason": c.reason,
                                           "rule": dataclasses.asdict(rule)}})
    return _judged(study, runs, summaries, th)


def sensitivity(study: Study, runs: list[Found], j: Judgement, metrics: dict[Path, list[dict]], rule: CollapseRule,
                th: Thresholds) -> dict[str, dict[tuple[int, float], Verdict]]:
    """{finding: {(patience, frac): its verdict}} over SENSITIVITY (the study's own window and min_best kept)."""
    out: dict[str, dict[tuple[int, float], Verdict]] = {k: {} for k in j.verdicts}
    for patience, frac in SENSITIVITY:
        same = (patience, frac) == (rule.patience, rule.frac)
        alt = j if same else rejudge(study, runs, j, metrics, dataclasses.replace(rule, patience=patience, frac=frac),
                                     th)
        for k, v in alt.verdicts.items():
            out[k][(patience, frac)] = v
    return out


def outcomes(by_setting: dict[tuple[int, float], Verdict], part: str | None = None) -> dict[tuple[int, float], str]:
    """The outcome per setting of a verdict, or of one of its parts (F4's (a), (b), (c))."""
    return {k: (dict(v.parts)[part] if part else v).outcome for k, v in by_setting.items()}


def fragile(by: dict[tuple[int, float], str]) -> bool:
    """True when the outcomes under the SENSITIVITY settings differ."""
    return len(set(by.values())) > 1


def _outcomes(by: dict[tuple[int, float], str]) -> str:
    short = {"supported": "S", "not supported": "N", "inconclusive": "I"}
    return " · ".join(short[o] for o in by.values()) + (" **fragile**" if fragile(by) else "")


def _settings(by: dict[tuple[int, float], str]) -> dict[str, str]:
    return {f"patience={p},frac={f:g}": o for (p, f), o in by.items()}


def write_report(dirs: list[Path], out: Path, study_path: str | None = None, th: Thresholds | None = None) -> Path:
    """Write OUT/report.md, one PNG per finding (or per group of cells) and OUT/summaries.json; the report's path."""
    th = th or Thresholds()
    found_study, runs, cold = find_runs(dirs)
    study = load_study(study_path) if study_path else found_study
    rule = collapse_rule(study.collapse if study else {})
    j = judge(study, runs, rule, th)
    summaries, by_cell, order, stats, verdicts = j.summaries, j.by_cell, j.order, j.stats, j.verdicts
    metrics = {f.run_dir: read_metrics(f.run_dir / "metrics.jsonl") for f in runs}  # read once: plots and alarms
    sens = sensitivity(study, runs, j, metrics, rule, th) if verdicts else {}
    rows = {f.cell: [] for f in runs}
    for f in runs:
        rows[f.cell].append(metrics[f.run_dir])
    out.mkdir(parents=True, exist_ok=True)
    command = made_by(dirs) if study is not None else None
    done = [s for ss in by_cell.values() for s in ss]
    md = [f"# {study.name if study else 'runs'}: report", "",
          f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by `stablerl report` from "
          f"{len(done)} run directories" + (f"; made by `{command}`" if command else "") + ".",
          f"Runs: {sum(s['status'] == 'done' for s in done)} done, {sum(s['status'] == 'aborted' for s in done)} "
          f"aborted (NaN guard), {sum(c.missing for c in stats.values())} missing or unfinished (left out).", "",
          f"**Collapse rule** (stored in each run's summary): {rule.text()}.", "",
          f"**Verdict thresholds**: at least {th.min_seeds} finished seeds per cell; a cell *collapses* when "
          f"≥ {th.collapses:.2g} of its seeds did, is *stable* when ≤ {th.stable:.2g} did; a difference counts only "
          f"when significant at α = {th.alpha:g}: collapse counts by Fisher's exact test (two-sided; 3 seeds a side "
          f"can never reach it), final accuracy by Welch's {100 * (1 - th.alpha):g}% interval. Accuracies are "
          "held-out greedy (`eval/accuracy`), final = the last evaluation of the run; ± is the standard deviation "
          "over seeds, CI the t interval of the mean.", ""]
    plotted: set[str] = set()
    if verdicts:
        head = " · ".join(f"{p}/{f:g}" for p, f in SENSITIVITY)
        md += ["## Verdicts", "", f"| finding | claim | verdict | under patience/frac {head} |", "|---|---|---|---|"]
        md += [f"| {k} | {study.findings[k].claim} | **{v.outcome}** | {_outcomes(outcomes(sens[k]))} |"
               for k, v in verdicts.items()]
        md += ["", "The last column re-judges every run with the collapse rule's recovery window (`patience`, steps) "
               "and threshold (`frac` of the best smoothed reward) at each setting (S supported, N not supported, "
               "I inconclusive); a verdict that changes with them is marked **fragile**.", ""]
    for name, v in verdicts.items():
        f = study.findings[name]
        roles = finding_roles(study, f)
        cells = _flat_cells(roles)
        md += [f"## {name}: {f.claim}" if f.claim else f"## {name}", "",
               f"**Verdict: {v.outcome}{' (fragile)' if fragile(outcomes(sens[name])) else ''}.** {v.numbers}", "",
               f"Rule {v.rule}", ""]
        md += [f"- {part}: **{pv.outcome}** (patience/frac {' · '.join(f'{p}/{f:g}' for p, f in SENSITIVITY)}: "
               f"{_outcomes(outcomes(sens[name], part))}). {pv.numbers}" for part, pv in v.parts]
        md += [""] if v.parts else []
        md += [*cell_table([stats[c] for c in cells]), ""]
        groups = _groups(name, roles, cells)
        for title, group in groups:
            png = plot_cells(out / f"{_slug(title)}.png", title, {c: rows[c] for c in group if c in rows})
            md += [f"![{title}]({png.name})", ""] if png else []
        plotted |= set(cells)
    if study is not None:
        md += phase_maps(study, stats, out)
        md += dose_response(study, stats, out)
        plotted |= {c.name for c in study.cells.values() if c.sweep and (
            all(a in study.sweeps[c.sweep] for a in PHASE_AXES) or all(a in study.sweeps[c.sweep] for a in DOSE_AXES))}
    md += replay_bias([stats[c] for c in order], out)
    rest = [c for c in order if c not in plotted]
    if rest:
        md += ["## Cells" if not verdicts else "## Other cells", "", *cell_table([stats[c] for c in rest]), ""]
        for i in range(0, len(rest), 8):
            title = "cells" if len(rest) <= 8 else f"cells {i // 8 + 1}"
            png = plot_cells(out / f"{_slug(title)}.png", title, {c: rows[c] for c in rest[i: i + 8]})
            md += [f"![{title}]({png.name})", ""] if png else []
    if cold:
        md += ["## Cold starts", "", "| cold start | sft.style | held-out accuracy |", "|---|---|---|"]
        for d in cold:
            s = json.loads((d / "sft.json").read_text()) if (d / "sft.json").exists() else {}
            md.append(f"| {d.name} | {s.get('style', '-')} | {100 * s.get('heldout_accuracy', math.nan):.1f}% |")
        md.append("")
    # finished runs only: a run still going has not had its chance to collapse, and would count as a stable one
    md += early_warning([CellCurve(Curve(s["run"], s["collapse"]["step"] if s["collapse"]["collapsed"] else None,
                                         metrics[f.run_dir]),
                                   s["cell"], tuple(sorted(s["config"].items())))
                         for f, s in zip(runs, summaries) if s["status"] in FINISHED])
    md += ["## Runs", "", "| run | status | steps | initial acc % | final acc % | collapse |",
           "|---|---|---|---|---|---|"]
    for s in done:
        col = s["collapse"]
        acc = [pct(s[k], "") for k in ("initial_accuracy", "final_accuracy")]
        md.append(f"| {s['run']} | {s['status']} | {s['steps_done']}/{s['steps']} | {acc[0]} | {acc[1]} | "
                  f"{'**collapsed**: ' if col['collapsed'] else ''}{col['reason']} |")
    write_text_atomic(out / "summaries.json", json.dumps(
        {"runs": done, "verdicts": {k: {"outcome": v.outcome, "numbers": v.numbers, "rule": v.rule,
                                        "parts": {p: pv.outcome for p, pv in v.parts},
                                        "sensitivity": _settings(outcomes(sens[k])),
                                        "parts_sensitivity": {p: _settings(outcomes(sens[k], p)) for p, _ in v.parts},
                                        "fragile": fragile(outcomes(sens[k]))} for k, v in verdicts.items()}},
        indent=1) + "\n")
    return write_text_atomic(out / "report.md", "\n".join(md) + "\n")


PHASE_AXES = ("numerics", "N")  # a sweep with both axes is drawn as heat maps (issue 17's phase diagram)


def phase_maps(study: Study, stats: dict[str, CellStats], out: Path) -> list[str]:
    """For each sweep over engine numerics x N: per value of its other axes (e.g. replay none / R3), a heat map of the
    collapse rate and one of the mean final accuracy. Row and column labels carry the mean k3 and the mean staleness
    max |log r| measured in them: the discrepancy and staleness as they were, not as configured."""
    md = []
    for sweep, axes in study.sweeps.items():
        if not all(a in axes for a in PHASE_AXES):
            continue
        rows_, cols = axes["numerics"], axes["N"]
        rest = [a for a in axes if a not in PHASE_AXES]
        cells = {tuple(dict(c.axes)[a] for a in ("numerics", "N", *rest)): stats.get(c.name) or CellStats(c.name)
                 for c in study.cells.values() if c.sweep == sweep}
        others = sorted({k[2:] for k in cells}, key=lambda k: [list(axes[a]).index(v) for a, v in zip(rest, k)])
        fig, axs = panel_axes(2 * len(others), 4.4, 3.6)
        md += [f"## Phase diagram: {sweep}", "", "Engine numerics (the training–inference discrepancy, rows) x "
               "N mini-batches per step (staleness, columns), each cell the mean over its seeds. Labels: the mean k3 "
               "of a row and the mean max |log r| of a column, as measured.", ""]
        for i, other in enumerate(others):
            grid = [[cells.get((r, c, *other)) or CellStats("") for c in cols] for r in rows_]
            k3 = [_nanmean([g.mean("kl_k3_mean") for g in row]) for row in grid]
            st = [_nanmean([grid[j][i_].mean("staleness_abs_log_max_mean") for j in range(len(rows_))])
                  for i_ in range(len(cols))]
            label = ", ".join(f"{a}={v}" for a, v in zip(rest, other)) or sweep
            for ax, (what, key) in zip(axs[2 * i: 2 * i + 2], (("collapse rate", None),
                                                                ("final accuracy", "final_accuracy"))):
                vals = [[g.rate if key is None else g.mean(key) for g in row] for row in grid]  # NaN: no runs
                im = ax.imshow(vals, cmap="RdYlGn_r" if key is None else "RdYlGn", vmin=0, vmax=1, aspect="auto")
                for r, row in enumerate(vals):
                    for c, v in enumerate(row):
                        text = "–" if math.isnan(v) else f"{v:.0%}" + (f"\n({grid[r][c].collapsed}/"
                                                                       f"{grid[r][c].n})" if key is None else "")
                        ax.text(c, r, text, ha="center", va="center", fontsize=7)
                ax.set_xticks(range(len(cols)), [f"{c}\n|log r| {_fmt(s)}" for c, s in zip(cols, st)], fontsize=7)
                ax.set_yticks(range(len(rows_)), [f"{r}\nk3 {_fmt(k)}" for r, k in zip(rows_, k3)], fontsize=7)
                ax.set_title(f"{what} ({label})", fontsize=9)
                ax.figure.colorbar(im, ax=ax, shrink=0.8)
            md += [f"| {label}: collapsed k/n (final acc %) | " + " | ".join(
                       f"{c} (\\|log r\\| {_fmt(x)})" for c, x in zip(cols, st)) + " |", "|---|" + "---|" * len(cols)]
            md += [f"| {r} (k3 {_fmt(k)}) | " + " | ".join(
                       f"{g.collapsed}/{g.n} ({pct(g.mean('final_accuracy'), '', '–')})" for g in row) + " |"
                   for r, k, row in zip(rows_, k3, grid)]
            md.append("")
        png = save_png(fig, out / f"phase_{_slug(sweep)}.png", dpi=100)
        md += [f"![phase diagram {sweep}]({png.name})", ""]
    return md


DOSE_AXES = ("level", "estimator")  # a sweep with both axes is drawn as a dose-response (issue 27)


def dose_response(study: Study, stats: dict[str, CellStats], out: Path) -> list[str]:
    """For each sweep over a discrepancy `level` x IS `estimator`: collapse rate (Wilson 95% interval) and mean final
    accuracy (t 95% interval) against the k3 measured in each cell (its runs' mean `kl_k3_mean`, not the level's
    name), one line per estimator; and the table behind it."""
    md = []
    for sweep, axes in study.sweeps.items():
        if not all(a in axes for a in DOSE_AXES):
            continue
        cells = {(dict(c.axes)["level"], dict(c.axes)["estimator"]): stats.get(c.name) or CellStats(c.name)
                 for c in study.cells.values() if c.sweep == sweep}
        levels, ests = list(axes["level"]), list(axes["estimator"])
        if not any(g.n for g in cells.values()):
            md += [f"## Dose-response: {sweep}", "", f"No finished runs of the {len(cells)} cells yet "
                   f"(`stablerl reproduce --full --cells '{sweep}_*'`).", ""]
            continue
        fig, axs = panel_axes(2, 5.0, 3.8)
        ax_rate, ax_acc = axs[:2]
        for est in ests:
            pts = sorted(((g.mean("kl_k3_mean"), g) for lv in levels if (g := cells.get((lv, est))) and g.n
                          and not math.isnan(g.mean("kl_k3_mean"))), key=lambda p: p[0])  # by k3 (ties: level order)
            if not pts:
                continue
            x = [k for k, _ in pts]
            w = [wilson(g.collapsed, g.n) for _, g in pts]
            ax_rate.errorbar(x, [i.mean for i in w], yerr=[[i.mean - i.low for i in w], [i.high - i.mean for i in w]],
                             marker="o", capsize=3, label=est)
            ci = [g.acc_ci() for _, g in pts]
            ys = [g.mean("final_accuracy") for _, g in pts]
            err = [[0 if c is None else y - c.low for y, c in zip(ys, ci)], [0 if c is None else c.high - y
                                                                              for y, c in zip(ys, ci)]]
            ax_acc.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=est)
        for ax, title in ((ax_rate, "collapse rate (Wilson 95%)"), (ax_acc, "final held-out accuracy (t 95%)")):
            ax.set_xscale("log")
            ax.set_xlabel("train-inference k3, measured (mean over the cell's runs)", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
        png = save_png(fig, out / f"dose_{_slug(sweep)}.png", dpi=100)
        md += [f"## Dose-response: {sweep}", "", "The discrepancy dial (`level`, rows: the k3 measured in each cell) "
               "against the IS estimator (columns): collapsed k/n and mean final held-out accuracy with its t 95% "
               "interval.", "",
               "| level | " + " | ".join(f"{e}: k3 · collapsed · final acc" for e in ests) + " |",
               "|---|" + "---|" * len(ests)]
        for lv in levels:
            row = []
            for est in ests:
                g = cells.get((lv, est)) or CellStats("")
                ci = g.acc_ci()
                acc = pct(g.mean("final_accuracy"), "", "–") + (f" ({pct(ci.low, '')} to {pct(ci.high, '')})"
                                                                 if ci else "")
                row.append(f"{_fmt(g.mean('kl_k3_mean'))} · {g.collapsed}/{g.n} · {acc}")
            md.append(f"| {lv} | " + " | ".join(row) + " |")
        md += ["", f"![dose-response {sweep}]({png.name})", ""]
    return md


def replay_bias(stats: list[CellStats], out: Path) -> list[str]:
    """Routing Replay's bias (issue 17): for the cells at N > 1, E9 against the sequence-level gradient of π_θ's own
    routing, next to the cell's accuracy (stablerl.diagnostics.fidelity); per mini-batch j, with a plot, when the
    runs probed every one (train.fidelity_minibatches=all)."""
    cells = [c for c in stats if c.n and (c.runs[0]["config"].get("n_minibatches") or 1) > 1
             and not math.isnan(c.mean("replay_cosine_mean"))]
    if not cells:
        return []
    cells.sort(key=lambda c: c.runs[0]["config"]["n_minibatches"])  # stable: study order within one N
    md = ["## Routing Replay bias (E9 per mini-batch)", "",
          "Under Routing Replay (E7) an update differentiates a policy whose experts θ_old (R2) or the rollout engine "
          "(R3) chose, not π_θ's own. Against the sequence-level gradient g_seq (E1) of π_θ under its own routing, on "
          "the probe rows: *to true g_seq* = cos with the update's token-level direction g_tok (E2, unclipped): the "
          "first-order error and the replay's bias together (without replay, the plain E9 cosine); *bias* = cos "
          "with the replayed policy's own g_seq: the replay's bias alone (1 without replay). Each: mean ± std over "
          "seeds of each run's mean over its probe steps, at the last mini-batch, and per mini-batch j = 0, 1, ... "
          "where probed.", "",
          "| cell | N | replay | seeds | to true g_seq | per j | bias | per j | final acc % | collapsed |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[tuple[str, int], list[tuple[str, list[float]]]] = {}
    for c in cells:
        cfg = c.runs[0]["config"]
        n = cfg["n_minibatches"]
        cols = []
        for name in REPLAY_STATS:
            by_j = [c.mean(f"{name}_mb{j}_mean") for j in range(n)]
            probed = not all(math.isnan(v) for v in by_j)
            if probed:
                curves.setdefault((name, n), []).append((c.name, by_j))
            cols += [_pm(c, f"{name}_mean", False), " / ".join(_fmt(v) for v in by_j) if probed else "-"]
        md.append(f"| {c.name} | {n} | {cfg.get('replay')} | {c.n} | {' | '.join(cols)} | "
                  f"{_pm(c, 'final_accuracy')} | {c.collapsed}/{c.n} |")
    md.append("")
    if curves:
        what = {"replay_cosine": "cos(g_seq own, g_tok)", "routing_bias_cosine": "bias: cos(g_seq own, g_seq replayed)"}
        fig, axes = panel_axes(len(curves), 4.6, 3.2)
        for ax, ((name, n), lines) in zip(axes, sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
            for cell, ys in lines:
                ax.plot(range(n), ys, marker="o", markersize=3, linewidth=1.2, label=cell)
            ax.set_xlabel("mini-batch j (staleness grows with j)", fontsize=7)
            finish_panel(ax, f"N = {n}: {what[name]}", False, legend_size=6)
        fig.suptitle("Routing Replay bias per mini-batch: seed mean of each run's mean over probe steps", fontsize=10)
        png = save_png(fig, out / "replay_bias.png", dpi=100)
        md += [f"![Routing Replay bias]({png.name})", ""]
    return md


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1e}" if abs(x) < 0.01 else f"{x:.3f}"


def early_warning(runs: list[CellCurve]) -> list[str]:
    """The report's early-warning section (stablerl.study.leadtime): which signal crossed a threshold before the
    collapse rule fired, how many steps before, and how often on runs that did not collapse, first split by halves
    of the runs, then judged fairly (whole cells held out, against the reward-drop and config-only baselines);
    empty without any collapse."""
    curves = [r.curve for r in runs]
    if not any(c.collapse_step is not None for c in curves):
        return []
    return ["## Early warning", "", "Each signal's threshold rule is chosen on half of the runs (Youden's J: share of "
            "collapsed runs it fires on at or before their collapse step minus share of stable runs it fires on) "
            "and scored on the other half. Lead = collapse step - first alarm; the collapse step lags the first bad "
            "step by up to the rule's smoothing window. A rule found here can be used live: "
            "`train.warn_on=[<rule>]` (docs/metrics.md).", "", markdown(rank_signals(curves), curves), "",
            "### Judged fairly: whole cells held out, against two baselines", "",
            "Seeds of one cell share a config, so a split by runs lets a threshold see its own cell. Here every cell "
            "is scored by the rule chosen on the other cells, beside a reward-drop alarm and a config-only rule "
            "(stablerl.study.leadtime.judge_fairly).", "", fair_markdown(judge_fairly(runs), runs)]


def _groups(name: str, roles: dict, cells: list[str]) -> list[tuple[str, list[str]]]:
    """The plots of a finding: one; for a sweep grid (F4), one per value of its first axis (N), 6 cells each."""
    grid = next((v for v in roles.values() if isinstance(v, dict)), None)
    if grid is None:
        return [(name, cells)]
    firsts = list(dict.fromkeys(k[0] for k in grid))
    return [(f"{name} {n}", [c for k, c in grid.items() if k[0] == n]) for n in firsts]


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", title).strip("_") or "plot"


# ---- a study's results, kept -------------------------------------------------------------------------------------

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "train.log", "samples.jsonl")  # no checkpoints, no tb
COLD_FILES = ("config.yaml", "metrics.jsonl", "sft.json", "sft.log")  # and model/: the runs still to come start there


def plan_copy(dirs: list[Path], dest: Path) -> list[tuple[Path, Path, tuple[str, ...]]]:
    """What `copy_runs` copies: (source dir, target dir, file names) for each study file set, finished run and built
    cold start under `dirs`, to dest/<dir name>/...; every refusal raised before anything is written."""
    dest = dest.resolve()
    srcs = [Path(d).resolve() for d in dirs]
    for d in srcs:
        if dest == d or d in dest.parents or dest in d.parents:
            raise UserError(f"--copy-runs: {dest} overlaps the run directory {d}; give --out outside the runs")
    names = [d.name for d in srcs]
    if len(set(names)) < len(names):
        raise UserError(f"--copy-runs: two run directories named {max(names, key=names.count)!r} would be merged in "
                        f"{dest}; copy them one at a time, to different --out")
    plan = []
    for d in srcs:
        _, runs, cold = find_runs([d])
        top = dest / d.name
        plan.append((d, top, tuple(f for f in ("study.yaml", "commands.log") if (d / f).exists())))
        plan += [(f.run_dir, top / f.run_dir.relative_to(d), RUN_FILES) for f in runs
                 if run_status(f.run_dir)[0] in FINISHED]
        plan += [(c, top / c.relative_to(d), COLD_FILES) for c in cold if (c / "model" / "config.json").exists()]
    return plan


def copy_runs(plan: list[tuple[Path, Path, tuple[str, ...]]]) -> int:
    """Copy the finished runs (their small files) and the built cold starts (with their model), with each study's
    study.yaml and commands.log (plan_copy): a report can be re-made from the copy, and a study continued from it
    (copied back to <out>/<study>, the executor skips what is finished and runs the rest from the same cold starts).
    Unfinished runs are left out: without their checkpoints they would start over anyway. Files left in the target
    by an earlier copy stay. Returns the number of train runs copied."""
    for src, to, names in plan:
        to.mkdir(parents=True, exist_ok=True)
        for f in names:
            if (src / f).exists():
                shutil.copy2(src / f, to / f)
        if names == COLD_FILES:
            shutil.copytree(src / "model", to / "model", dirs_exist_ok=True)
    return sum(names == RUN_FILES for _, _, names in plan)
