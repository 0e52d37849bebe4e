"""The metric registry (stablerl.metrics.METRICS): a real run logs exactly its names, each under its condition;
docs/metrics.md names exactly them; train.warn_on is checked against them at config load."""

import re
from pathlib import Path

import pytest
from test_trainer import TINY

from stablerl.config import ConfigError, load_config
from stablerl.metrics import FIDELITY_STATS, METRIC, METRICS, PANELS, WHEN, lookup, read_metrics
from stablerl.sft import run_sft
from stablerl.study.summary import summarize_run
from stablerl.trainer import train

DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


def test_the_registry_is_consistent():
    assert len(METRIC) == len(METRICS)  # one entry per name
    for m in METRICS:
        assert m.when in WHEN, m.name
        assert (m.label is None) == (m.panel is None), m.name  # a curve has a legend label in its panel
        assert m.panel is None or m.panel in {t for t, _ in PANELS}, m.name
    assert lookup("route/cross_step/layer12") is METRIC["route/cross_step/layer{i}"]
    assert lookup("fidelity/routing_bias_cosine/mb3") is METRIC["fidelity/{stat}/mb{j}"]
    assert lookup("fidelity/cos/mb3") is None and lookup("kl/k3x") is None
    assert lookup("warn/kl/k3") is METRIC["warn/{metric}"]


def _entries(keys) -> set[str]:
    out = set()
    for k in keys:
        m = lookup(k)
        assert m is not None, f"{k!r} is logged but not registered in stablerl.metrics.METRICS"
        out.add(m.name)
    return out


def test_a_two_step_run_logs_every_registered_name_under_its_condition(tmp_path):
    # Every RL condition holds here: an MoE model (tiny-moe), N = 2 without replay (stale mini-batches), the E9
    # probe each step at each mini-batch, an eval each step, and a rule that fires: the warmup takes the lr from
    # 1e-4 (step 1) to 2e-4 (step 2), so train/lr>1.5e-4 crosses at step 2.
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=all", *TINY, "train.steps=2", "train.eval_every=1",
                             "train.n_minibatches=2", "train.fidelity_minibatches=all",
                             "train.warn_on=train/lr>1.5e-4"])
    train(cfg, show_progress=False)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "all" / "metrics.jsonl")}
    assert sorted(rows) == [0, 1, 2]
    by_when = {w: {m.name for m in METRICS if m.when == w} for w in WHEN}
    assert _entries(k for k in rows[0] if k != "step") == by_when["eval"]
    seen = set()
    for step in (1, 2):
        got = _entries(k for k in rows[step] if k != "step")
        # a step whose groups all have equal rewards makes no update: none of the update-side names
        updated = rows[step]["reward/zero_std_frac"] < 1
        linux = ["linux"] if Path("/proc/self/status").exists() else []
        when = ["step", "eval", "moe_engine", "moe_cross", *linux, *(["update", "fidelity", "fidelity_mb", "moe_stale"]
                                                             if updated else []), *(["warn"] if step == 2 else [])]
        want = set().union(*(by_when[w] for w in when))
        assert got == want, f"step {step}: missing {sorted(want - got)}, not expected {sorted(got - want)}"
        seen |= got
        # the patterns: each MoE layer, each mini-batch, each probe stat
        for prefix in ("infer_vs_train", "cross_step", *(["old_vs_current"] if updated else [])):
            assert {f"route/{prefix}/layer{i}" for i in range(4)} <= set(rows[step])
        if updated:
            assert {f"fidelity/{s}/mb{j}" for s in FIDELITY_STATS for j in (0, 1)} <= set(rows[step])
    # every RL name, some step
    assert seen == {m.name for m in METRICS if m.when != "sft" and (linux or m.when != "linux")}
    assert rows[2]["warn/train/lr"] == rows[2]["train/lr"] and "warn/train/lr" not in rows[1]
    # the summary keys the registry says are computed from these metrics (per mini-batch j: 0 and 1 here)
    summary = summarize_run(tmp_path / "all")
    keys = {k.format(j=j) for m in METRICS for k in m.summary for j in (0, 1)}
    assert keys <= set(summary), sorted(keys - set(summary))


def test_an_sft_run_logs_the_sft_names(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=cold", "task.n_heldout=4", "task.n_train=32", "sft.steps=2",
                             "sft.batch_size=4", "sft.eval_every=1", "sft.eval_problems=4", "engine.max_new_tokens=8"])
    run_sft(cfg, show_progress=False)
    rows = read_metrics(tmp_path / "cold" / "metrics.jsonl")
    got = _entries(k for r in rows for k in r if k != "step")
    assert got == {m.name for m in METRICS if m.when == "sft" or m.sft}


def _documented() -> set[str]:
    """The keys the first column of docs/metrics.md's table names, expanded: `a`, `b` lists; `x_*` for every
    registered name with that prefix; `_max` after `x_mean` for x_max; `/mean` after `p/layer{i}` for p/mean;
    `<metric>`, `<stat>`, `<j>` placeholders as the registry writes them."""
    names = set()
    for line in DOCS.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        prev = ""
        for tok in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            tok = tok.replace("<metric>", "{metric}").replace("<stat>", "{stat}").replace("<j>", "{j}")
            if tok.endswith("_*"):
                names |= {n for n in METRIC if n.startswith(tok[:-1]) and n.count("_") == tok.count("_")}
                continue
            if tok.startswith(("_", "/")):
                tok = prev.rsplit(tok[0], 1)[0] + tok
            names.add(tok)
            prev = tok
    return names


def test_docs_name_exactly_the_registered_metrics():
    doc, reg = _documented(), set(METRIC)
    assert doc == reg, f"docs/metrics.md lacks {sorted(reg - doc)}; documents unregistered {sorted(doc - reg)}"


def test_warn_on_is_checked_against_the_registry():
    assert load_config(None, ["train.warn_on=kl/k3>0.01"]).train.warn_on == ("kl/k3>0.01",)  # one rule, no list
    ok = ["route/cross_step/layer2<0.9", "fidelity/cosine/mb1<0.5", "is/discrepancy_max>10"]
    assert load_config(None, [f"train.warn_on=[{', '.join(ok)}]"]).train.warn_on == tuple(ok)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.warn_on=[kl/k3x>0.01]"])
    assert str(e.value) == ("train.warn_on: rule 'kl/k3x>0.01': no RL metric is named 'kl/k3x' (did you mean kl/k3, "
                            "kl/k1?)")
    for bad in ("fidelity/cos<0.9", "sft/loss>1", "warn/kl/k3>1", "is/weight_max>5"):  # SFT-only, warn/: never fire
        with pytest.raises(ConfigError, match="no RL metric is named"):
            load_config(None, [f"train.warn_on=[{bad}]"])
