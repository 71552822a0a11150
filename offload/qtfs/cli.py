"""qtfs: ``qtfs serve`` on the host, ``qtfs mount`` / ``qtfs umount`` on the DPU."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from offload import aio
from offload import log as log_module
from offload.errors import ConfigError, OffloadError
from offload.net import Address, Transport, parse_address

log = logging.getLogger("qtfs")

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
#: `qtfs mount`'s durations in seconds: flag, default, help.
MOUNT_SECONDS = (
    ("--keepalive", 6.0, "link loss is noticed after this"),
    (
        "--reconnect-timeout",
        None,
        "how long a call waits for a lost link to return before EIO (default: the keepalive)",
    ),
    (
        "--cache-timeout",
        0.0,
        "kernel attribute/entry caching without the host's announcements (--no-cache, /proc, /sys): "
        "default 0, always coherent",
    ),
    ("--dir-attr-timeout", 1.0, "how long directories' attributes (not their entries) are cached (default 1 s)"),
)


def split_source(text: str) -> tuple[Address, bytes]:
    """``ADDR:/PATH`` split at the first ``:/``: ``169.254.77.1:7003:/var/lib/libvirt``, ``tcp://h:1:/x``."""
    # The scheme's "://" is not the separator: look after it.
    start = text.index("://") + 3 if "://" in text else 0
    at = text.find(":/", start)
    if at < 0:
        raise ConfigError(f"source {text!r}: expected ADDR:/REMOTE_PATH (e.g. 169.254.77.1:7003:/var/lib/libvirt)")
    address = parse_address(text[:at])
    remote = text[at + 1 :]
    if ".." in remote.split("/"):
        raise ConfigError(f"source {text!r}: the remote path has a '..' component")
    return address, os.fsencode(remote)


def _security(parser: argparse.ArgumentParser, *, serving: bool) -> None:
    Transport.add_arguments(parser, serving=serving)
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtfs", description="Host directories and /proc, /sys facts on the DPU.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="host side: serve exported directories")
    serve.add_argument("--listen", action="append", required=True, metavar="ADDR", help="address to listen on")
    serve.add_argument(
        "--export", action="append", required=True, metavar="PATH[:ro]", help="a directory to serve (repeatable)"
    )
    serve.add_argument("--whitelist", metavar="FILE", help="rules in the reference's /etc/qtfs/whitelist format")
    serve.add_argument("--node", default="", metavar="NAME")
    squash = serve.add_mutually_exclusive_group()
    squash.add_argument(
        "--root-squash",
        dest="root_squash",
        action="store_true",
        default=True,
        help="uid and gid 0 of the DPU's requests become nobody/nogroup (65534) on the host (the default)",
    )
    squash.add_argument(
        "--no-root-squash",
        dest="root_squash",
        action="store_false",
        help="DPU root owns what it creates as root on the host (setuid, setgid and file capabilities "
        "are never set for the DPU either way)",
    )
    serve.add_argument(
        "--programs-of",
        metavar="LOCKFILE",
        default="",
        help="the host rexec_server's lock file (RUN_DIR/rexec.lock): the programs it runs for the DPU may be "
        "placed in exported cgroups, and their /proc/PID stat, status and cgroup are served; no other process is",
    )
    _security(serve, serving=True)

    mount = commands.add_parser("mount", help="DPU side: mount a host directory")
    kind = mount.add_mutually_exclusive_group()
    kind.add_argument("--proc", action="store_true", help="the host's /proc without per-process entries")
    kind.add_argument("--sys", action="store_true", help="the host's /sys facts (devices/system, kernel/mm, kvm)")
    kind.add_argument(
        "--cgroup",
        metavar="PIDMAP_DIR",
        help="a host cgroup directory: a stand-in's pid written to tasks or cgroup.procs (found in PIDMAP_DIR, "
        "rexec's pids/) is its host program's",
    )
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    for flag, default, text in MOUNT_SECONDS:
        mount.add_argument(flag, type=float, default=default, metavar="SEC", help=text)
    cache = mount.add_mutually_exclusive_group()
    cache.add_argument(
        "--coherent-cache",
        type=float,
        default=10.0,
        metavar="SEC",
        help="cache lifetime where the host announces its changes (default 10; see README: caching)",
    )
    cache.add_argument(
        "--no-cache", action="store_true", help="cache nothing: every stat, lookup, read and write asks the host"
    )
    mount.add_argument("--log-file", metavar="FILE", help="where the background process logs (default: nowhere)")
    mount.add_argument("--node", default="", metavar="NAME")
    mount.add_argument("source", metavar="ADDR:REMOTE_PATH")
    mount.add_argument("mountpoint", metavar="LOCAL_DIR")
    _security(mount, serving=False)

    umount = commands.add_parser("umount", help="unmount and end the background process")
    umount.add_argument("mountpoint", metavar="LOCAL_DIR")
    umount.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log_module.setup("qtfs", args.log_level)
    if args.command == "serve":
        _serve(args)
        return
    try:
        sys.exit(_mount(args) if args.command == "mount" else _umount(args))
    except OffloadError as exc:
        print(f"qtfs {args.command}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


def _umount(args: argparse.Namespace) -> int:
    from offload.qtfs.unmount import umount

    umount(os.path.abspath(args.mountpoint))
    return 0


def _serve(args: argparse.Namespace) -> None:
    from offload.qtfs.backend import Export
    from offload.qtfs.server import ServerConfig, serve
    from offload.qtfs.whitelist import Whitelist, load

    log_module.raise_fd_limit()

    def build() -> tuple[ServerConfig, Transport]:
        try:
            exports = tuple(Export.parse(text) for text in args.export)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for text in args.listen:
            parse_address(text)
        whitelist = load(args.whitelist) if args.whitelist else Whitelist()
        config = ServerConfig(tuple(args.listen), exports, whitelist, args.node, args.root_squash, args.programs_of)
        return config, Transport.from_arguments(args)

    aio.run_service(log, serve, build)


def _mount(args: argparse.Namespace) -> int:
    import trio

    from offload.qtfs.mount import MountOptions, background, run_mount

    address, remote = split_source(args.source)
    options = MountOptions(
        address,
        remote,
        os.path.abspath(args.mountpoint),
        "proc" if args.proc else "sys" if args.sys else "cgroup" if args.cgroup else "",
        args.keepalive,
        args.reconnect_timeout,
        args.cache_timeout,
        args.node,
        args.dir_attr_timeout,
        0.0 if args.no_cache else args.coherent_cache,
        pidmap=os.path.abspath(args.cgroup) if args.cgroup else "",
    )
    transport = Transport.from_arguments(args)

    def run(ready) -> None:
        trio.run(run_mount, options, transport, ready)

    if not args.foreground:
        return background(run, args.log_file)
    with contextlib.suppress(KeyboardInterrupt):
        run(lambda: None)
    return 0


if __name__ == "__main__":
    main()
