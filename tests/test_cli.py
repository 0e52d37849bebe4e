"""The CLI end to end on tiny inputs: cold-start SFT, eval reproducing its accuracy, and bad dataset files."""

import json
import subprocess
import sys

import pytest

from stablerl.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "stablerl", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "name, content, where, what",
    [
        ("missing.jsonl", '{"prompt": "Q: 1+1\\n", "answer": "2"}\n{"prompt": "Q: 2+2\\n"}\n', ":2:", "'answer'"),
        ("wrongtype.jsonl", '{"prompt": ["Q: 1+1"], "answer": "2"}\n', ":1:", "'prompt'"),
        ("empty.jsonl", "", "empty.jsonl", "empty"),
        ("broken.jsonl", '{"prompt": "Q: 1+1\\n", "answer": "2"}\n{"prompt": \n', ":2:", "JSON"),
        ("bad.csv", "prompt,answer\nQ: 1+1,2,extra\n", ":2", ""),
    ],
)
def test_eval_bad_data_file_one_line_error(tmp_path, name, content, where, what):
    f = tmp_path / name
    f.write_text(content)
    r = _cli("eval", "--model", "tiny-moe", "--data", str(f))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert name in lines[0] and where in lines[0] and what in lines[0], lines[0]


def test_eval_unreadable_and_missing_file(tmp_path):
    r = _cli("eval", "--model", "tiny-moe", "--data", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    r = _cli("eval", "--model", "tiny-moe", "--data", str(f))
    assert r.returncode == 2 and "latin1.jsonl" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sft_then_eval_reproduces_its_accuracy(tmp_path, capsys):
    # a short SFT on an easy variant of the default task, so that accuracy is well above 0 in seconds
    knobs = ["task.knobs={digits: 1, n_terms: 3}", "task.n_train=64", "task.n_heldout=24"]
    assert main(["sft", f"out_dir={tmp_path}", "name=cold", "sft.steps=60", "sft.batch_size=32", "sft.style=long",
                 "sft.eval_every=25", "sft.eval_problems=8", *knobs]) == 0
    summary = json.loads((tmp_path / "cold" / "sft.json").read_text())
    # the learning curve: held-out accuracy on the first 8 problems after 25 and 50 steps, then all 24 at the end
    evals = [r for r in map(json.loads, (tmp_path / "cold" / "metrics.jsonl").read_text().splitlines())
             if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [25, 50, 60]
    assert all(r["eval/accuracy"] in {k / 8 for k in range(9)} for r in evals[:2])
    assert evals[-1]["eval/accuracy"] == summary["heldout_accuracy"]
    written = {p.name for p in (tmp_path / "cold" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= written
    out = tmp_path / "eval.json"
    # the same held-out problems through the eval CLI: the built-in task with the same knobs
    from stablerl.config import TaskConfig
    from stablerl.data import write_jsonl
    from stablerl.tasks import task_examples

    ex = task_examples(TaskConfig(knobs={"digits": 1, "n_terms": 3}, n_heldout=24), "heldout")
    write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": e.prompt, "answer": e.answer} for e in ex])
    assert main(["eval", "--model", str(tmp_path / "cold" / "model"), "--data", str(tmp_path / "heldout.jsonl"),
                 "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["n"] == summary["n_heldout"] == 24
    assert got["accuracy"] == summary["heldout_accuracy"]
    assert 0 < got["accuracy"]


@pytest.mark.slow
def test_quickstart_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    tiny = [f"out_dir={tmp_path}", "name=qs", "task.knobs={digits: 1, n_terms: 3}", "task.n_train=64",
            "task.n_heldout=16", "sft.steps=6", "sft.batch_size=16", "train.steps=2", "train.batch_prompts=2",
            "train.group_size=4", "engine.max_new_tokens=16", "train.fidelity_every=0"]
    assert main(["quickstart", "--no-progress", *tiny]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["rl_steps"] == 2 and summary["cold_start"] == str(tmp_path / "qs-sft" / "model")
    assert (tmp_path / "qs" / "curves.png").exists() and (tmp_path / "qs-sft" / "curves.png").exists()
    # the summary is read from the run's own files: its first and last eval rows
    evals = [r for r in map(json.loads, (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines())
             if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert summary["cold_start_accuracy"] == evals[0]["eval/accuracy"]
    assert summary["final_mean_length"] == evals[-1]["eval/mean_length"]
    assert summary["gain_points"] == pytest.approx(100 * (evals[-1]["eval/accuracy"] - evals[0]["eval/accuracy"]))
    assert "stablerl quickstart" in out and "greedy response length" in out
    # a second run reuses the cold start instead of training it again, and says so when that cold start is too weak
    sft_json = tmp_path / "qs-sft" / "sft.json"
    sft_json.write_text(json.dumps({**json.loads(sft_json.read_text()), "heldout_accuracy": 0.006}))
    assert main(["quickstart", "--no-progress", *tiny]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "reusing" in out and "the cold start scores 0.6% held-out, below 5%: its SFT may not have taken" in out


# ---- flags anywhere among the overrides (issue 30, item 3) ------------------------------------------------------


def test_flags_between_overrides_are_accepted(capsys):
    # `stablerl config a=1 --debug b=2`: refused before ("unrecognized arguments: b=2"), both overrides apply now
    assert main(["config", "name=w2", "train.steps=1", "--debug", "train.batch_prompts=2"]) == 0
    out = capsys.readouterr().out
    assert "name: w2" in out and "steps: 1" in out and "batch_prompts: 2" in out


@pytest.mark.parametrize("name, first, flag", [
    ("config", [], ["--config", "x.yaml"]), ("train", [], ["--no-progress"]), ("sft", [], ["--name", "n"]),
    ("quickstart", [], ["--no-progress"]), ("study", ["s.yaml"], ["--dry-run"]), ("reproduce", [], ["--full"]),
])
def test_every_command_with_overrides_takes_flags_anywhere(name, first, flag):
    from stablerl.cli import command_parser

    _, p = command_parser(name)
    for argv in ([*first, "a=1", *flag, "b=2"], [*first, *flag, "a=1", "b=2"], [*first, "a=1", "b=2", *flag]):
        assert p.parse_intermixed_args(argv).overrides == ["a=1", "b=2"], argv
