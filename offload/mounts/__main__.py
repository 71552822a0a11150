"""``python -m offload.mounts prepare|teardown|status``: the same commands as ``offload ...``.

Only the mount orchestrator is imported, so a run costs the plan plus the
interpreter's start; the umbrella command also loads every other part's
command-line code (the bench shows both).
"""

from __future__ import annotations

from offload import cli as offload_cli
from offload.mounts import cli


def main(argv: list[str] | None = None) -> None:
    offload_cli.run("mount orchestrator for /another_rootfs", cli.add_commands, argv)


if __name__ == "__main__":
    main()
