"""rexec_server: runs on both machines.

As a server it accepts authenticated links from its peer and runs the
programs the peer asks for (whitelisted, as the caller's user).  As an
agent it serves local stand-ins (``rexec``) on ``<run dir>/rexec.sock`` and
carries their sessions to the peer over warm links.

Signals: SIGHUP reloads the whitelist (a bad new file keeps the old list);
SIGTERM and SIGINT stop the server.  Under a service manager with an fd
store the programs it runs go on, for the next server to carry on their
sessions (`offload.rexec.keep`); without one, they are ended.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from offload import aio, proc, sd
from offload import config as config_module
from offload import log as log_module
from offload.config import RexecConfig
from offload.errors import ConfigError, ProtocolError, TransportError
from offload.net import Transport, listener_address, parse_address, remote_name, serve_listeners
from offload.protocol.rexec import Role
from offload.rexec import attached, keep
from offload.rexec.agent import AgentSession, PeerPool, serve_stand_ins
from offload.rexec.attached import serve_attach
from offload.rexec.executor import Execution, ServerState, serve_session
from offload.rexec.link import SessionLink
from offload.rexec.pidmap import PidmapDir
from offload.rexec.policy import Whitelist, ensure_private_dir

log = logging.getLogger("rexec_server")
T = TypeVar("T")

#: How long a stopping server waits for its relays to pause (`attached.pause_all`).
PAUSE_TIMEOUT = 2.0


def _take_singleton_lock(run_dir: Path) -> int:
    """One rexec_server per run directory (the reference's rexec_uds.lock)."""
    fd = os.open(run_dir / "rexec.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another rexec_server already runs with run directory {run_dir}") from None
    return fd


async def _serve_peer(transport: Transport, state: ServerState, raw: trio.SocketStream) -> None:
    config = state.config
    connected = await transport.admit(raw, remote_name(raw), log)
    if connected is None:
        return
    link = SessionLink(connected, Role.SERVER, config.node_name, keepalive=config.keepalive)
    try:
        with trio.fail_after(10):
            hello = await link.handshake()
        if hello.attach:  # a pty's or bridged connection's (offload.rexec.attached), not a session's
            await serve_attach(link.stream, link.peer, link.conn, hello.attach, state.grants)
            return
        async with aio.open_nursery() as nursery:
            await nursery.start(link.run)  # receives and keeps alive until the session is done with the link
            await serve_session(link, state)
            nursery.cancel_scope.cancel()
    except (TransportError, ProtocolError, trio.TooSlowError) as exc:
        log.warning("session with %s ended: %s", connected.peer, exc or type(exc).__name__)
    finally:
        await link.aclose()


#: The process-wide jobs a serve() of this process already does.
_process_jobs: set[str] = set()


async def _once_per_process(
    job: Callable[..., Awaitable[None]], *args: object, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``job`` unless another serve() of this process runs it already.

    Signal handling and orphan adoption belong to the process.  trio
    restores a signal's handler correctly only when the receivers of one
    signal close in the reverse order of their opening, and two servers in
    one process (tests) need not end so: a handler of a finished trio.run
    left behind would raise in whatever the process runs next.
    """
    name = job.__name__
    if name in _process_jobs:
        task_status.started()
        await trio.sleep_forever()
    _process_jobs.add(name)
    try:
        await job(*args, task_status=task_status)
    finally:
        _process_jobs.discard(name)


async def _reap_orphans(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Adopt our programs' orphans for as long as we serve, and collect each as it exits.

    Adopted, a program's daemon stays our child: that is how a daemon
    pidfile is checked to name a process the program started (see
    `proc.adopt_orphans`).
    """
    with trio.open_signal_receiver(signal.SIGCHLD) as exits:
        proc.adopt_orphans(True)
        try:
            task_status.started()
            while True:
                due = proc.reap_orphans()
                with trio.move_on_after(math.inf if due is None else due):
                    await anext(exits)
        finally:
            proc.adopt_orphans(False)


async def _handle_signals(
    state: ServerState,
    stop: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                sd.notify("RELOADING=1")
                try:
                    state.whitelist = Whitelist.load(state.config.whitelist)
                    log.info(
                        "reloaded the whitelist %s: %d programs", state.config.whitelist, len(state.whitelist.programs)
                    )
                except ConfigError as exc:
                    log.error("whitelist not reloaded, keeping the old one: %s", exc)
                sd.notify("READY=1")
            else:
                log.info("stopping on %s", signal.Signals(signum).name)
                sd.notify("STOPPING=1")
                await stop()
                return


async def serve(
    config: RexecConfig, transport: Transport, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until cancelled; ``task_status.started`` gets the bound addresses."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)
    lock = _take_singleton_lock(run_dir)
    try:
        whitelist = Whitelist.load(config.whitelist)
        ensure_private_dir(run_dir / "bridges")
        sessions_dir = run_dir / "sessions"
        ensure_private_dir(sessions_dir)
        kept = keep.inherited()
        pidmaps = PidmapDir(run_dir / "pids")
        pidmaps.prepare()
        addresses = [parse_address(text) for text in config.listen]
        listeners = []
        for address in addresses:
            listeners.extend(await transport.listen(address))
        async with aio.open_nursery() as nursery:
            state = ServerState(config, whitelist, run_dir / "bridges", sessions_dir, nursery)
            await _carry_on(state, kept)
            await nursery.start(_once_per_process, _reap_orphans)
            pool = PeerPool(transport, config, nursery)

            async def stop() -> None:
                # Sessions that outlive this server are told apart from those a caller ended.
                pool.stopping = state.grants.stopping = True
                if sd.store_available():
                    # They go on under the next server: their monitors and consoles lose no byte.
                    await attached.pause_all([*state.grants.relays(), *pool.relays], PAUSE_TIMEOUT)
                nursery.cancel_scope.cancel()

            # Before the agent socket exists: a SIGTERM from then on stops the server cleanly.
            await nursery.start(_once_per_process, _handle_signals, state, stop)
            for session in _adopted(
                kept, "agent", partial(AgentSession.adopt, pool=pool, config=config, pidmaps=pidmaps)
            ):
                nursery.start_soon(aio.guarded, log, "a stand-in's session", session.run)
            agent_socket = await nursery.start(serve_stand_ins, config, pool, pidmaps)
            bound = [listener_address(listener) for listener in listeners]
            nursery.start_soon(
                serve_listeners, listeners, partial(_serve_peer, transport, state), log, "peer", transport.limits
            )
            log.info(
                "rexec_server %s ready: peers on %s, stand-ins on %s, %d whitelisted programs%s",
                config.node_name,
                ", ".join(bound) or "(no listener)",
                agent_socket,
                len(state.whitelist.programs),
                "" if transport.tls else " (INSECURE: no authentication)",
            )
            task_status.started(bound)
    finally:
        os.close(lock)


async def _carry_on(state: ServerState, kept: list[keep.Kept]) -> None:
    """Carry on the sessions of the server before us that its peers may resume; end the programs of the others."""
    adopted = _adopted(kept, "rexec", partial(Execution.adopt, state))
    for execution in adopted:
        state.nursery.start_soon(aio.guarded, log, f"session {execution.id}", execution.run)
    # Named before any session of ours names its program there; ended while we serve.
    unreachable = keep.unreachable(state.sessions_dir, {execution.name for execution in adopted})
    if unreachable:
        ending = partial(trio.to_thread.run_sync, keep.end, unreachable, state.config.kill_grace)
        state.nursery.start_soon(aio.guarded, log, "ending programs nobody can resume", ending)


def _adopted(kept: list[keep.Kept], role: str, adopt: Callable[[keep.Kept], T | None]) -> list[T]:
    """What ``adopt`` makes of each session of ``role`` the server before us kept; one it cannot carry on is closed."""
    adopted = []
    for session in kept:
        if session.role != role:
            continue
        try:
            carried = adopt(session)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s session %s not carried on: %s", role, session.name, exc)
            session.close()
            continue
        if carried is not None:
            adopted.append(carried)
    return adopted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexec_server",
        description="Run whitelisted programs for the peer machine, and carry local rexec stand-ins to it.",
    )
    config_module.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log_module.setup("rexec_server", args.log_level)
    log_module.raise_fd_limit()

    def build() -> tuple[RexecConfig, Transport]:
        config = config_module.from_arguments(args)
        return config, Transport.from_arguments(config)

    aio.run_service(log, serve, build)


if __name__ == "__main__":
    main()
