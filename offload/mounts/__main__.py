"""``python -m offload.mounts prepare|teardown|status``: the same commands as ``offload ...``.

Only the mount orchestrator is imported, so a run costs the plan plus the
interpreter's start; the umbrella command also loads every other part's
command-line code (the bench shows both).
"""

from __future__ import annotations

import argparse

from offload import cli as offload_cli
from offload.mounts import cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload", description="mount orchestrator for /another_rootfs")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli.add_commands(commands)
    offload_cli.run(parser, argv)


if __name__ == "__main__":
    main()
