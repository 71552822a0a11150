"""``offload guests list|stop``: the programs rexec_server keeps running, and ending them on purpose.

Stopping or restarting rexec_server never ends the programs it runs (a
guest's qemu), as stopping libvirtd never ends a guest.  At shutdown the
host ends them on purpose, as libvirt-guests does, while rexec_server still
runs to tell the DPU's libvirt how each ended: rexec-guests.service runs
``stop`` when it stops, ordered after rexec.service.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offload.config import RexecConfig
from offload.rexec import keep


def _list(args: argparse.Namespace) -> int:
    for line in keep.programs(Path(args.run_dir) / "sessions"):
        print(line)
    return 0


def _stop(args: argparse.Namespace) -> int:
    sessions = Path(args.run_dir) / "sessions"
    if not sessions.is_dir():
        print(f"no sessions kept in {sessions}")
        return 0
    for line in keep.end(keep.marked(sessions), args.timeout) or ["no programs were running"]:
        print(line, flush=True)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    guests = commands.add_parser("guests", help="the programs rexec_server runs for the peer (its guests' qemu)")
    guest_commands = guests.add_subparsers(dest="guests_command", required=True, metavar="COMMAND")
    listing = guest_commands.add_parser("list", help="the programs rexec_server keeps running across its restarts")
    listing.set_defaults(handler=_list)
    stop = guest_commands.add_parser(
        "stop", help="end every program rexec_server keeps running (SIGTERM, then SIGKILL after --timeout)"
    )
    stop.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a program has to end (default %(default)s)",
    )
    stop.set_defaults(handler=_stop)
    for parser in (listing, stop):
        parser.add_argument(
            "--run-dir",
            default=RexecConfig.run_dir,
            metavar="DIR",
            help="rexec_server's run directory (default %(default)s)",
        )
