"""curves.png: drawn from metrics.jsonl alone, one panel per group of metrics the run logged."""

import json

from stablerl.plots import plot_run, select_panels


def test_panels_follow_the_logged_keys():
    rows = [{"step": 0, "eval/accuracy": 0.3}, {"step": 1, "reward/mean": 0.5, "kl/k3": 2e-4, "kl/k1": -1e-5},
            {"step": 2, "reward/mean": 0.6, "kl/k3": 1e-4, "kl/k1": 3e-5, "eval/accuracy": 0.4}]
    panels = {title: dict(lines) for title, lines, _ in select_panels(rows)}
    assert list(panels) == ["held-out greedy accuracy / rollout reward", "train-inference KL (E3)"]
    assert panels["held-out greedy accuracy / rollout reward"] == {"held-out greedy": [(0, 0.3), (2, 0.4)],
                                                                   "rollout reward": [(1, 0.5), (2, 0.6)]}
    # a log-scale series with no positive value has nothing to draw; one with some keeps all its points
    assert [t for t, _, _ in select_panels([{"step": 1, "kl/k1": -1e-5}])] == []
    assert panels["train-inference KL (E3)"]["k1"] == [(1, -1e-5), (2, 3e-5)]
    assert [t for t, _, _ in select_panels([{"step": 0, "sft/loss": 1.2}, {"step": 1, "sft/loss": None}])] == [
        "SFT loss"]


def test_plot_run_writes_a_png_or_nothing(tmp_path):
    assert plot_run(tmp_path) is None  # no metrics.jsonl: no picture
    rows = [{"step": s, "sft/loss": 2.0 / (s + 1), **({"eval/accuracy": s / 10} if s % 5 == 0 else {})}
            for s in range(20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left
