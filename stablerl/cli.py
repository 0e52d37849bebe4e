"""`stablerl` command line. Each subcommand lives in its own module with `add_arguments(p)` and `run(args) -> int`.

Modules are imported only when their command runs, so `stablerl --help` stays instant and a missing optional
dependency of one command never breaks the others. Every failure is one line on stderr, never a traceback (that is
what `--debug` is for): errors a user can fix (`UserError`: bad config, data file, checkpoint, a run directory in
use; `OSError`: missing file, disk full, permission denied) name the file and what to do, exit code 2; anything else
is a bug of ours, reported as such, exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from stablerl.errors import UserError, describe_os_error, one_line

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("stablerl.commands.quickstart", "cold-start SFT then RL on the default tiny MoE, with a summary"),
    "train": ("stablerl.commands.train", "RL training from a YAML config plus key=value overrides"),
    "convert": ("stablerl.commands.convert", "a GGUF file (or `smollm2`) to an fp32 HF checkpoint directory"),
    "info": ("stablerl.commands.info", "build or load a model, report its size and run a forward pass"),
    "config": ("stablerl.commands.config", "print the resolved config (defaults + YAML + overrides)"),
    "sft": ("stablerl.commands.sft", "cold-start supervised fine-tuning on a task's solution traces"),
    "eval": ("stablerl.commands.eval", "greedy accuracy and mean@k on a held-out task split or data file"),
    "generate": ("stablerl.commands.generate", "sample completions (with logprobs, routes) from a JSONL of prompts"),
    "study": ("stablerl.commands.study", "run a study (cells of overrides x seeds) as processes, then its report"),
    "reproduce": ("stablerl.commands.reproduce", "the paper's findings F1-F5: the study grid, runs, report, verdicts"),
    "report": ("stablerl.commands.report", "Markdown + PNG report (tables, plots, verdicts) from run directories"),
}


def command_parser(name: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The module of subcommand `name` and its argument parser (with the shared --debug)."""
    module = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"stablerl {name}", description=COMMANDS[name][1])
    module.add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return module, p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stablerl", description="Stable RL for dense and MoE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module, p = command_parser(name)
    # intermixed: flags may come anywhere among the KEY=VALUE overrides (`train a=1 --no-progress b=2`), as users
    # type them; plain parse_args stops the positional list at the first flag and refuses what follows
    args = p.parse_intermixed_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"stablerl {name}: interrupted (checkpoints already written are kept)", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, UserError):
            msg, code = one_line(e), 2
        elif isinstance(e, OSError):
            msg, code = describe_os_error(e), 2
        else:
            msg, code = f"internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", 1
        print(f"stablerl {name}: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
