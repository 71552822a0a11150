"""Mounting and unmounting: the FUSE session's life, in the foreground or in the background.

README.md ("qtfs") says what `qtfs mount` checks before it reports success.
In the background (the default, like sshfs) the command forks first and the
parent waits for the child's one-line report on a pipe.  However the process
ends, it aborts its FUSE connection on the way out (offload.qtfs.fusectl
says why), and a guard process (offload.qtfs.guard) does it when the process
is killed.  A mount left dead is detached by the next mount on the same
directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from offload import aio, proc, sd
from offload.errors import OffloadError
from offload.fdinfo import closing
from offload.mounts import syscalls
from offload.net import Address, Transport
from offload.qtfs import fusectl, guard, unmount
from offload.qtfs.client import Link, Mounted
from offload.qtfs.fuse import KERNEL_LISTINGS, Filesystem

log = logging.getLogger("qtfs")

READY_TIMEOUT = 15.0
#: pyfuse3 starts a task per concurrent kernel request, up to this many.
MAX_TASKS = 64
#: Readahead of a cached mount, as large as one read request may be (the kernel's default is 128 KiB).
READAHEAD_KIB = 1024
#: What a FUSE mount whose process died answers (ECONNABORTED on newer kernels).
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


class QtfsMountError(OffloadError):
    """The mount could not be made; the message says why."""


@dataclass(frozen=True)
class MountOptions:
    address: Address
    remote: bytes
    mountpoint: str
    mode: str = ""  # "", "proc", "sys", "cgroup"
    keepalive: float = 6.0
    reconnect_timeout: float | None = None
    cache_timeout: float = 0.0
    node: str = ""
    dir_attr_timeout: float = 1.0
    #: Cache lifetime when the host announces its changes (0: no caching, as --no-cache).
    coherent_timeout: float = 10.0
    #: cgroup mode: rexec's pidmap directory (stand-in pid -> host pid).
    pidmap: str = ""

    @property
    def source(self) -> str:
        return f"{self.address}:{os.fsdecode(self.remote)}"


def fuse_options(options: MountOptions, mounted: Mounted) -> set[str]:
    result = {
        f"fsname={options.source.replace(',', '_')}",
        "subtype=qtfs",
        # libvirtd's helpers and qemu's user reach these files too; the
        # kernel checks permissions against the host's modes and owners.
        "allow_other",
        "default_permissions",
    }
    if mounted.readonly:
        result.add("ro")
    return result


def _clear_dead_mount(path: str) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in DEAD:
            log.info("%s is a dead FUSE mount (its process ended): detaching it", path)
            proc.run(["fusermount3", "-u", "-z", path], check=False)


async def run_mount(options: MountOptions, transport: Transport, ready: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled."""
    _clear_dead_mount(options.mountpoint)
    if not os.path.isdir(options.mountpoint):
        raise QtfsMountError(f"mount point {options.mountpoint} is not a directory")
    link = Link(
        transport,
        options.address,
        options.remote,
        node=options.node,
        keepalive=options.keepalive,
        reconnect_timeout=options.reconnect_timeout,
    )
    async with aio.open_nursery() as nursery:
        try:
            mounted = await nursery.start(link.run)
        except OSError as exc:
            raise QtfsMountError(f"{options.source}: {exc.strerror or exc}") from None
        filesystem = Filesystem(link, mounted, options)
        try:
            pyfuse3.init(filesystem, options.mountpoint, fuse_options(options, mounted))
        except RuntimeError as exc:
            raise QtfsMountError(f"cannot mount FUSE on {options.mountpoint}: {exc}") from None
        filesystem.live = True
        if filesystem.cache.coherent and not KERNEL_LISTINGS:
            log.info("this pyfuse3 cannot let the kernel cache listings (scripts/build-pyfuse3 adds it)")
        nursery.start_soon(filesystem.drop_pages_forever)
        nursery.start_soon(filesystem.carry_placements_forever)
        unmounted_by_kernel = False
        # Unmounted on the way out only when asked to stop (a signal) or
        # before it was ever reported ready.  A client that cannot go on for
        # any other reason leaves its mount in place, dead (ENOTCONN): an
        # unmount would show the DPU's own directory below it, and libvirtd
        # would go on writing there as if it were the host's.
        stop_requested = False
        reported_ready = False
        pidfile = None
        connection: fusectl.Connection | None = None
        guarded = None
        try:

            async def serve() -> None:
                nonlocal unmounted_by_kernel
                await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
                unmounted_by_kernel = True
                log.info("%s was unmounted", options.mountpoint)
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                nonlocal stop_requested
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        log.info("%s: unmounting", signal.Signals(signum).name)
                        break
                stop_requested = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve)
            nursery.start_soon(stop_on_signal)
            with trio.fail_after(READY_TIMEOUT):
                await trio.to_thread.run_sync(_no_symlinks_followed, options.mountpoint)
                st = await trio.to_thread.run_sync(os.stat, options.mountpoint)
            pidfile = unmount.write_pidfile(st.st_dev)
            # Opened now, while this process holds the connection: it is surely ours.
            connection = fusectl.Connection.open_or_none(st.st_dev, f"the qtfs client of {options.mountpoint}")
            if filesystem.cache.coherent:
                _set_readahead(st.st_dev, READAHEAD_KIB)
            log.info(
                "mounted %s on %s%s%s",
                options.source,
                options.mountpoint,
                " (read-only)" if mounted.readonly else "",
                ", coherent cache" if filesystem.cache.coherent else ", no cache",
            )
            ready()
            reported_ready = True
            if connection is not None:
                # After ready(): the guard inherits the detached stdio, not the
                # pipes of whoever ran `qtfs mount` (they wait for EOF).
                guarded = _start_guard(connection, options.mountpoint)
            sd.notify("READY=1")
            await trio.sleep_forever()
        finally:
            detach = (stop_requested or not reported_ready) and not unmounted_by_kernel
            if not detach and not unmounted_by_kernel:
                log.error("%s stays mounted, dead, until unmounted (qtfs umount or a new mount)", options.mountpoint)
            if connection is None:
                with contextlib.suppress(Exception):
                    # No fusectl: libfuse unmounts by path, as best it can.
                    pyfuse3.close(unmount=detach)
            else:
                # Aborted before the unmount, never after: a thread of ours
                # stuck in a page invalidation holds the connection's killsb
                # lock while it waits for a page lock that only an answer or
                # an abort releases, and the unmount of the last reference
                # waits for that lock in this thread.  Closing /dev/fuse would
                # not do: it ends the connection only once no thread of ours
                # is in a kernel call on it (see fusectl).
                connection.abort()
                with contextlib.suppress(Exception):
                    # libfuse leaves an aborted connection mounted: detached below.
                    pyfuse3.close(unmount=False)
                if detach:
                    unmount.detach_if_ours(options.mountpoint, connection)
                connection.close()
            if guarded is not None:
                # Its work is done: ended and reaped here, so that whoever waits
                # for this process to end (qtfs umount, teardown) waits for it too.
                guarded.kill()
                guarded.wait()
            if pidfile is not None:
                with contextlib.suppress(OSError):
                    pidfile.unlink()


def _start_guard(connection: fusectl.Connection, mountpoint: str):
    """Start the guard that aborts the connection if this process dies (offload.qtfs.guard).

    Started from this, the main thread (the kernel signals the guard when the
    thread that started it exits), with a session of its own.
    """
    try:
        return proc.spawn(
            guard.command(connection, mountpoint),
            stdin=proc.DEVNULL,
            pass_fds=(connection.abort_fd, connection.waiting_fd),
            start_new_session=True,
        )
    except OSError as exc:
        # The mount serves on; only a SIGKILL of this process is left unguarded.
        log.warning("no guard for %s (a SIGKILL of this process would not abort its connection): %s", mountpoint, exc)
        return None


def _set_readahead(dev: int, kib: int) -> None:
    """Let sequential reads through the page cache go in requests of up to ``kib`` (best effort)."""
    try:
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("readahead left as it is: %s", exc)


def _no_symlinks_followed(mountpoint: str) -> None:
    """Set MOUNT_ATTR_NOSYMFOLLOW on our new mount at ``mountpoint``.

    A symlink the host serves is shown (readlink works) but never followed
    by a path walk on the DPU: otherwise the host would choose which of the
    DPU's files a process opening a path in the mount reaches, root's
    included.  libfuse 3 takes no "nosymfollow" option, so it is set on the
    mount after libfuse made it, before the mount is reported ready
    (mount_setattr(2), Linux 5.12; without it the mount fails).  Refusing
    such links in the client instead would change what readlink shows.
    """
    with closing(os.open(mountpoint, os.O_PATH | os.O_CLOEXEC)) as fd:
        syscalls.set_attributes(fd, syscalls.MOUNT_ATTR_NOSYMFOLLOW)


def background(run: Callable[[Callable[[], None]], None], log_file: str | None) -> int:
    """Fork; the child calls ``run(ready)`` and serves on; the parent returns the exit status.

    The child's ``ready()`` tells the parent "mounted" and detaches from the
    terminal and from the caller's pipes (a caller capturing our output
    must see EOF once we returned).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        if report.startswith(b"ok"):
            return 0
        # The child failed before it was ready: reap it and pass its reason on.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        message = report.decode(errors="replace").strip() or "the mount process ended without a report"
        print(f"qtfs mount: {message}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(write_end, b"ok\n")
        os.close(write_end)
        reported = True
        _detach(log_file)

    status = 0
    try:
        run(ready)
    except OffloadError as exc:
        status = 1
        if not reported:
            os.write(write_end, str(exc).encode() + b"\n")
        log.error("%s", exc)
    except BaseException as exc:  # the report must reach the parent whatever happened
        status = 1
        if not reported:
            os.write(write_end, f"internal error: {exc!r}\n".encode())
        log.exception("the mount process failed")
    finally:
        if not reported:
            with contextlib.suppress(OSError):
                os.close(write_end)
    os._exit(status)


def _detach(log_file: str | None) -> None:
    target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(null)
    os.close(target)
