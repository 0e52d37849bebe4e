"""Studies: expansion into runs (names, configs, cold starts), errors naming file:line, the cell and the key; the plan
for each run-directory state (skip / resume / fresh / busy / conflict); the process x thread sizing; one tiny real
study run through the executor as subprocesses."""

import fcntl
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from stablerl.cli import main
from stablerl.config import ConfigError, load_config, save_config
from stablerl.errors import UserError
from stablerl.executor import Plan, estimate_seconds, plan_run, plan_workers
from stablerl.study.definition import STUDIES, Estimate, expand, load_study

STUDY = """\
name: demo
overrides: [train.steps=4]
seeds: [0, 1, 2]
cold_starts:
  short: [sft.style=short]
cells:
  base: []
  noisy: [algo.loss=minirl_no_is]
  warm: {init: short, overrides: [train.lr=1e-4]}
sweeps:
  offpolicy:
    axes:
      N: {N2: [train.n_minibatches=2], N4: [train.n_minibatches=4]}
      clip: {clip: [], noclip: [algo.eps_high=1e6]}
      replay: {none: [], R2: [algo.replay=R2], R3: [algo.replay=R3]}
findings:
  F2: {rule: collapses_without, roles: {without: noisy, baseline: base}, claim: no IS collapses}
  F4: {rule: off_policy, roles: {grid: offpolicy}}
"""


def _study(tmp_path, text=STUDY, name="study.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_cell_may_run_its_own_seeds(tmp_path):
    # issue 27: the cells a verdict turns on get 9 seeds, the others keep the study's 3; the report counts a cell's
    # runs against its own seeds
    text = STUDY.replace("  noisy: [algo.loss=minirl_no_is]",
                         "  noisy: {overrides: [algo.loss=minirl_no_is], seeds: [0, 1, 2, 3, 4]}")
    study = load_study(_study(tmp_path, text))
    names = [r.name for r in expand(study, tmp_path / "out", cells=["base", "noisy"])]
    assert names == [f"demo/base/seed{s}" for s in (0, 1, 2)] + [f"demo/noisy/seed{s}" for s in range(5)]
    bad = STUDY.replace("  noisy: [algo.loss=minirl_no_is]", "  noisy: {overrides: [], seeds: [1, 1]}")
    with pytest.raises(ConfigError, match=r"study.yaml:\d+: cells.noisy.seeds: expected a list of distinct integers"):
        load_study(_study(tmp_path, bad))


def test_expand_gives_one_checked_run_per_cell_and_seed(tmp_path):
    study = load_study(_study(tmp_path))
    assert list(study.cells)[:3] == ["base", "noisy", "warm"] and len(study.cells) == 3 + 2 * 2 * 3
    runs = expand(study, tmp_path / "out", cells=["base", "noisy", "warm"])
    # the cold start the chosen cells need comes first, built once; then cells x seeds, in order
    assert [r.name for r in runs] == ["demo/cold/short"] + [f"demo/{c}/seed{s}" for c in ("base", "noisy", "warm")
                                                            for s in (0, 1, 2)]
    cold, *cells = runs
    assert cold.kind == "sft" and cold.config.sft.style == "short" and cold.args[:2] == ("sft", "--no-progress")
    # a cold start does not take the study's RL recipe (train.steps=4), so recalibrating it keeps the cold starts
    assert cold.config.train.steps == load_config(None).train.steps and "train.steps=4" not in cold.args
    assert all(r.run_dir == tmp_path / "out" / r.name for r in runs)
    assert [r.config.seed for r in cells] == [0, 1, 2] * 3
    assert all(r.config.train.steps == 4 for r in cells)
    assert {r.config.algo.loss for r in cells if r.cell == "noisy"} == {"minirl_no_is"}
    warm = [r for r in cells if r.cell == "warm"]
    assert all(r.needs == "demo/cold/short" and r.config.init == str(tmp_path / "out/demo/cold/short/model")
               and r.config.train.lr == 1e-4 for r in warm)
    assert all(r.config.init is None and r.needs is None for r in cells if r.cell != "warm")
    # the command line is what a user would type to make that one run by hand
    assert warm[1].args == ("train", "--no-progress", "train.steps=4", "train.lr=1e-4", "seed=1",
                            f"out_dir={tmp_path / 'out'}", "name=demo/warm/seed1",
                            f"init={tmp_path / 'out/demo/cold/short/model'}")
    # a sweep's cells are the product of its axes, named by their values
    off = expand(study, tmp_path / "out", cells=["offpolicy_N4_noclip_R3"])[0].config
    assert (off.train.n_minibatches, off.algo.eps_high, off.algo.replay) == (4, 1e6, "R3")


@pytest.mark.parametrize("text, where, what", [
    (STUDY.replace("[algo.loss=minirl_no_is]", "[algo.los=minirl_no_is]"), ":8:", "cell 'noisy' (seed 0): unknown "
     "key 'algo.los' (did you mean 'algo.loss'?)"),
    (STUDY.replace("[train.lr=1e-4]", "[train.n_minibatches=3]"), ":9:", "cell 'warm' (seed 0): train.n_minibatches"),
    (STUDY.replace("[sft.style=short]", "[sft.stlye=short]"), ":5:", "cold start 'short': unknown key 'sft.stlye'"),
    (STUDY.replace("[train.steps=4]", "[train.stesp=4]"), ":2:", "overrides: unknown key 'train.stesp'"),
    (STUDY.replace("seeds:", "sedes:"), ":3:", "sedes: unknown key (did you mean 'seeds'?)"),
    (STUDY.replace("base: []", "base: [seed=3]"), ":7:", "'seed' is set by the study"),
    (STUDY.replace("baseline: base}", "baseline: bsae}"), ":17:", "no cell 'bsae' (did you mean 'base'?)"),
    (STUDY.replace("rule: off_policy", "rule: off_polcy"), ":18:", "unknown rule 'off_polcy'"),
    (STUDY.replace("none: [], R2", "R2"), ":18:", "sweep 'offpolicy' needs the axes N, clip, replay"),
    (STUDY.replace("  offpolicy:\n", "  offpolicy:\n    init: long\n"), ":12:", "'long' is not a cold start"),
    (STUDY.replace("  offpolicy:", "  on:"), ":11:", "YAML reads unquoted on/off"),
    (STUDY.replace("findings:", "collapse: {frac: 2}\nfindings:"), ":16:", "collapse.frac"),
    # sft.* outside cold_starts: the RL runs do no SFT and cold starts take only their own lists (issue 30, item 2)
    (STUDY.replace("[train.steps=4]", "[train.steps=4, sft.steps=4]"), ":2:", "overrides.1: 'sft.steps' would be "
     "ignored: the RL runs do no SFT, and cold starts take only their own lists; put it under cold_starts"),
    (STUDY.replace("[train.lr=1e-4]", "[sft.lr=1e-4]"), ":9:", "cells.warm.overrides.0: 'sft.lr' would be ignored"),
    (STUDY.replace("N2: [train.n_minibatches=2]", "N2: [sft.steps=2]"), ":13:", "axes.N.N2.0: 'sft.steps' would be"),
])
def test_study_errors_name_file_line_and_key(tmp_path, text, where, what):
    with pytest.raises(ConfigError) as e:
        expand(load_study(_study(tmp_path, text)), tmp_path / "out")
    msg = str(e.value)
    assert "study.yaml" + where in msg and what in msg and "\n" not in msg, msg


def test_command_line_overrides_are_checked_and_cannot_set_what_the_study_sets(tmp_path):
    study = load_study(_study(tmp_path))
    runs = expand(study, tmp_path, ["train.steps=2"], cells=["base"])
    assert all(r.config.train.steps == 2 and r.args[-4] == "train.steps=2" for r in runs)
    with pytest.raises(ConfigError, match="command-line overrides: unknown key 'train.setps'"):
        expand(study, tmp_path, ["train.setps=2"])
    with pytest.raises(UserError, match="'name=x'.*the study sets those"):
        expand(study, tmp_path, ["name=x"])


def test_shipped_studies_expand_and_validate():
    quick, full = load_study(STUDIES / "quick.yaml"), load_study(STUDIES / "full.yaml")
    for study, n_off, peers, colds in ((quick, 1, set(), {"mix", "short"}),
                                       (full, 3, {"grpo", "cispo", "gspo"}, {"mix", "long", "short", "under"})):
        runs = expand(study, "runs/reproduce")
        cells = {r.cell for r in runs if r.kind == "train"}
        assert {"minirl", "minirl_no_is", "minirl_lennorm", *peers} <= cells
        assert sum(c.startswith("offpolicy_") for c in cells) == n_off * 2 * 3
        assert {r.cell for r in runs if r.kind == "sft"} == colds
        assert len(study.seeds) >= 3 and set(study.findings) >= {"F1", "F2", "F3", "F4", "F5"}
        # the stress setting: the fp8 engine everywhere; on-policy at 3e-4, the off-policy grid at 8e-5
        assert all(r.config.engine.numerics == "fp8" for r in runs
                   if r.kind == "train" and "bf16" not in r.cell and not r.cell.startswith("dose_"))
        assert {r.config.train.lr for r in runs if r.cell == "minirl"} == {3e-4}
        assert {r.config.train.lr for r in runs if r.cell.startswith("offpolicy_")} == {8e-5}
    # issue 27: the dose-response at the stable lr: 5 engine levels x 3 estimators, 120 steps
    dose = [r for r in expand(full, "x") if r.cell.startswith("dose_")]
    assert len(dose) == 5 * 3 * 3 and {(r.config.train.lr, r.config.train.steps) for r in dose} == {(8e-5, 120)}
    assert {(r.config.engine.numerics, r.config.engine.weight_bits) for r in dose} == {
        ("fp32", 0), ("fp8", 0), ("fp32", 5), ("fp32", 4), ("fp32", 3)}
    # issue 27: the F1-F3 cells of each IS estimator run 9 seeds, the peers the study's 3
    nine = {r.cell for r in expand(full, "runs/reproduce") if r.seed == 8}
    assert nine == {"minirl", "minirl_no_is", "minirl_lennorm", "minirl_truncate", "minirl_mask",
                    "minirl_lennorm_truncate", "minirl_lennorm_mask"}
    assert {(r.config.algo.is_rule, r.config.algo.loss) for r in expand(full, "x", cells=["minirl_truncate"])
            if r.kind == "train"} == {
        ("truncate", "minirl")}


def test_smollm2_is_study_expands_on_the_recipe():
    # issue 26: the 9-run IS study on SmolLM2 takes the recipe as its base and changes only the engine and estimator
    study = load_study(Path(__file__).parent.parent / "recipes" / "smollm2_is.yaml")
    runs = expand(study, "runs/study")
    assert len(runs) == 9 and all(r.config.engine.numerics == "fp8" and r.config.train.lr == 5e-6 for r in runs)
    assert all(r.config.model == "smollm2" and r.config.task.chat_template for r in runs)
    assert {(r.cell, r.config.algo.loss, r.config.algo.is_rule) for r in runs if r.seed == 0} == {
        ("minirl", "minirl", "none"), ("minirl_truncate", "minirl", "truncate"),
        ("minirl_no_is", "minirl_no_is", "none")}


@pytest.mark.parametrize("cores, jobs, threads, want", [
    (2, None, None, (1, 2)),  # default: one process with every core
    (16, None, None, (1, 16)),
    (2, 2, None, (2, 1)),
    (16, 4, None, (4, 4)),
    (16, 3, None, (3, 5)),
    (16, None, 4, (4, 4)),
    (2, 1, 1, (1, 1)),
    (1, None, None, (1, 1)),
])
def test_plan_workers_never_oversubscribes(cores, jobs, threads, want):
    got = plan_workers(cores, jobs, threads)
    assert got == want and got[0] * got[1] <= cores


@pytest.mark.parametrize("jobs, threads", [(2, 2), (3, None), (None, 3), (0, None)])
def test_plan_workers_refuses_oversubscription_on_2_cores(jobs, threads):
    with pytest.raises(UserError, match="--jobs|--threads"):
        plan_workers(2, jobs, threads)


def _metrics(d: Path, steps: int, abort: bool = False) -> None:
    rows = [{"step": 0, "eval/accuracy": 0.3}]
    rows += [{"step": s, "reward/mean": 0.5, "loss/policy": 0.1, "guard/skipped_minibatches": 0, "time/step": 1.5}
             for s in range(1, steps + 1)]
    if abort:
        rows += [{"step": steps + k, "reward/mean": 0.0, "guard/skipped_minibatches": 1} for k in (1, 2, 3)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plan_for_each_run_directory_state(tmp_path):
    runs = {r.name: r for r in expand(load_study(_study(tmp_path)), tmp_path / "out", cells=["base", "warm"])}
    base = [runs[f"demo/base/seed{s}"] for s in (0, 1, 2)]
    # no directory: fresh; its command has no --resume
    p = plan_run(base[0])
    assert (p.action, p.command) == ("fresh", base[0].args)
    # finished: metrics reach train.steps (no summary needed) -> skip, and nothing in the directory is touched
    save_config(base[0].config, base[0].run_dir / "config.yaml")
    _metrics(base[0].run_dir, 4)
    before = {f: f.read_bytes() for f in base[0].run_dir.iterdir()}
    assert plan_run(base[0]).action == "skip"
    assert {f: f.read_bytes() for f in base[0].run_dir.iterdir()} == before
    # interrupted at step 2 with a checkpoint: resume, with --resume right after the subcommand
    save_config(base[1].config, base[1].run_dir / "config.yaml")
    _metrics(base[1].run_dir, 2)
    ckpt = base[1].run_dir / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    p = plan_run(base[1])
    assert p.action == "resume" and p.steps_done == 2 and "step_000002" in p.reason
    assert p.command == ("train", "--resume", *base[1].args[1:])
    # interrupted before its first checkpoint: fresh
    save_config(base[2].config, base[2].run_dir / "config.yaml")
    _metrics(base[2].run_dir, 1)
    assert plan_run(base[2]).action == "fresh"
    # a summary that says done (written by the executor) is trusted; one that says incomplete is retried
    (base[2].run_dir / "summary.json").write_text(json.dumps({"status": "done"}))
    assert plan_run(base[2]).action == "skip"
    (base[2].run_dir / "summary.json").write_text(json.dumps({"status": "incomplete"}))
    assert plan_run(base[2]).action == "fresh"
    # aborted by the NaN guard: a result (a collapse), not retried
    _metrics(base[2].run_dir, 0, abort=True)
    assert plan_run(base[2]).action == "skip" and "NaN guard" in plan_run(base[2]).reason
    # another process holds the run's lock: left alone
    with (base[1].run_dir / ".lock").open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert plan_run(base[1]).action == "busy"
    assert plan_run(base[1]).action == "resume"
    # made with another config: a conflict naming the key (nothing deleted)
    other = load_study(_study(tmp_path, STUDY.replace("[train.steps=4]", "[train.steps=4, train.lr=3e-4]"), "b.yaml"))
    again = [r for r in expand(other, tmp_path / "out", cells=["base"]) if r.seed == 0][0]
    p = plan_run(again)
    assert p.action == "conflict" and "train.lr (was 8e-05, now 0.0003)" in p.reason
    # a run made before a key existed (its config.yaml lacks it) is the same run while the key keeps its default
    saved = yaml.safe_load((base[1].run_dir / "config.yaml").read_text())
    del saved["train"]["dtype"]
    (base[1].run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert plan_run(base[1]).action == "resume"
    later = [r for r in expand(load_study(_study(tmp_path)), tmp_path / "out", ["train.dtype=bf16"],
                               cells=["base"])
             if r.seed == base[1].seed][0]
    assert "train.dtype (was absent, now 'bf16')" in plan_run(later).reason
    # ...but a cold start ignores RL-only keys, and only counts as built with sft.json and its model
    cold = next(r for r in expand(other, tmp_path / "out", cells=["warm"]) if r.kind == "sft")
    save_config(runs["demo/cold/short"].config, cold.run_dir / "config.yaml")
    assert plan_run(cold).action == "fresh"
    (cold.run_dir / "sft.json").write_text("{}")
    (cold.run_dir / "model").mkdir()
    (cold.run_dir / "model" / "config.json").write_text("{}")
    assert plan_run(cold).action == "skip"


def test_estimate_is_runs_times_steps_times_step_time_over_jobs(tmp_path):
    runs = expand(load_study(_study(tmp_path)), tmp_path, cells=["base", "warm"])
    plans = [Plan(r, "fresh", "") for r in runs]
    est = Estimate(seconds_per_step=2.0, sft_seconds_per_step=0.5, seconds_per_run=10.0)
    sft = runs[0].config.sft.steps
    assert estimate_seconds(plans, est, jobs=1) == pytest.approx(6 * (4 * 2.0 + 10) + sft * 0.5 + 10)
    assert estimate_seconds(plans, est, jobs=2, seconds_per_step=1.0) == pytest.approx(
        (6 * (4 * 1.0 + 10) + sft * 0.5 + 10) / 2)
    skip_one = [Plan(runs[1], "skip", ""), Plan(runs[2], "resume", "", steps_done=3)]
    assert estimate_seconds(skip_one, est, jobs=1) == pytest.approx(1 * 2.0 + 10)


TINY = ["train.batch_prompts=2", "train.group_size=4", "engine.max_new_tokens=8", "task.n_heldout=4",
        "task.n_train=16", "train.eval_every=0", "train.fidelity_every=0", "train.steps=1",
        "task.reward=reward_fixtures:has_seven"]


def test_tiny_study_runs_as_subprocesses_reports_a_failure_then_skips_when_rerun(tmp_path, monkeypatch, capsys):
    # the runs import the test reward, and the stablerl of this checkout (not another one installed in the venv)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)]))
    monkeypatch.chdir(tmp_path)
    study = {"name": "tiny", "seeds": [0], "overrides": TINY,
             "cells": {"a": [], "b": ["algo.loss=minirl_no_is", "train.stpes=1"]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    # a bad key anywhere stops everything before the first run
    assert main(["study", str(path), "--out", "out", "--no-progress"]) == 2
    assert "cell 'b' (seed 0): unknown key 'train.stpes'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # b runs, and `broken` fails (its model does not exist): reported in one line, the others finish, exit code 1
    study["cells"] = {"a": [], "b": ["algo.loss=minirl_no_is"], "broken": [f"model={tmp_path / 'nope'}"]}
    path.write_text(yaml.safe_dump(study))
    assert main(["study", str(path), "--out", "out", "--no-progress", "--report", "rep"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    for cell in ("a", "b"):
        d = tmp_path / "out" / "tiny" / cell / "seed0"
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "done" and summary["exit_code"] == 0 and summary["steps_done"] == 1
        assert "OMP_NUM_THREADS=" in (d / "train.log").read_text()
    assert "FAILED tiny/broken/seed0: exit 2: stablerl train: error:" in out and "nope" in out
    assert "2 of 3 runs finished, 1 failed" in out
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "out/tiny/study.yaml").exists()
    # the study's own report quotes its invocation from commands.log, as `stablerl report` does
    assert f"made by `stablerl study {path} --out out`." in (tmp_path / "rep" / "report.md").read_text()
    # rerun of the finished cells: nothing runs again, and their files stay as they were
    before = (tmp_path / "out/tiny/a/seed0/metrics.jsonl").read_bytes()
    assert main(["study", str(path), "--out", "out", "--cells", "a,b", "--no-progress", "--no-report"]) == 0
    assert "0 to run" in " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "out/tiny/a/seed0/metrics.jsonl").read_bytes() == before


def test_ray_executor_without_ray_is_one_line_saying_how_to_install(tmp_path, capsys):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed")
    assert main(["study", str(_study(tmp_path)), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "out").exists()


def test_ray_executor_submits_the_same_command_as_a_task(tmp_path, monkeypatch):
    # the Ray glue only (ray is optional): a stand-in module whose tasks run in a thread, as Ray would run them
    import concurrent.futures
    import dataclasses
    import types

    from stablerl.executor import Pool

    threads = concurrent.futures.ThreadPoolExecutor(1)
    seen = {}

    def remote(num_cpus):
        seen["num_cpus"] = num_cpus
        return lambda fn: types.SimpleNamespace(remote=lambda *a: types.SimpleNamespace(
            future=lambda: threads.submit(fn, *a)))

    fake = types.SimpleNamespace(init=lambda **kw: seen.setdefault("init", kw), remote=remote, cancel=lambda ref: None)
    monkeypatch.setitem(sys.modules, "ray", fake)
    run = expand(load_study(_study(tmp_path)), tmp_path / "out", cells=["base"])[0]
    plan = Plan(dataclasses.replace(run, args=("--help",)), "fresh", "")
    code, seconds = Pool("ray", jobs=1, threads=2).submit(plan).result(timeout=60)
    assert code == 0 and seconds > 0 and seen["num_cpus"] == 2
    assert "OMP_NUM_THREADS=2 stablerl --help" in run.log.read_text()
