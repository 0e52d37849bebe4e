"""`stablerl config`: print the resolved config, so users see every default and what their YAML changed."""

from stablerl.commands import add_config_args, config_from_args
from stablerl.config import to_yaml


def add_arguments(p):
    add_config_args(p)


def run(args) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0
