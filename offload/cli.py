"""offload: the umbrella command (pki, lab, rootfs, prepare/teardown/status, guests)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from offload import log as log_module
from offload.errors import ConfigError, OffloadError


def _pki_init(args: argparse.Namespace) -> int:
    from offload import pki

    if not args.identities:
        raise ConfigError("name at least one node: --node host|dpu, --host NAME or --dpu NAME")
    for line in pki.init(Path(args.dir), args.identities, force=args.force):
        print(line)
    return 0


def _identity(role: str | None):
    """An argparse type: NAME into the Identity of ``role`` (None: inferred from NAME)."""
    from offload import pki

    def parse(name: str) -> pki.Identity:
        try:
            return pki.Identity.named(name) if role is None else pki.Identity(role, name)
        except OffloadError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_commands(commands: argparse._SubParsersAction) -> None:
    pki_parser = commands.add_parser("pki", help="certificates for mutual TLS between host and DPU")
    pki_commands = pki_parser.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")
    init = pki_commands.add_parser("init", help="create a CA and one certificate per node")
    init.add_argument("--dir", required=True, help="where to write the CA and node directories")
    nodes = init.add_argument_group("nodes (at least one; each option repeatable)")
    for flag, role, metavar, text in (
        ("--node", None, "host|dpu", "a node named after its role: 'host' or 'dpu'"),
        ("--host", "host", "NAME", "a host named NAME"),
        ("--dpu", "dpu", "NAME", "a DPU named NAME"),
    ):
        nodes.add_argument(flag, action="append", dest="identities", type=_identity(role), metavar=metavar, help=text)
    init.add_argument("--force", action="store_true", help="replace existing node certificates")
    init.set_defaults(handler=_pki_init, identities=None)

    for package in ("lab", "rootfs_builder", "mounts", "rexec"):
        importlib.import_module(f"offload.{package}.cli").add_commands(commands)


def main(argv: list[str] | None = None) -> None:
    run("DPU offload runtime for libvirtd.", add_commands, argv)


def run(description: str, add: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> None:
    """``offload`` with the subcommands ``add`` makes: parse, log, run the handler; errors become exit statuses."""
    parser = argparse.ArgumentParser(prog="offload", description=description)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    log_module.setup("offload", args.log_level)
    try:
        sys.exit(args.handler(args))
    except OffloadError as exc:
        print(f"offload: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
