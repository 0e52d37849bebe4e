"""`curves.png` for a run directory, drawn from its `metrics.jsonl` alone (a run's results are files; this reads
only files, never the trainer). One panel per group of metrics the run logged; panels with no data are left out,
so the same function draws an RL run and an SFT cold start.
"""

from __future__ import annotations

from pathlib import Path

from stablerl.metrics import METRICS, read_metrics
from stablerl.metrics import PANELS as CURVE_PANELS

# (title, [(metric key, label)], log-scale y): the registry's panels, each with the metrics drawn in it
PANELS: list[tuple[str, list[tuple[str, str]], bool]] = [
    (title, [(m.name, m.label) for m in METRICS if m.panel == title], log) for title, log in CURVE_PANELS]


def select_panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, list[tuple[int, float]]]], bool]]:
    """The PANELS these metric rows have data for: (title, [(label, [(step, value)])], log-scale)."""
    panels = []
    for title, series, log in PANELS:
        lines = []
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if pts and not (log and all(v <= 0 for _, v in pts)):  # a log axis cannot show only values <= 0
                lines.append((label, pts))
        if lines:
            panels.append((title, lines, log))
    return panels


def panel_axes(n: int, width: float, height: float) -> tuple[object, list]:
    """A matplotlib Figure with `n` panels, up to 3 a row, and their axes. The object API with the Agg canvas: no
    pyplot, no global backend or figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, n)
    nrows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, cols, k + 1) for k in range(n)]


def finish_panel(ax, title: str, log: bool, legend_size: int = 7) -> None:
    """The house style of a panel: title, step axis, grid, legend."""
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_png(fig, path: Path, dpi: int) -> Path:
    tmp = path.with_name(path.name + ".tmp.png")  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write `curves.png` (or `out`) for the run in `run_dir`; None when its metrics.jsonl has nothing PANELS draws."""
    run_dir = Path(run_dir)
    panels = select_panels(read_metrics(run_dir / "metrics.jsonl"))
    if not panels:
        return None
    fig, axes = panel_axes(len(panels), 4.2, 3.0)
    for ax, (title, lines, log) in zip(axes, panels):
        for label, pts in lines:
            xs, ys = zip(*pts)
            # sparse series (evals every k steps) get markers so their few points are visible
            ax.plot(xs, ys, label=label, marker="o" if len(pts) <= 30 else None, markersize=3, linewidth=1.2)
        finish_panel(ax, title, log)
    fig.suptitle(str(run_dir), fontsize=10)
    return save_png(fig, Path(out) if out is not None else run_dir / "curves.png", dpi=110)


def plot_run_quietly(run_dir: str | Path, warn=print) -> Path | None:
    """plot_run for the end of a run: a failed plot is reported, never allowed to fail the run that made the data."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # the metrics are already on disk; the picture is a convenience
        warn(f"warning: could not draw {Path(run_dir) / 'curves.png'}: {type(e).__name__}: {e}")
        return None
