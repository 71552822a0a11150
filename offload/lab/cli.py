"""``offload lab``: bring the two-namespace lab up and down, and run commands in it."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from offload.errors import LabError
from offload.lab import SERVICES

if TYPE_CHECKING:
    from offload.lab.lab import Lab

_NAME_ENV = "OFFLOAD_LAB_NAME"


def _lab(args: argparse.Namespace) -> Lab:
    # Imported here: the lab's modules (pyroute2, psutil) cost a third of a
    # second, which every other `offload` command would pay at start.
    from offload.lab.lab import Lab

    return Lab(args.name or os.environ.get(_NAME_ENV) or "offload")


def _up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    only = [s for item in args.only or [] for s in item.split(",") if s]
    for line in lab.up(only=only or None, allow=args.allow or ()):
        print(f"up: {line}")
    name = "" if lab.name == "offload" else f" --name {lab.name}"
    hint = f"offload lab{name} exec dpu -- rexec /bin/true"
    if "dpu-libvirtd" in lab.status_keys():
        hint = f"offload lab{name} virsh list --all, or {hint}"
    print(f"lab {lab.name} is up; try: {hint}")
    return 0


def _down(args: argparse.Namespace) -> int:
    removed = _lab(args).down()
    for line in removed:
        print(f"removed: {line}")
    if not removed:
        print("nothing to remove")
    return 0


def _status(args: argparse.Namespace) -> int:
    for line in _lab(args).status():
        print(line)
    return 0


def _exec(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.is_up:
        raise LabError(f"lab {lab.name} is down (offload lab up first)")
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("no command given: offload lab exec {host|dpu} -- CMD ...")
    command = lab.command(args.side, argv)
    os.execvpe(command[0], command, lab.env(args.side))


def _virsh(args: argparse.Namespace) -> int:
    from offload.lab import dpu_libvirt

    lab = _lab(args)
    if "dpu-libvirtd" not in lab.status_keys():
        raise LabError(f"lab {lab.name} runs no libvirtd (offload lab up, without --only)")
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    command = dpu_libvirt.virsh(lab).argv(*argv)
    os.execvp(command[0], command)


def _demo(args: argparse.Namespace) -> int:
    from offload.lab import demo

    demo.main(["--name", _lab(args).name, *args.demo_args])
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    lab = commands.add_parser("lab", help="the two-namespace lab: host and DPU on one machine")
    lab.add_argument("--name", help=f"lab name (default $ {_NAME_ENV} or 'offload')")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="create namespaces, PKI and services; return when all are ready")
    up.add_argument(
        "--only", action="append", metavar="SERVICES", help=f"comma-separated subset of: {', '.join(SERVICES)}"
    )
    up.add_argument("--allow", action="append", metavar="PROGRAM", help="add PROGRAM to both sides' rexec whitelists")
    up.set_defaults(handler=_up)
    down = sub.add_parser("down", help="remove every process, namespace and veth of the lab (idempotent)")
    down.set_defaults(handler=_down)
    status = sub.add_parser("status", help="show what runs where")
    status.set_defaults(handler=_status)
    exe = sub.add_parser("exec", help="run a command on one side, with CMD_NET_ADDR pointing at the other")
    exe.add_argument("side", choices=["host", "dpu"])
    exe.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    exe.set_defaults(handler=_exec)
    virsh = sub.add_parser("virsh", help="virsh on the DPU side, against the chrooted libvirtd")
    virsh.add_argument("argv", nargs=argparse.REMAINDER, metavar="ARGS")
    virsh.set_defaults(handler=_virsh)
    demo = sub.add_parser(
        "demo", help="lab up, a VM defined and started from the DPU side runs on the host side, lab down"
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, metavar="[--type kvm] [--keep]")
    demo.set_defaults(handler=_demo)
    # A command group of its own: that lab boots containers and installs the
    # package, and its up, down and exec share nothing with this one's.
    from offload.lab import systemd_cli

    systemd_cli.add_commands(sub)
