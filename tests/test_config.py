"""Config: defaults, YAML + overrides, and one-line errors naming the key (through the CLI)."""

import subprocess
import sys

import pytest

from stablerl.config import Config, ConfigError, check_replay, load_config, to_yaml


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  loss: minirl_lennorm\n  eps_high: 1\ntrain:\n  n_minibatches: 2\n")
    cfg = load_config(f, ["train.steps=7", "engine.numerics=fp32", "engine.stop=['###']"])
    assert cfg.algo.loss == "minirl_lennorm" and cfg.algo.eps_high == 1.0 and isinstance(cfg.algo.eps_high, float)
    assert cfg.train.n_minibatches == 2 and cfg.train.steps == 7 and cfg.engine.numerics == "fp32"
    assert cfg.engine.stop == ("###",)
    assert cfg.train.batch_prompts == Config().train.batch_prompts  # untouched defaults survive
    # the saved YAML reloads to the same config
    (tmp_path / "r.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("algo:\n  lost: minirl\n", "c.yaml:2: unknown key 'algo.lost' (did you mean 'algo.loss'?)"),
        ("train:\n  steps: many\n", "c.yaml:2: train.steps: got 'many', expected an integer"),
        ("engine:\n  numerics: bf17\n", "engine.numerics: got 'bf17', expected one of 'fp32', 'bf16', 'fp16', 'fp8'"),
        ("algo:\n  loss: minirl_noIS\n", "did you mean 'minirl_no_is'"),
        ("train:\n  batch_prompts: 3\n  group_size: 3\n  n_minibatches: 2\n", "does not divide"),
        ("algo: [1, 2]\n", "algo: expected a section"),
        ("train:\n  steps: [\n", "c.yaml:3: invalid YAML"),
        ("sft:\n  eval_every: -5\n", "sft.eval_every: got -5, expected >= 0 (0 = never)"),
        ("sft:\n  eval_problems: 0\n", "sft.eval_problems: got 0, expected >= 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_override_errors_and_replay_on_dense():
    with pytest.raises(ConfigError, match="override algo.replay: got 'R4'"):
        load_config(None, ["algo.replay=R4"])
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match="needs a Mixture-of-Experts model"):
        check_replay(load_config(None, ["algo.replay=R3", "model=tiny-dense"]), is_moe=False)


@pytest.mark.parametrize(
    "text, key", [("algo:\n  los: minirl\n", "algo.los"), ("train:\n  lr: fast\n", "train.lr")]
)
def test_cli_exits_nonzero_with_one_line(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "stablerl", "config", "--config", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "bad.yaml:2" in lines[0], r.stderr
