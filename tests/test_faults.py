"""Fault injection: what a crash, a full disk, a dying or hanging reward, a corrupt or hostile checkpoint, a second
process or a changed config do to a run. Each ends in a clear one-line error or a documented recovery, and nothing
already written is lost."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stablerl.checkpoint import CheckpointError, list_checkpoints, load_trainer_state
from stablerl.config import load_config
from stablerl.hf import get_model, save_model
from stablerl.metrics import read_metrics
from stablerl.trainer import train

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
TINY = ["train.batch_prompts=2", "train.group_size=4", "engine.max_new_tokens=12", "task.n_heldout=8",
        "task.n_train=64", "train.eval_every=1", "train.fidelity_every=0", "train.lr=1e-3",
        "task.reward=reward_fixtures:has_seven", "train.save_every=1", "train.keep_checkpoints=10"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, [f"out_dir={tmp_path}", f"name={name}", *TINY, *extra])


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "stablerl", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _one_line_error(r, *needles):
    """The CLI failed with exit code 2 and exactly one stderr line holding every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _steps(rows, key):
    return [r["step"] for r in rows if key in r]


# ---- rewards that die or hang ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, counter", [("kill_worker_on_seven", "reward/errors"),
                                              ("hang_on_seven", "reward/timeouts")])
def test_a_dying_or_hanging_reward_costs_its_items_not_the_run(tmp_path, fixture, counter):
    cfg = _cfg(tmp_path, fixture, "train.steps=3", "train.eval_every=0", "train.save_every=0",
               f"task.reward=reward_fixtures:{fixture}", "task.reward_timeout=1.0")
    res = train(cfg, show_progress=False)
    assert res.steps == 3
    rows = [r for r in read_metrics(tmp_path / fixture / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # a random-init policy writes a '7' in ~12% of 12-token completions: 24 completions make some certain here
    assert sum(r[counter] for r in rows) > 0
    other = "reward/timeouts" if counter == "reward/errors" else "reward/errors"
    assert all(r[other] == 0 for r in rows)


# ---- SIGKILL in the middle of a checkpoint write --------------------------------------------------------------------

DIE_IN_SECOND_SAVE = """
import os, signal, sys
import stablerl.checkpoint as ck
real, calls = ck.save_file, []
def dying(tensors, path, *a, **k):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint's optimizer state: half written, then the process dies
        with open(path, "wb") as f:
            f.write(b"\\0" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
ck.save_file = dying
from stablerl.config import load_config
from stablerl.trainer import train
train(load_config(None, sys.argv[1:]), show_progress=False)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_consistent(tmp_path):
    args = [f"out_dir={tmp_path}", "name=run", *TINY, "train.steps=3"]
    r = subprocess.run([sys.executable, "-c", DIE_IN_SECOND_SAVE, *args], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]  # the torn step_000002 is not a checkpoint
    assert (run / "checkpoints" / ".step_000002.partial").exists()
    assert load_trainer_state(run / "checkpoints" / "step_000001")["step"] == 1
    # the killed run had logged step 2 (metrics and samples) before it died in step 2's checkpoint
    assert 2 in _steps(read_metrics(run / "metrics.jsonl"), "reward/mean")
    res = train(load_config(None, args), resume=True, show_progress=False)
    assert res.steps == 3
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000002", "step_000003"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the leftover was replaced
    rows = read_metrics(run / "metrics.jsonl")
    assert _steps(rows, "reward/mean") == [1, 2, 3] and _steps(rows, "eval/accuracy") == [0, 1, 2, 3]
    samples = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == [0, 1, 2, 3] and all(samples.count(s) == samples.count(0) for s in set(samples))


# ---- a full disk ----------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs, mounted for the test (needs root; skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    args = [*TINY, "train.eval_every=0", "train.lr_schedule=constant"]
    train(load_config(None, [f"out_dir={small_disk}", "name=full", *args, "train.steps=1"]), show_progress=False)
    # fill the disk to within 1 MiB: the log lines of the next steps fit, their checkpoint (>= 13 MB) does not
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (1 << 20)))
    r = _cli("train", "--no-progress", f"out_dir={small_disk}", "name=full", *args, "train.steps=3", "--resume")
    _one_line_error(r, "step_000002", "No space left on device", "free some space", "step_000001 is the latest",
                    "--resume")
    ckpts = small_disk / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"]  # no partial directory left behind
    assert load_trainer_state(ckpts / "step_000001")["step"] == 1
    get_model(ckpts / "step_000001")  # the weights load
    assert _steps(read_metrics(small_disk / "full" / "metrics.jsonl"), "reward/mean") == [1, 2]


# ---- corrupt and hostile checkpoints --------------------------------------------------------------------------------


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    train(_cfg(tmp_path, "c", "train.steps=2", "train.eval_every=0", "train.lr_schedule=constant"),
          show_progress=False)
    weights = tmp_path / "c" / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a crash of another tool or a bad copy
    res = train(_cfg(tmp_path, "c", "train.steps=3", "train.eval_every=0", "train.lr_schedule=constant"),
                resume=True, show_progress=False)
    out = " ".join(capsys.readouterr().out.split())
    assert "step_000002 is unreadable" in out and "model.safetensors" in out and "resuming" in out
    assert res.steps == 3
    assert _steps(read_metrics(tmp_path / "c" / "metrics.jsonl"), "reward/mean") == [1, 2, 3]
    # when nothing loads: one line, exit code 2
    for ck in list_checkpoints(tmp_path / "c"):
        (ck / "trainer_state.json").write_text("{not json")
    r = _cli("train", f"out_dir={tmp_path}", "name=c", *TINY, "train.steps=4", "train.eval_every=0",
             "train.lr_schedule=constant", "--resume")
    _one_line_error(r, "none of the 3 checkpoints", "loads")


class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: what a hostile trainer_state.pt would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_would_run_code_is_never_run(tmp_path):
    model, tok = get_model("tiny-moe")
    ck = tmp_path / "evil" / "checkpoints" / "step_000001"
    save_model(model, ck, tok)
    # the fixture is real: an unrestricted unpickler runs it
    armed = tmp_path / "armed"
    torch.save({"step": 1, "optimizer": _RunsCode(armed)}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)
    assert armed.exists()
    marker = tmp_path / "pwned"
    # the legacy layout (trainer_state.pt only): read with weights_only=True, which refuses the object
    torch.save({"step": 1, "optimizer": _RunsCode(marker)}, ck / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt: unreadable trainer state"):
        load_trainer_state(ck)
    r = _cli("train", f"out_dir={tmp_path}", "name=evil", *TINY, "train.steps=2", "--resume")
    _one_line_error(r, "none of the 1 checkpoints")
    assert not marker.exists()
    # the current layout: a .pt lying next to trainer_state.json is never opened
    opt = torch.optim.AdamW(model.parameters())
    from stablerl.checkpoint import save_checkpoint

    good = save_checkpoint(tmp_path / "ok", 1, model, tok, opt, {"bad_in_row": 0}, keep=2)
    shutil.copy(ck / "trainer_state.pt", good / "trainer_state.pt")
    assert load_trainer_state(good)["step"] == 1 and not marker.exists()


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    from stablerl.checkpoint import save_checkpoint

    model, tok = get_model("tiny-moe")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.tensor([[1, 5, 7]])).logits.sum().backward()
    opt.step()
    ck = save_checkpoint(tmp_path, 7, model, tok, opt, {"bad_in_row": 2}, keep=2)
    state = load_trainer_state(ck)
    assert state["step"] == 7 and state["bad_in_row"] == 2
    want = opt.state_dict()
    assert state["optimizer"]["param_groups"] == want["param_groups"]
    assert state["optimizer"]["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        for k, v in entry.items():
            assert torch.equal(state["optimizer"]["state"][i][k], v)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(state["optimizer"])  # loads into a real optimizer


# ---- the run directory: one writer, a resume that keeps the run what it was -----------------------------------------


def test_a_second_process_on_the_same_run_directory_stops_at_once(tmp_path):
    args = ["train", "--no-progress", f"out_dir={tmp_path}", "name=busy", *TINY, "train.steps=200",
            "train.eval_every=0", "train.save_every=0"]
    first = subprocess.Popen([sys.executable, "-m", "stablerl", *args], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        metrics = tmp_path / "busy" / "metrics.jsonl"
        deadline = time.time() + 120
        while not metrics.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert metrics.exists(), "the first run did not start"
        before = (tmp_path / "busy" / "config.yaml").read_text()
        r = _cli(*args, "train.lr=5e-4")
        _one_line_error(r, "busy", "in use by another stablerl process", f"pid {first.pid}")
        assert (tmp_path / "busy" / "config.yaml").read_text() == before  # the second wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the lock died with its process (SIGKILL included): the directory can be resumed at once
    r = _cli(*args[:-2], "train.steps=1", "--resume")
    assert "in use" not in r.stderr


def test_resume_refuses_a_changed_config_before_touching_the_run_directory(tmp_path):
    train(_cfg(tmp_path, "r", "train.steps=1", "train.eval_every=0"), show_progress=False)
    saved = (tmp_path / "r" / "config.yaml").read_text()
    r = _cli("train", f"out_dir={tmp_path}", "name=r", *TINY, "train.steps=2", "train.eval_every=0",
             "algo.loss=grpo", "--resume")
    _one_line_error(r, "algo.loss (was 'minirl', now 'grpo')", "config.yaml", "train.steps")  # cosine: steps too
    assert (tmp_path / "r" / "config.yaml").read_text() == saved
    # logging keys may change, and so may train.steps under a constant learning rate
    cfg = _cfg(tmp_path, "r2", "train.steps=1", "train.eval_every=0", "train.lr_schedule=constant")
    train(cfg, show_progress=False)
    res = train(_cfg(tmp_path, "r2", "train.steps=2", "train.eval_every=2", "train.lr_schedule=constant"),
                resume=True, show_progress=False)
    assert res.steps == 2
    assert load_config(tmp_path / "r2" / "config.yaml").train.eval_every == 2


# ---- one line for every user-caused failure -------------------------------------------------------------------------


def _saved_model(tmp_path) -> Path:
    model, tok = get_model("tiny-moe")
    save_model(model, tmp_path / "m", tok)
    return tmp_path / "m"


def test_bad_checkpoints_give_one_line_naming_the_file(tmp_path):
    r = _cli("train", f"out_dir={tmp_path}", "model=/nonexistent/dir")
    _one_line_error(r, "/nonexistent/dir", "no such checkpoint directory", "tiny-moe")
    r = _cli("train", f"out_dir={tmp_path}", "model=/nonexistent/dir", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug shows where
    m = _saved_model(tmp_path)
    weights = m / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(_cli("eval", "--model", str(m)), str(weights), "truncated or corrupt")
    m = _saved_model(tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["hidden_size"]
    (m / "config.json").write_text(json.dumps(cfg))
    _one_line_error(_cli("info", "--model", str(m)), "config.json: missing key(s) hidden_size")
    (m / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128, "model_type": "gpt2"}))
    _one_line_error(_cli("info", "--model", str(m)), "config.json", "model_type 'gpt2' is not supported")
    (m / "config.json").write_text('{"model_type": "qwen3_moe",\n "vocab_size": }')
    _one_line_error(_cli("info", "--model", str(m)), "config.json:2", "invalid JSON")
    (m / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    _one_line_error(_cli("info", "--model", str(m)), "weights do not match config.json", "model.embed_tokens.weight")
    os.remove(m / "config.json")
    _one_line_error(_cli("info", "--model", str(m)), "config.json: missing")


def test_an_unwritable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _cli("train", f"out_dir={blocker}", "name=x", *TINY, "train.steps=1")
    _one_line_error(r, str(blocker), "Not a directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    cmd = [sys.executable, "-m", "stablerl", "train", f"out_dir={locked}", "name=x", *TINY, "train.steps=1"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that let it
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh: cannot provoke 'permission denied'")
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", " ".join(map(shlex.quote, cmd))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    _one_line_error(r, str(locked / "x"), "Permission denied", "check the file's permissions")


def test_a_fresh_run_never_mixes_with_an_earlier_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path, "again", "train.steps=2", "train.eval_every=0"), show_progress=False)
    r = _cli("train", f"out_dir={tmp_path}", "name=again", *TINY, "train.steps=1", "train.eval_every=0")
    _one_line_error(r, "holds an earlier run (2 checkpoint(s)", "--resume continues it", "--overwrite")
    assert [p.name for p in list_checkpoints(tmp_path / "again")] == ["step_000001", "step_000002"]  # untouched
    train(_cfg(tmp_path, "again", "train.steps=1", "train.eval_every=0"), show_progress=False, overwrite=True)
    run = tmp_path / "again"
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert _steps(read_metrics(run / "metrics.jsonl"), "reward/mean") == [1]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1]  # no event of the earlier run left in tb/
