"""The one typed config: every hyperparameter of stablerl, its default and its allowed values, in one place.

Loaded as defaults <- YAML file <- `key.sub=value` command-line overrides, validated field by field; an unknown
key or a bad value raises `ConfigError` naming the file:line, the key, the value and what is allowed (with a
closest-match suggestion for typos). The resolved config is written as `config.yaml` in each run directory.

A new key's default must keep the behaviour from before the key existed: a run saved without it then still counts
as the same run (checkpoint.config_changes), so a resume or a study goes on across versions of stablerl.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stablerl.algorithm import LOSSES, make_hp
from stablerl.errors import UserError
from stablerl.tasks import get_task
from stablerl.util import write_text_atomic
from stablerl.warning import check_rules

Numerics = Literal["fp32", "bf16", "fp16", "fp8"]
# Field metadata. RESUMABLE: a resumed run may change the key (when to log, evaluate, probe and save, how long a
# reward may take); every other key defines the run (its math, data, model, schedule), and a resumed run that changed
# it would be a different run (checkpoint.check_resume_config). SFT: a cold start (SFT) reads the key or the whole
# section, so a change of it makes a built cold start stale; a change of an RL key (train.lr, algo.*) must not
# (executor.config_diff).
RESUMABLE = types.MappingProxyType({"resumable": True})
SFT = types.MappingProxyType({"sft": True})


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    """Inference engine (rollouts). Its numerics are the source of the training–inference discrepancy (E3)."""

    backend: Literal["native", "vllm"] = "native"  # who samples: stablerl's engine, or vLLM (pip install -e ".[vllm]")
    numerics: Numerics = "bf16"  # weights/activations of the sampler; fp8 = e4m3 emulation
    temperature: float = 1.0  # the paper samples at 1 with no truncation
    top_p: float = 1.0  # 1 = no nucleus truncation; logp_old/logp use the same truncated support
    top_k: int = 0  # 0 = no top-k truncation
    max_new_tokens: int = field(default=64, metadata=SFT)
    stop: tuple[str, ...] = ()  # stop strings (EOS always stops)
    # engine-only discrepancy dial (E3): projection/expert weights rounded to this many bits per output channel
    # (int8, int4 ... as quantised-rollout systems sample), then the numerics above; 0 = off. Native backend only.
    weight_bits: int = 0


@dataclass(frozen=True)
class AlgoConfig:
    """The objective (E4–E7). See docs/algorithms.md for each loss."""

    loss: str = "minirl"  # a name in stablerl.algorithm's registry
    adv_mode: Literal["mean", "mean_std", "loo"] = "mean"  # E4 group baseline
    eps_low: float = 0.2  # E5 clip band on the staleness ratio r = π_θ/π_θold
    eps_high: float = 0.28
    is_rule: Literal["none", "truncate", "mask"] = "none"  # discrepancy-weight rule (TIS / MIS)
    is_trunc: float = 2.0  # truncate cap c
    is_low: float = 0.5  # mask band
    is_high: float = 2.0
    replay: Literal["none", "R2", "R3"] = "none"  # E7 Routing Replay (MoE only)


@dataclass(frozen=True)
class TrainConfig:
    """The RL loop (E8: B prompts x G samples per global step, split into N mini-batch updates)."""

    steps: int = 60  # from the default cold start: +36..+70 held-out points over six seeds (docs/log.md 2026-12-01)
    batch_prompts: int = 32  # B; at 16 the default cold start's greedy accuracy did not move in 150 steps (docs/log.md)
    group_size: int = 8  # G
    n_minibatches: int = 1  # N; 1 = on-policy
    dtype: Literal["fp32", "bf16"] = "fp32"  # training forward: bf16 = autocast, weights and Adam state stay fp32
    # memory knobs (the same math up to float summation order): a run stopped by train.max_rss_frac resumes with less
    micro_batch_size: int = field(default=0, metadata=RESUMABLE)  # rows per forward/backward in an E8 mini-batch,
    # gradients accumulated (0 = as many as fit train.activation_gib: all rows of the tiny MoE, ~15 of SmolLM2-135M)
    activation_gib: float = field(default=2.0, metadata=RESUMABLE)  # with micro_batch_size 0: the estimated saved
    # activations of one pass stay under this (stablerl.memory.rows_per_pass); 0 = all rows at once
    activation_checkpointing: bool = field(default=False, metadata=RESUMABLE)  # recompute each layer in backward
    logit_chunk: int = field(default=0, metadata=RESUMABLE)  # response tokens per LM-head chunk (0 = ~64 MiB of fp32
    # logits): flat in V
    lr: float = 8e-5  # peak; 1e-4 at a constant rate broke the 2026-11-25 cold start at B=16 (docs/log.md)
    warmup_steps: int = 10  # linear warmup: Adam's first steps move every weight by ~lr
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # after warmup; cosine ends at 10% of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    # on-policy (N = 1), the rows with Â = 0 need θ_old's log-probs only for the diagnostics (kl/*, entropy/mean,
    # route/infer_vs_train/*, guard/outside_support_frac); with k > 0 at most k of them (a uniform draw of the step)
    # are scored, and weighted by (rows with Â = 0) / k, so a token mean keeps its meaning (mean over every response
    # token of the batch), estimated; maxima (kl/max_abs_log_ratio) are then over the rows scored. 0 = every row.
    # With top-p/top-k sampling every row is scored (E5's normaliser counts the tokens in the trainer's support).
    diag_rows: int = 0
    # held-out greedy accuracy every k steps (0 = only at the start and end)
    eval_every: int = field(default=20, metadata=RESUMABLE)
    fidelity_every: int = field(default=10, metadata=RESUMABLE)  # E9 first-order fidelity probe every k steps (0=never)
    # which E8 mini-batches a probe step measures: the most stale one, or each (logged per index j as
    # fidelity/<stat>/mb<j>: how the replay's bias grows with staleness; one more probe per mini-batch)
    fidelity_minibatches: Literal["last", "all"] = field(default="last", metadata=RESUMABLE)
    save_every: int = field(default=10, metadata=RESUMABLE)
    keep_checkpoints: int = field(default=2, metadata=RESUMABLE)
    max_bad_steps: int = field(default=3, metadata=RESUMABLE)  # abort after this many NaN/Inf steps in a row
    # stop (after a checkpoint) once the run's peak resident set reaches this fraction of the machine's memory (its
    # cgroup limit, else MemTotal), naming the settings to lower, instead of being killed by the OOM killer (0 = off)
    max_rss_frac: float = field(default=0.9, metadata=RESUMABLE)
    samples_per_eval: int = field(default=4, metadata=RESUMABLE)  # prompts/completions to samples.jsonl per eval
    # early warning (stablerl.warning): rules '<metric><op><threshold>', e.g. kl/k3>0.01, route/cross_step/mean<0.97;
    # one warning per excursion, printed and logged as warn/<metric>; which signals lead collapse: docs/results
    warn_on: tuple[str, ...] = field(default=(), metadata=RESUMABLE)
    # checkpoint / stop (after a checkpoint)
    on_warning: Literal["continue", "checkpoint", "stop"] = field(default="continue", metadata=RESUMABLE)
    # rows whose routing θ_{t-1} vs θ_t is compared each step (MoE; 0 = off)
    cross_step_rows: int = field(default=64, metadata=RESUMABLE)
    # under torchrun (stablerl train --nproc P): DDP replicates the weights, FSDP2 shards them (and the Adam state)
    # per decoder layer; same updates either way (docs/scaling.md). Ignored by a single process.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # seconds a collective waits for the other ranks before the job stops (> any eval)
    dist_timeout: float = field(default=1800.0, metadata=RESUMABLE)


@dataclass(frozen=True)
class SFTConfig:
    """Cold-start supervised fine-tuning on solution traces (loss on response tokens only)."""

    # trace style (long | short | answer) or a per-example mixture. The default mixes worked solutions with bare
    # answers, as real SFT sets mix reasoning and non-reasoning data: the cold start can solve the task when it
    # writes the scratchpad (59-99% right there over six seeds) but often answers bare, and RL has to find out that
    # the scratchpad pays (docs/log.md 2026-12-01). `long` alone: 53-77% held-out after 480 steps, +10 from RL.
    style: str = "long:0.5,answer:0.5"
    # ~64 scratchpads per step, 30k in all: with ~10k (40/60, batch 64, 400 steps) the scratchpad did not take for
    # seed 1 (docs/log.md 2026-11-29); with this it did for seeds 0-4, half for seed 5 (59% right)
    steps: int = 480
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast, fp32 master weights
    micro_batch_size: int = 0  # rows per forward/backward of a step, gradients accumulated (0 = all)
    eval_every: int = 60  # held-out greedy accuracy on eval_problems every k steps (0 = only at the end)
    eval_problems: int = 256  # the first k held-out problems, for the learning curve (the end uses all n_heldout)


@dataclass(frozen=True)
class TaskConfig:
    """What to train and evaluate on: a built-in task or a dataset file."""

    name: str = "arith"  # built-in task (stablerl.tasks)
    data: str | None = None  # JSONL / Parquet / CSV file instead of a built-in task
    heldout_data: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    knobs: dict = field(default_factory=dict)  # difficulty knobs of the built-in task, e.g. {digits: 4, n_terms: 3}
    n_train: int = 4096
    n_heldout: int = 1024  # greedy accuracy to ~1.5 points (s.e.); 256 problems gave 55.9% where 1,024 gave 60.3%
    reward: str | None = None  # reward fn name or "package.module:function"; None = the task's own (math for files)
    reward_timeout: float = field(default=5.0, metadata=RESUMABLE)
    # render dataset prompts with the checkpoint's chat template, as transformers'
    # apply_chat_template(add_generation_prompt=True) does; needs a checkpoint whose tokenizer has one
    chat_template: bool = False
    system_prompt: str | None = None  # system message of the chat template's conversation (only with chat_template)


@dataclass(frozen=True)
class Config:
    name: str = "run"  # run directory name under out_dir
    out_dir: str = field(default="runs", metadata=RESUMABLE)
    seed: int = field(default=0, metadata=SFT)
    model: str = field(default="tiny-moe", metadata=SFT)  # preset name, checkpoint directory or hub id
    # auto = cuda when available; model, engine, trainer, SFT, eval
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=SFT)
    init: str | None = None  # RL: start from this checkpoint (e.g. the cold-start SFT output) instead of `model`
    engine: EngineConfig = field(default_factory=EngineConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig, metadata=SFT)
    task: TaskConfig = field(default_factory=TaskConfig, metadata=SFT)

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def marked(mark: str, cls=Config, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys whose field carries the metadata `mark` (RESUMABLE, SFT); a marked section as its prefix `name.`."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(hints[f.name])
        if f.metadata.get(mark):
            out.append(f"{prefix}{f.name}." if section else f"{prefix}{f.name}")
        elif section:
            out += marked(mark, hints[f.name], f"{prefix}{f.name}.")
    return tuple(out)


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """The learning rate of `step` (RL and SFT): linear warmup over `warmup` steps, then constant, or a cosine decay
    that reaches 10% of `base` at `total`."""
    if schedule == "constant":
        return base * min(1.0, (step + 1) / max(1, warmup))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_hp(cfg: Config) -> dict:
    """The loss's hyperparameters (algorithm.LossHP's fields): the algo section, and E5's C from the engine's
    max_new_tokens."""
    a = cfg.algo
    return dict(eps_low=a.eps_low, eps_high=a.eps_high, max_tokens=cfg.engine.max_new_tokens, is_rule=a.is_rule,
                is_trunc=a.is_trunc, is_low=a.is_low, is_high=a.is_high)


# ---- loading and validation ----------------------------------------------------------------------------------


def _allowed(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_allowed(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(tp, value, key: str, where: str):
    """Check `value` against the annotation `tp`, converting what is unambiguous (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}{key}: got {value!r}, expected {_allowed(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        raise ConfigError(f"{bad}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key, where)
            except ConfigError:
                pass
        raise bad
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if origin is tuple:
        if isinstance(value, str) and typing.get_args(tp) == (str, ...):
            value = [value]  # one string for a list of strings (train.warn_on='kl/k3>0.01'): a one-element list
        if not isinstance(value, list | tuple):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}{key}: got {value!r}, expected a list of {len(args)}")
        return tuple(_coerce(a, v, key, where) for a, v in zip(args, value))
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string; it is plainly a number
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _build(cls, data: dict, prefix: str, lines: dict[str, str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        where = lines.get(full, "")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{where}unknown key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{full}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.", lines)
        else:
            kwargs[key] = _coerce(tp, value, full, where)
    return cls(**kwargs)


def _line_map(text: str, path: str) -> dict[str, str]:
    """dotted key -> 'file:line: ' so errors point into the YAML."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = f"{path}:{k.start_mark.line + 1}: "
                walk(v, key + ".")

    walk(yaml.compose(text), "")
    return out


def _set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
        d = nxt
    d[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """defaults (or `base`) <- YAML at `path` <- overrides like `algo.loss=minirl_no_is` (values parsed as YAML)."""
    data: dict = dataclasses.asdict(base) if base is not None else {}
    lines: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        text, loaded = read_yaml(p, "config")
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        lines = _line_map(text, str(p))
        _merge(data, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. algo.loss=minirl")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
        lines[key.strip()] = "override "
    cfg = _build(Config, data, "", lines)
    validate(cfg)
    return cfg


def read_yaml(path: Path, what: str) -> tuple[str, Any]:
    """(text, parsed value) of a YAML file; ConfigError naming file:line for an unreadable or invalid one."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{at}: invalid YAML ({getattr(e, 'problem', e)})") from None


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def validate(cfg: Config) -> None:
    """Cross-field checks: combinations that cannot work fail before any compute is spent."""
    if cfg.algo.loss not in LOSSES:
        close = difflib.get_close_matches(cfg.algo.loss, list(LOSSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"algo.loss: got {cfg.algo.loss!r}, expected one of {', '.join(LOSSES)}{hint}")
    t = cfg.train
    for key, v in (("train.steps", t.steps), ("train.batch_prompts", t.batch_prompts),
                   ("train.group_size", t.group_size), ("train.n_minibatches", t.n_minibatches),
                   ("engine.max_new_tokens", cfg.engine.max_new_tokens), ("sft.steps", cfg.sft.steps),
                   ("sft.batch_size", cfg.sft.batch_size), ("sft.eval_problems", cfg.sft.eval_problems)):
        if v < 1:
            raise ConfigError(f"{key}: got {v}, expected >= 1")
    for key, v, zero in (("train.micro_batch_size", t.micro_batch_size, "as many as fit train.activation_gib"),
                         ("sft.micro_batch_size", cfg.sft.micro_batch_size, "all rows at once"),
                         ("train.logit_chunk", t.logit_chunk, "~64 MiB of logits")):
        if v < 0:
            raise ConfigError(f"{key}: got {v}, expected >= 0 (0 = {zero})")
    if not t.activation_gib >= 0:
        raise ConfigError(f"train.activation_gib: got {t.activation_gib}, expected >= 0 (0 = all rows at once)")
    for key, v in (("train.eval_every", t.eval_every), ("train.fidelity_every", t.fidelity_every),
                   ("train.save_every", t.save_every), ("sft.eval_every", cfg.sft.eval_every)):
        if v < 0:
            raise ConfigError(f"{key}: got {v}, expected >= 0 (0 = never)")
    if (t.batch_prompts * t.group_size) % t.n_minibatches:
        raise ConfigError(f"train.n_minibatches: {t.n_minibatches} does not divide batch_prompts x group_size = "
                          f"{t.batch_prompts * t.group_size} (E8 needs equal mini-batches)")
    if not 0 < cfg.engine.top_p <= 1:
        raise ConfigError(f"engine.top_p: got {cfg.engine.top_p}, expected 0 < top_p <= 1")
    if cfg.engine.weight_bits and not 2 <= cfg.engine.weight_bits <= 8:
        raise ConfigError(f"engine.weight_bits: got {cfg.engine.weight_bits}, expected 0 (off) or 2..8")
    if cfg.engine.temperature < 0:
        raise ConfigError(f"engine.temperature: got {cfg.engine.temperature}, expected >= 0")
    try:  # the loss's own hyperparameter checks, run at load time so a bad value fails before any compute
        make_hp(**loss_hp(cfg))
    except ValueError as e:
        raise ConfigError(f"algo.{e}") from None
    try:  # each rule watches a metric of the registry (stablerl.metrics): a misspelled one would never fire
        check_rules(t.warn_on)
    except ValueError as e:
        raise ConfigError(f"train.warn_on: {e}") from None
    if t.diag_rows < 0:
        raise ConfigError(f"train.diag_rows: got {t.diag_rows}, expected >= 0 (0 = every row)")
    if t.cross_step_rows < 0:
        raise ConfigError(f"train.cross_step_rows: got {t.cross_step_rows}, expected >= 0 (0 = off)")
    if t.dist_timeout <= 0:
        raise ConfigError(f"train.dist_timeout: got {t.dist_timeout}, expected > 0 seconds")
    if t.lr <= 0 or cfg.sft.lr <= 0:
        raise ConfigError("train.lr / sft.lr: expected > 0")
    if cfg.task.system_prompt is not None and not cfg.task.chat_template:
        raise ConfigError("task.system_prompt: set, but task.chat_template is false (the system prompt is a message "
                          "of the chat template); set task.chat_template=true")


def task_reward(task: TaskConfig) -> str:
    """The reward function a task config means: explicit, else the built-in task's own, else math for files."""
    if task.reward is not None:
        return task.reward
    if task.data is not None:
        return "math"
    return get_task(task.name, **task.knobs).reward


def check_replay(cfg: Config, is_moe: bool) -> None:
    """R2/R3 replay experts: they need a MoE model (called once the model is loaded)."""
    if cfg.algo.replay != "none" and not is_moe:
        raise ConfigError(f"algo.replay: {cfg.algo.replay} needs a Mixture-of-Experts model; {cfg.model!r} is dense "
                          "(use algo.replay=none)")


def to_yaml(cfg: Config) -> str:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_yaml(cfg))
