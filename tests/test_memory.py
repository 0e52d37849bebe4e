"""Host memory (issue 31, stablerl.memory): freed heap goes back to the OS, every step logs mem/rss_gib and
mem/peak_gib, and the guard stops a run near the machine's memory with a checkpoint and one line."""

import subprocess
import sys

import pytest

from stablerl.config import load_config
from stablerl.memory import Limit, activation_bytes_per_token, memory_limit, over_limit, rows_per_pass
from stablerl.metrics import read_metrics
from stablerl.model import PRESETS, ModelConfig
from stablerl.trainer import train

TINY = ["train.batch_prompts=2", "train.group_size=4", "engine.max_new_tokens=12", "task.n_heldout=8",
        "task.n_train=64", "train.eval_every=0", "train.fidelity_every=2", "train.save_every=0"]

# The leak's mechanism, in a fresh process: glibc raises its mmap threshold when a big mmapped block is freed (16 MiB
# here, like a step's activations), so later 1 MiB tensors come from the heap; freed between live blocks, they stay
# resident until malloc_trim. The trainer's per-step `release` must give them back.
FRAGMENT = """
import gc, torch
from stablerl.memory import release, rss_gib
big = torch.empty(2**22); del big
r0 = rss_gib()
held, pins = [], []
for _ in range(256):
    held.append(torch.ones(2**18))  # 1 MiB
    pins.append(torch.ones(2**14))  # 64 KiB kept live between them
del held; gc.collect()
r1 = rss_gib()
kept = release(keep_gib=1.0)  # 256 MiB free: under what a step may keep for the next one, so nothing is trimmed
r2 = rss_gib()
trimmed = release(keep_gib=0.1)  # over it: trimmed
print(r0, r1, r2, rss_gib(), int(kept), int(trimmed))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_release_returns_freed_heap_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    before, freed, kept, released, kept_flag, trimmed = map(float, out.stdout.split())
    assert freed - before > 0.2  # 256 MiB freed by Python, still resident: what grew the run
    assert kept_flag == 0 and kept - freed > -0.02  # kept for the next step (re-faulting it would cost time)
    assert trimmed == 1 and released - before < 0.05  # back to where it started, but the live 16 MiB of pins


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_every_step_logs_memory_and_the_peak_is_the_run_s(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=mem", *TINY, "train.steps=4"])
    res = train(cfg, show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "mem" / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    rss, peak = [r["mem/rss_gib"] for r in rows], [r["mem/peak_gib"] for r in rows]
    assert all(0.05 < x < 64 for x in rss) and all(p >= x for p, x in zip(peak, rss))
    assert peak == sorted(peak)  # the high-water mark only grows
    assert res.peak_rss_gib == peak[-1]
    # bounded: after the first steps nothing accumulates (a217ecf, tiny-moe: +6 MiB of heap per step)
    assert rss[-1] - rss[1] < 0.1


def test_guard_stops_with_a_checkpoint_and_names_the_settings(tmp_path, capsys):
    # a limit every run exceeds: the guard fires after step 1, checkpoints it and stops
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=guard", *TINY, "train.steps=5", "train.max_rss_frac=1e-6"])
    res = train(cfg, show_progress=False)
    assert res.steps == 1
    assert (tmp_path / "guard" / "checkpoints" / "step_000001").is_dir()
    line = capsys.readouterr().out.replace("\n", " ")
    for name in ("train.max_rss_frac", "train.micro_batch_size", "train.batch_prompts", "engine.max_new_tokens"):
        assert name in line


def test_over_limit_line_and_limit_sources(tmp_path):
    cfg = load_config(None, ["train.batch_prompts=16", "engine.max_new_tokens=48"])
    lim = Limit(24.0, "MemTotal")
    assert over_limit({"mem/peak_gib": 21.5}, 0.9, lim, cfg) is None  # 21.5 < 0.9 * 24 = 21.6
    line = over_limit({"mem/peak_gib": 21.7}, 0.9, lim, cfg)
    assert line.startswith("resident memory peaked at 21.7 GiB, train.max_rss_frac=0.9 of the 24.0 GiB limit")
    assert "lower train.activation_gib (now 2) or a train.micro_batch_size" in line
    assert "train.batch_prompts (now 16)" in line
    for over, says in ((["train.micro_batch_size=16"], "lower train.micro_batch_size (now 16)"),
                       (["train.activation_gib=0"], "lower train.micro_batch_size (now all rows)")):
        assert says in over_limit({"mem/peak_gib": 21.7}, 0.9, lim, load_config(None, over))
    assert "engine.max_new_tokens (now 48)" in line
    assert over_limit({"mem/peak_gib": 99.0}, 0.0, lim, cfg) is None  # 0 = off
    # a cgroup limit below MemTotal is the one that counts; "max" means none
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:       25165824 kB\nMemFree: 1 kB\n")
    assert memory_limit(tmp_path) == Limit(24.0, "MemTotal")
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert memory_limit(tmp_path) == Limit(24.0, "MemTotal")
    (tmp_path / "sys/fs/cgroup/memory.max").write_text(f"{8 * 2**30}\n")
    assert memory_limit(tmp_path) == Limit(8.0, "cgroup memory.max")


def test_activation_estimate_by_hand():
    # tiny MoE: h 128, 4 MoE layers of k = 2 experts of width 256, 8 experts: per layer 12*128 + 4*2*256 + 2*2*128 + 8
    # = 4104 floats, x 4 layers x 4 bytes; checkpointed: each layer's input (4*128) + one layer recomputed
    moe = PRESETS["tiny-moe"]
    assert activation_bytes_per_token(moe) == 4 * 4 * 4104 == 65_664
    assert activation_bytes_per_token(moe, checkpointing=True) == 4 * (4 * 128 + 4104) == 18_464
    # SmolLM2-135M's shape (Llama, h 576, MLP 1536, 30 layers): (12*576 + 4*1536) * 30 * 4 = 1,566,720 bytes/token;
    # its issue-31 step (prompt ~40 + 48 tokens = 88) fits 2 GiB / (1,566,720 * 88) = 15.6 -> 15 rows per pass
    smol = ModelConfig(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_experts=0)
    assert activation_bytes_per_token(smol) == 1_566_720
    assert rows_per_pass(smol, 88, 2.0) == 15
    assert rows_per_pass(smol, 88, 0.0) == 0  # no budget: all rows
    assert rows_per_pass(smol, 10**9, 2.0) == 1  # never 0 rows
    # the default tiny MoE step (256 rows, <= 64 + ~20 tokens) runs in one pass, as before the budget existed
    assert rows_per_pass(moe, 84, 2.0) >= 256


def test_auto_micro_batches_are_the_explicit_ones(tmp_path):
    # micro_batch_size 0 resolves to rows_per_pass each step: a budget too small for two rows runs the same passes,
    # so the same floats, as micro_batch_size=1
    def run(name, over):
        cfg = load_config(None, [f"out_dir={tmp_path}", f"name={name}", *TINY, "train.steps=2",
                                 "engine.numerics=fp32", *over])
        train(cfg, show_progress=False)
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))}
                for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    auto = run("auto", ["train.activation_gib=1e-9"])
    assert auto == run("one", ["train.micro_batch_size=1"])
    assert auto != run("all", ["train.activation_gib=0"])  # one pass of all rows: other float sums
