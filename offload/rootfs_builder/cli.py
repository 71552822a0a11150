"""`offload rootfs build|check|mount`: the rootfs libvirtd runs in on the DPU."""

from __future__ import annotations

import argparse
import sys

from offload.rootfs_builder.build import MODES
from offload.rootfs_builder.modes import DEBIAN_MIRROR, DEBIAN_SUITE


def _say(line: str) -> None:
    print(f"rootfs: {line}", flush=True)


def _build(args: argparse.Namespace) -> int:
    from offload.rootfs_builder import build, install

    request = build.Request(
        target=args.target,
        mode=args.mode,
        options=install.Options(host=args.host or "", remote_qemu=args.remote_qemu or ""),
        source=args.source,
        image=args.image or "",
        partition=args.partition,
        suite=args.suite,
        mirror=args.mirror,
        state_dir=args.state_dir,
        apt=not args.no_apt,
        hardlinks=not args.no_hardlinks,
    )
    build.build(request, _say)
    return 0


def _check(args: argparse.Namespace) -> int:
    from offload.rootfs_builder import check

    problems, facts = check.check(args.target, args.state_dir, run=not args.no_run)
    for line in facts:
        print(f"{args.target}: {line}")
    for line in problems:
        print(f"{args.target}: PROBLEM: {line}")
    if problems:
        print(f"{args.target}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.target}: good")
    return 0


def _mount(args: argparse.Namespace) -> int:
    from offload.rootfs_builder import build
    from offload.rootfs_builder.layout import Layout

    layout = Layout.of(args.target, args.state_dir)
    if not layout.upper.is_dir():
        print(f"offload: {args.target} is not an overlay rootfs ({layout.upper} does not exist)", file=sys.stderr)
        return 1
    if not build.mount_overlay(layout, _say):
        _say(f"{args.target} is mounted already")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("rootfs", help="build and check /another_rootfs (where libvirtd runs on the DPU)")
    sub = parser.add_subparsers(dest="rootfs_command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="build TARGET (again: a second build changes only what differs)")
    build.add_argument("target", metavar="TARGET", help="the rootfs directory, e.g. /another_rootfs")
    build.add_argument(
        "--mode",
        choices=MODES,
        default="overlay",
        help="overlay: this machine's / read-only below a writable layer (default, seconds); copy: a copy of /; "
        "debootstrap: a clean Debian minbase; image: the root partition of a qcow2 or raw disk image",
    )
    build.add_argument("--image", metavar="FILE", help="the disk image for --mode image")
    build.add_argument("--partition", type=int, metavar="N", help="the image's root partition (default: found)")
    build.add_argument("--host", metavar="ADDR", help="the host's rexec_server: HOST, HOST:PORT or tcp://, vsock://")
    build.add_argument(
        "--remote-qemu", metavar="PATH", help="the host's qemu binary (default /usr/bin/qemu-system-ARCH)"
    )
    build.add_argument(
        "--source", default="/", metavar="DIR", help="the root to copy (copy) or to lay below (overlay); default /"
    )
    build.add_argument("--state-dir", metavar="DIR", help="overlay layers here (default: beside TARGET)")
    build.add_argument("--suite", default=DEBIAN_SUITE, help="Debian suite for debootstrap (default %(default)s)")
    build.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for debootstrap")
    build.add_argument("--no-apt", action="store_true", help="do not install missing packages (libvirt, python3)")
    build.add_argument(
        "--no-hardlinks", action="store_true", help="copy mode: copy /usr and /lib* instead of hard-linking them"
    )
    build.set_defaults(handler=_build)

    check = sub.add_parser("check", help="report what is wrong with TARGET (exit status 1 if anything)")
    check.add_argument("target", metavar="TARGET")
    check.add_argument("--state-dir", metavar="DIR", help="as given to build")
    check.add_argument("--no-run", action="store_true", help="do not start rexec inside TARGET")
    check.set_defaults(handler=_check)

    mount = sub.add_parser("mount", help="mount an overlay TARGET again (after a reboot)")
    mount.add_argument("target", metavar="TARGET")
    mount.add_argument("--state-dir", metavar="DIR", help="as given to build")
    mount.set_defaults(handler=_mount)
