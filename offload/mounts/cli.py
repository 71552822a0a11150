"""``offload prepare``, ``offload teardown``, ``offload status``."""

from __future__ import annotations

import argparse
import os
import signal
from collections import Counter

from offload.mounts import config as config_module
from offload.mounts import machine, ops, orchestrator, paths
from offload.mounts import plan as plan_module

#: `offload status` exits with this when the plan is not fully in place.
NOT_PREPARED = 3


def _config(args: argparse.Namespace) -> tuple[config_module.PrepareConfig, str]:
    """The configuration and the target (--target, else the configuration's), resolved."""
    config = config_module.load(args.config)
    return config, os.path.realpath(args.target or config.target)


def make_plan(config: config_module.PrepareConfig, target: str) -> plan_module.Plan:
    facts = machine.gather(target, config.devices)
    return plan_module.build(config, target, facts, lambda path: paths.resolve(target, path))


def _print(line: str) -> None:
    print(line, flush=True)


def _interrupted(signum: int, frame: object) -> None:
    # systemd stops a unit with SIGTERM: unwind like ^C, so the run's
    # mounts are undone instead of left half-made.
    raise KeyboardInterrupt


def _prepare(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    config, target = _config(args)
    plan = make_plan(config, target)
    if args.dry_run:
        for line in plan.describe():
            print(line)
        return 0
    summary = orchestrator.prepare(plan, report=_print, fail_at=args.fail_at_step)
    print(
        f"prepared {target}: {summary.done} new, {summary.already} already in place, "
        f"{summary.skipped} skipped, in {summary.seconds * 1000:.0f} ms"
    )
    return 0


def _teardown(args: argparse.Namespace) -> int:
    _, target = _config(args)
    if args.dry_run:
        for line in orchestrator.teardown_commands(target):
            print(line)
        return 0
    summary = orchestrator.teardown(target, force=args.force, report=_print)
    lazily = f", {summary.lazily} detached lazily" if summary.lazily else ""
    ended = len(summary.clients)
    clients = f", {ended} qtfs client{'s' if ended != 1 else ''} ended" if ended else ""
    print(
        f"tore down {target}: {summary.unmounted} unmounted{lazily}{clients}, in {summary.seconds * 1000:.0f} ms; "
        "nothing is mounted below it"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    config, target = _config(args)
    rows = orchestrator.status(make_plan(config, target))
    width = max((len(row.what) for row in rows), default=0)
    counts = Counter(row.state for row in rows)
    for row in rows:
        detail = f"  ({row.detail})" if row.detail else ""
        print(f"{row.state:<8} {row.what:<{width}}  {row.path}{detail}")
    print(f"{target}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    bad = {ops.MISSING, ops.WRONG, orchestrator.EXTRA} & counts.keys()
    return NOT_PREPARED if bad else 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--target",
            metavar="DIR",
            help=f"the rootfs libvirtd runs chrooted in (default: the config's target, {config_module.DEFAULT_TARGET})",
        )
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=str(config_module.DEFAULT_CONFIG),
            help="prepare.toml (default %(default)s; a missing file means the defaults)",
        )

    prepare = commands.add_parser("prepare", help="mount what libvirtd needs into the target rootfs (idempotent)")
    common(prepare)
    prepare.add_argument("--dry-run", action="store_true", help="print the equivalent shell commands, change nothing")
    # Test hook: make step N fail before it runs (proves the rollback).
    prepare.add_argument("--fail-at-step", type=int, metavar="N", help=argparse.SUPPRESS)
    prepare.set_defaults(handler=_prepare)

    teardown = commands.add_parser("teardown", help="unmount everything below the target, newest first")
    common(teardown)
    teardown.add_argument("--force", action="store_true", help="detach busy mounts lazily and name their users")
    teardown.add_argument("--dry-run", action="store_true", help="print the umount commands, change nothing")
    teardown.set_defaults(handler=_teardown)

    status = commands.add_parser(
        "status", help=f"the plan against reality: mounted, missing, wrong (exit {NOT_PREPARED} unless all in place)"
    )
    common(status)
    status.set_defaults(handler=_status)
