"""The study definition (DESIGN §2 grid): a base config, named cells of `key=value` overrides and a list of seeds,
expanded into one run per (cell, seed), each checked against the typed config before anything runs, with the
assumed timings of the time estimate.

A study is a YAML file (the paper's grid: stablerl/studies/quick.yaml and full.yaml; format in docs/reproduce.md).
Runs are `<out>/<study>/<cell>/seed<k>` (`stablerl train`) and `<out>/<study>/cold/<name>` (cold starts, built once
each by `stablerl sft` before any cell that starts from them). Executing runs is stablerl/executor.py (driven by
stablerl.study.run); reading their results is stablerl.study.summary and stablerl.study.report. Nothing here imports
the trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stablerl.config import Config, ConfigError, load_config, read_yaml
from stablerl.errors import UserError
from stablerl.study.summary import collapse_rule
from stablerl.study.verdicts import finding_roles

STUDIES = Path(__file__).parent.parent / "studies"  # the studies shipped with stablerl (`stablerl reproduce`)
RESERVED = ("seed", "name", "out_dir", "init")  # set by the study itself: its seeds, run names, --out, cold starts
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # cell / cold start / study names: path components, no dots or slashes
TOP_KEYS = ("name", "base", "overrides", "seeds", "cold_starts", "init", "cells", "sweeps", "findings", "estimate",
            "collapse")


@dataclass(frozen=True)
class Estimate:
    """Assumed timings (2 cores, docs/log.md) for the time estimate until the study's own runs have measured them."""

    seconds_per_step: float = 2.0  # one RL step of the default recipe: 1.56-1.89 s measured alone on 2 threads
    sft_seconds_per_step: float = 0.4  # the default cold start: 480 steps in ~193 s
    seconds_per_run: float = 30.0  # start-up, held-out evals and checkpoints of one run


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: tuple[str, ...]
    init: str | None  # a cold start's name; None: the run starts from the config's `model`
    where: str  # "file:line: " of its definition, for errors
    sweep: str | None = None  # the sweep that made it, and its (axis, value) pairs
    axes: tuple[tuple[str, str], ...] = ()
    seeds: tuple[int, ...] | None = None  # its own seeds (a cell a verdict turns on gets more); None: the study's


@dataclass(frozen=True)
class Finding:
    """A claim of the paper, tested by a verdict rule of stablerl.study.verdicts over the cells that play its roles."""

    name: str
    rule: str
    roles: dict[str, Any]  # role -> cell name, list of cell names, or sweep name (per the rule's ROLES)
    claim: str = ""
    where: str = ""


@dataclass(frozen=True)
class Study:
    name: str
    path: Path | None
    base: Path | None  # config YAML under every run
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    cold_starts: dict[str, tuple[str, ...]]
    init: str | None  # default cold start of the cells
    cells: dict[str, Cell]
    sweeps: dict[str, dict[str, tuple[str, ...]]]  # sweep -> axis -> values in order
    findings: dict[str, Finding]
    estimate: Estimate = field(default_factory=Estimate)
    collapse: dict[str, Any] = field(default_factory=dict)  # CollapseRule fields; defaults in stablerl.study.summary
    text: str = ""  # the file as written, copied next to the runs
    lines: dict[tuple, str] = field(default_factory=dict, repr=False)  # key path -> "file:line: "

    def seeds_of(self, cell: str) -> tuple[int, ...]:
        """The seeds the study runs for `cell`: its own, else the study's (also for a cell it does not define)."""
        c = self.cells.get(cell)
        return (c.seeds if c else None) or self.seeds


@dataclass(frozen=True)
class Run:
    name: str  # <study>/<cell>/seed<k> or <study>/cold/<cold start>
    kind: Literal["sft", "train"]
    cell: str  # the cell, or the cold start's name
    seed: int
    args: tuple[str, ...]  # after `stablerl`: the command that makes this run (its flags come first)
    config: Config
    needs: str | None = None  # the run name of the cold start it starts from

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def steps(self) -> int:
        return self.config.sft.steps if self.kind == "sft" else self.config.train.steps

    @property
    def log(self) -> Path:
        return self.run_dir / f"{self.kind}.log"


# ---- loading ----------------------------------------------------------------------------------------------------


def _lines(text: str, path: str) -> dict[tuple, str]:
    """(key path, with list indices) -> 'file:line: ', so errors point into the study file."""
    out: dict[tuple, str] = {}

    def walk(node, prefix: tuple) -> None:
        out[prefix] = f"{path}:{node.start_mark.line + 1}: "
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, (*prefix, k.value))
                out[(*prefix, k.value)] = f"{path}:{k.start_mark.line + 1}: "
                if isinstance(k, yaml.ScalarNode) and not k.style:  # the key as loaded too: `off` is False in YAML
                    key = yaml.safe_load(k.value)
                    if isinstance(key, bool | int | float):
                        out[(*prefix, key)] = out[(*prefix, k.value)]
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*prefix, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


class _Reader:
    """Typed access to the parsed study with errors naming file:line and the key."""

    def __init__(self, lines: dict[tuple, str], path: str):
        self.lines, self.path = lines, path

    def err(self, keys: tuple, msg: str) -> ConfigError:
        where = self.lines.get(keys) or f"{self.path}: "
        return ConfigError(f"{where}{'.'.join(map(str, keys))}: {msg}")

    def mapping(self, value, keys: tuple, allowed: tuple[str, ...] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.err(keys, f"expected a mapping, got {value!r}")
        for k in value:
            if allowed is not None and k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.err((*keys, k), f"unknown key ({hint})")
        return value

    def overrides(self, value, keys: tuple) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err(keys, f"expected a list of key=value overrides, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item:
                raise self.err((*keys, i), f"expected key=value (e.g. algo.loss=minirl_no_is), got {item!r}")
            key = item.split("=", 1)[0].strip()
            if key in RESERVED:
                raise self.err((*keys, i), f"'{key}' is set by the study (seeds, run names, --out, cold starts via "
                                           "init:), not by an override; remove it")
            if key.startswith("sft.") and keys[0] != "cold_starts":  # RL runs never read sft.*: it would be lost
                raise self.err((*keys, i), f"'{key}' would be ignored: the RL runs do no SFT, and cold starts take "
                                           "only their own lists; put it under cold_starts: <name>: [...] (or on the "
                                           "command line, which reaches the cold starts too)")
        return tuple(value)

    def seeds(self, value, keys: tuple) -> tuple[int, ...]:
        if not isinstance(value, list) or not value or not all(type(s) is int for s in value) \
                or len(set(value)) != len(value):
            raise self.err(keys, f"expected a list of distinct integers, got {value!r}")
        return tuple(value)

    def name(self, value, keys: tuple) -> str:
        if not isinstance(value, str) or not NAME.match(value) or value == "cold":
            yaml11 = " (YAML reads unquoted on/off/yes/no as true/false: quote it)" if isinstance(value, bool) else ""
            raise self.err(keys, f"bad name {value!r}: letters, digits, '_' and '-' only, not 'cold'{yaml11}")
        return value


def load_study(path: str | Path) -> Study:
    """Parse a study file; ConfigError naming file:line and the key for anything malformed. Run configs are checked
    by `expand`, which builds every (cell, seed) config before anything runs."""
    p = Path(path)
    text, data = read_yaml(p, "the study")
    r = _Reader(_lines(text, str(p)), str(p))
    data = r.mapping(data, (), TOP_KEYS)
    if "name" not in data:
        raise ConfigError(f"{p}: a study needs a name (its runs go to <out>/<name>/)")
    seeds = r.seeds(data.get("seeds", [0]), ("seeds",))
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise r.err(("base",), f"expected a config YAML path or null, got {base!r}")
    cold = {r.name(k, ("cold_starts", k)): r.overrides(v, ("cold_starts", k))
            for k, v in r.mapping(data.get("cold_starts"), ("cold_starts",)).items()}
    init = data.get("init")
    if init is not None and init not in cold:
        raise r.err(("init",), f"{init!r} is not a cold start (defined: {', '.join(cold) or 'none'})")
    cells: dict[str, Cell] = {}
    for k, v in r.mapping(data.get("cells"), ("cells",)).items():
        cells[r.name(k, ("cells", k))] = _cell(r, k, v, ("cells", k), init, cold)
    sweeps: dict[str, dict[str, tuple[str, ...]]] = {}
    for k, v in r.mapping(data.get("sweeps"), ("sweeps",)).items():
        sweeps[r.name(k, ("sweeps", k))], made = _sweep(r, k, v, init, cold)
        for c in made:
            if c.name in cells:
                raise r.err(("sweeps", k), f"makes cell {c.name!r}, already defined")
            cells[c.name] = c
    if not cells:
        raise r.err(("cells",), "a study needs at least one cell")
    findings = {}
    for k, v in r.mapping(data.get("findings"), ("findings",)).items():
        v = r.mapping(v, ("findings", k), ("rule", "roles", "claim"))
        if not isinstance(v.get("rule"), str):
            raise r.err(("findings", k), "needs rule: <a verdict rule of stablerl.study.verdicts>")
        findings[str(k)] = Finding(str(k), v["rule"], r.mapping(v.get("roles"), ("findings", k, "roles")),
                                   str(v.get("claim", "")), r.lines.get(("findings", k), ""))
    est = r.mapping(data.get("estimate"), ("estimate",), tuple(f.name for f in dataclasses.fields(Estimate)))
    for k, v in est.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise r.err(("estimate", k), f"expected a number >= 0, got {v!r}")
    study = Study(r.name(data["name"], ("name",)), p, None if base is None else (p.parent / base),
                  r.overrides(data.get("overrides"), ("overrides",)), tuple(seeds), cold, init, cells, sweeps,
                  findings, Estimate(**{k: float(v) for k, v in est.items()}),
                  r.mapping(data.get("collapse"), ("collapse",)), text, r.lines)
    for f in study.findings.values():
        finding_roles(study, f)  # a finding naming a cell that does not exist fails now, not after the runs
    collapse_rule(study.collapse, r.lines.get(("collapse",), f"{p}: "))
    return study


def _cell(r: _Reader, name: str, v, keys: tuple, init: str | None, cold: dict) -> Cell:
    """A cell: a list of overrides, or {overrides: [...], init: <cold start>, seeds: [...]}."""
    if isinstance(v, dict):
        v = r.mapping(v, keys, ("overrides", "init", "seeds"))
        init = v.get("init", init)
        if init is not None and init not in cold:
            raise r.err((*keys, "init"), f"{init!r} is not a cold start (defined: {', '.join(cold) or 'none'})")
        seeds = r.seeds(v["seeds"], (*keys, "seeds")) if "seeds" in v else None
        return Cell(name, r.overrides(v.get("overrides"), (*keys, "overrides")), init, r.lines.get(keys, ""),
                    seeds=seeds)
    return Cell(name, r.overrides(v, keys), init, r.lines.get(keys, ""))


def _sweep(r: _Reader, name: str, v, init, cold) -> tuple[dict[str, tuple[str, ...]], list[Cell]]:
    """{axes: {axis: {value: [overrides]}}, overrides: [...], init: ...} -> the product of the axes' values, one
    cell each, named <sweep>_<value>_<value>... in the axes' order (e.g. offpolicy_N4_clip_R2)."""
    keys = ("sweeps", name)
    v = r.mapping(v, keys, ("axes", "overrides", "init"))
    common = _cell(r, name, {k: x for k, x in v.items() if k != "axes"}, keys, init, cold)
    axes = r.mapping(v.get("axes"), (*keys, "axes"))
    if not axes:
        raise r.err(keys, "a sweep needs axes: {axis: {value: [overrides]}}")
    cells = [Cell(name, common.overrides, common.init, common.where)]
    order: dict[str, tuple[str, ...]] = {}
    for axis, values in axes.items():
        values = r.mapping(values, (*keys, "axes", axis))
        if not values:
            raise r.err((*keys, "axes", axis), "an axis needs at least one value")
        order[str(axis)] = tuple(str(x) for x in values)
        cells = [Cell(f"{c.name}_{r.name(str(val), (*keys, 'axes', axis, val))}",
                      c.overrides + r.overrides(ov, (*keys, "axes", axis, val)), c.init, c.where, name,
                      (*c.axes, (str(axis), str(val))))
                 for c in cells for val, ov in values.items()]
    return order, cells


# ---- expansion: one checked config per run ---------------------------------------------------------------------


def _checked(base: Config, overrides: list[str], where: str, what: str) -> Config:
    try:
        return load_config(None, overrides, base=base)
    except ConfigError as e:
        raise ConfigError(f"{where}{what}: {str(e).removeprefix('override ')}") from None


def select_cells(study: Study, patterns: list[str] | None) -> list[str]:
    """Cell names matching any of the glob `patterns` (all when None); an unmatched pattern is an error."""
    if not patterns:
        return list(study.cells)
    chosen = []
    for pat in patterns:
        hit = [c for c in study.cells if fnmatch.fnmatchcase(c, pat)]
        if not hit:
            raise UserError(f"--cells: {pat!r} matches no cell of study {study.name!r} "
                            f"(cells: {', '.join(study.cells)})")
        chosen += [c for c in hit if c not in chosen]
    return [c for c in study.cells if c in chosen]


def expand(study: Study, out: str | Path, extra: list[str] | tuple[str, ...] = (),
           cells: list[str] | None = None) -> list[Run]:
    """The runs of `study` under `out`: the cold starts the chosen cells need, then every (cell, seed). Every config
    is built and validated here, so a bad key in any cell fails (naming the cell and the key) before anything runs.
    `extra` overrides go to every run after the study's own (e.g. a quick smoke test: train.steps=2)."""
    where = f"{study.path}: " if study.path else ""
    for item in extra:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key in RESERVED:
            raise UserError(f"override {item!r}: expected key=value, and not one of {', '.join(RESERVED)} (the "
                            "study sets those: its seeds, run names, --out and cold starts)")
    try:
        base = load_config(study.base)
    except ConfigError as e:
        raise ConfigError(f"{where}base: {e}") from None
    # Cold starts take the command line's overrides but not the study's: those are the RL recipe (learning rate,
    # steps, engine numerics), and a cold start built once must stay valid when the recipe is recalibrated.
    cold_base = _checked(base, list(extra), "", "command-line overrides")
    base = _checked(base, list(study.overrides), study.lines.get(("overrides",), where), "overrides")
    base = _checked(base, list(extra), "", "command-line overrides")
    common = [*study.overrides, *extra]
    root = os.path.normpath(out)
    chosen = cells if cells is not None else list(study.cells)
    needed = [c for c in study.cold_starts if any(study.cells[n].init == c for n in chosen)]
    runs: list[Run] = []
    for c in needed:
        name = f"{study.name}/cold/{c}"
        ov = [*study.cold_starts[c], f"out_dir={root}", f"name={name}"]
        cfg = _checked(cold_base, ov, study.lines.get(("cold_starts", c), where), f"cold start '{c}'")
        runs.append(Run(name, "sft", c, cfg.seed, _args("sft", study, [*extra, *ov]), cfg))
    for n in chosen:
        cell = study.cells[n]
        cold = None if cell.init is None else f"{study.name}/cold/{cell.init}"
        for s in study.seeds_of(n):
            name = f"{study.name}/{n}/seed{s}"
            ov = [*cell.overrides, f"seed={s}", f"out_dir={root}", f"name={name}"]
            if cold is not None:
                ov.append(f"init={os.path.join(root, cold, 'model')}")
            cfg = _checked(base, ov, cell.where or where, f"cell '{n}' (seed {s})")
            runs.append(Run(name, "train", n, s, _args("train", study, [*common, *ov]), cfg, cold))
    return runs


def _args(command: str, study: Study, overrides: list[str]) -> tuple[str, ...]:
    base = ("--config", str(study.base)) if study.base is not None else ()
    return (command, "--no-progress", *base, *overrides)
