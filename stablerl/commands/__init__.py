"""Subcommand modules of the `stablerl` CLI (see stablerl/cli.py). Shared argument helpers live here."""

from __future__ import annotations

import argparse

from stablerl.config import Config, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (defaults for anything it omits)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. algo.loss=minirl_no_is train.n_minibatches=4")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """`--no-progress`, shared by every command with a long-running loop (sft, train, quickstart)."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
