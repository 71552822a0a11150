"""Reading and writing file descriptors from trio, without disturbing their owners.

An fd received from the stand-in shares its open file description with the
caller (a shell, libvirt, virtlogd).  Setting O_NONBLOCK on it, as trio's
FdStream would, changes it for them too: the reference does exactly that to
the caller's stdin.  So a borrowed fd is used through a description of our
own where the kernel allows one, and without O_NONBLOCK where it does not:

* pipes, FIFOs and terminals are re-opened through /proc/self/fd/N, which
  yields a new description of the same pipe or tty that we may make
  non-blocking;
* sockets are used with MSG_DONTWAIT on each call instead of O_NONBLOCK;
* regular files are read and written in a worker thread; they never block
  for long and must keep sharing the caller's file offset.

Every class here owns the fd it wraps and closes it exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

import trio

from offload.fdinfo import closed_on_error

CHUNK = 1 << 20


class ByteEnd:
    """One end of a byte stream on our side of a relay."""

    async def read(self, max_bytes: int = CHUNK) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def shutdown_write(self) -> None:
        """No more writes: the reader sees end of file."""
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError


class StreamEnd(ByteEnd):
    """A trio stream we own (our pipe ends, socketpair ends, accepted sockets)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    @classmethod
    def from_fd(cls, fd: int) -> StreamEnd:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            return cls(trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))))
        return cls(trio.lowlevel.FdStream(fd))

    async def read(self, max_bytes: int = CHUNK) -> bytes:
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except trio.BrokenResourceError:
            return b""  # ECONNRESET on a socket: the same as end of file here

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def shutdown_write(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            try:
                await self.stream.send_eof()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()


class BorrowedSocketEnd(ByteEnd):
    """A socket shared with another process: MSG_DONTWAIT per call, never O_NONBLOCK."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    async def read(self, max_bytes: int = CHUNK) -> bytes:
        while True:
            try:
                return self.sock.recv(max_bytes, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except ConnectionResetError:
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                view = view[sent:]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    async def shutdown_write(self) -> None:
        # Half-close only: the other direction may still be carrying data.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        await trio.lowlevel.checkpoint()


class FileEnd(ByteEnd):
    """A regular file: blocking calls in a worker thread keep the shared offset right."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def read(self, max_bytes: int = CHUNK) -> bytes:
        return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = await trio.to_thread.run_sync(os.write, self.fd, view)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            view = view[written:]

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        await trio.lowlevel.checkpoint()


class BrokenEnd(ByteEnd):
    """A write end whose reader is already gone (re-opening a pipe said ENXIO)."""

    async def read(self, max_bytes: int = CHUNK) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        raise trio.BrokenResourceError("the reader of this pipe is gone")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def borrow(fd: int, writing: bool) -> ByteEnd:
    """Wrap an fd that shares its description with another process; takes ownership of ``fd``."""
    with closed_on_error(fd):
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            return BorrowedSocketEnd(fd)
        if stat.S_ISREG(mode):
            return FileEnd(fd)
        flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            own = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            own = -1  # a FIFO with no reader left
    os.close(fd)
    if own < 0:
        return BrokenEnd()
    if writing and stat.S_ISFIFO(mode):
        # Writing 1 MiB into a 64 KiB pipe costs sixteen system calls and
        # wake-ups.  A larger pipe only lets more bytes wait in it; its
        # reader sees the same stream.
        grow_pipe(own)
    return StreamEnd(trio.lowlevel.FdStream(own))


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Ask for a larger pipe buffer: fewer wake-ups per megabyte relayed."""
    import fcntl

    # Over /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
