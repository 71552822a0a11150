"""``offload lab systemd``: the parser; the lab itself (psutil, pyroute2) is imported only when it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_NAME = "offsd"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``offload lab systemd up|down|exec|demo``."""
    parser = commands.add_parser(
        "systemd",
        help="the host and the DPU as two containers booted with systemd, the package installed with apt",
        description="The host and the DPU as two containers with systemd as PID 1 (see offload/lab/systemd_lab.py).",
    )
    _actions(parser)


def _actions(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="boot both containers, install the package, configure and enable the units")
    up.add_argument("--deb", type=Path, help="the package to install (default: built from this checkout)")
    sub.add_parser("down", help="power both containers off and remove everything the lab made")
    run = sub.add_parser("exec", help="run a command in a container (systemctl, journalctl, virsh, ...)")
    run.add_argument("role", choices=["host", "dpu"])
    run.add_argument("argv", nargs=argparse.REMAINDER)
    show = sub.add_parser("demo", help="what make demo-systemd runs")
    show.add_argument("--deb", type=Path, help="the package to install (default: built from this checkout)")
    show.add_argument("--keep", action="store_true", help="leave the lab up after a failure")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from offload.lab import systemd_lab

    return systemd_lab.run_command(args, args.name or DEFAULT_NAME)


def main(argv: list[str] | None = None) -> int:
    """``python -m offload.lab.systemd_cli demo`` (make demo-systemd): ``offload lab systemd`` on its own."""
    parser = argparse.ArgumentParser(prog="offload lab systemd")
    parser.add_argument("--name", help=f"lab name, at most 9 characters (default {DEFAULT_NAME})")
    _actions(parser)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
