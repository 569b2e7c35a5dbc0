"""The ``mixer`` command: one sub-command per task, each registered by the module that implements it.

This module is the top of the layout: it is the one place that imports both the service side (prepare,
serve, plan) and the client side (the operator commands and export), so neither side imports the other.
"""

from __future__ import annotations

import argparse
import sys

from client import export, operator_cli
from mixer_contract.errors import MixerError
from mixer_service.logs import configure_from_env
from mixer_service.planner import plan_command
from mixer_service.prepare import prepare_command
from mixer_service.service import serve_command
from mixer_service.sources import adopt_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer", description="Streaming data mixing for specialized pretraining"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (prepare_command, adopt_command, serve_command, plan_command, operator_cli, export):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The service logs its lifecycle; interactive commands keep stderr for progress bars and errors.
    configure_from_env("INFO" if args.command == "serve" else "WARNING")
    try:
        return args.func(args)
    except MixerError as exc:
        print(f"mixer {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
