"""The threaded driver of the link core: one carried connection's data path, in a thread of its own.

Where it takes over from trio, and what it carries, is in ARCHITECTURE.md.
Through trio a message cost several checkpoints, wakeups and copies; here a
small one costs one poll, one receive, one seal and one send per hop, and a
slow program or peer stalls only its own connection.  Measured over the lab's
veth, a 64-byte round trip through two relays (udsproxy on both sides) took
229 us against 136 us for a socat relay; a console's keystroke skips trio too.

Local reads land after room for the frame header, so a Data frame is sealed in
one TLS record without joining bytes; link reads are split in place
(ARCHITECTURE.md).  Flow control: a side stops reading from where data comes
while more than HIGH_WATER bytes wait to go out; each pipe channel also has a
credit `Window`.  A peer is never trusted to keep to either: a pipe channel's
bytes beyond its window, or a peer that leaves more than LINK_OUT_LIMIT of our
frames unread, end that connection, so a bad peer cannot grow the daemon's memory.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import cast

import trio

from offload import aio, fdpass, ptys, users
from offload.errors import ProtocolError, RemoteProtocolError, UnsupportedFdError, errno_name, errno_number
from offload.fdpass import fds_of
from offload.net import TlsStream
from offload.protocol import udsproxy as wire
from offload.protocol.framing import HEADER_SIZE, split_frames
from offload.protocol.link import Window

log = logging.getLogger("udsproxyd")

HIGH_WATER = 1 << 20
LOCAL_BUFFER = 1 << 20
#: Reads bigger than this touch enough buffer pages to give back when idle...
BUSY = 32 << 10
#: ...after this long without traffic.
IDLE_MS = 1000
LINGER_MS = 2000
#: Bytes a pipe channel's reader may send before the writer returns credit.
WINDOW = 1 << 20
#: Pipe channels one connection may have open at once: each holds an fd of the
#: daemon's, and passing pipes is no way to run a daemon out of them.
MAX_PIPES = 64
_TOO_MANY_PIPES = f"more pipes than the {MAX_PIPES} a connection carries at once"
#: Frames waiting for the peer to read them: local reads stop at HIGH_WATER,
#: so only answers (credits, fd results) to a peer that keeps sending but
#: never reads can pile up beyond a frame or two past it.
LINK_OUT_LIMIT = 8 * HIGH_WATER
CONTROL_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * 4)
_IN = select.POLLIN
_OUT = select.POLLOUT
_TROUBLE = select.POLLERR | select.POLLHUP
# Plain ints: flag tests on the IntFlag members cost microseconds per message.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class PeerClosed(Exception):
    """The link ended (end of stream, reset, or the TLS session ended)."""


class PlainCipher:
    """--insecure: the link carries frames as they are.  The cipher a `Relay` drives; `TlsCipher` seals."""

    scratch: mmap.mmap | None = None

    def seal(self, data: memoryview | bytes) -> memoryview | bytes:
        return data

    def fill(self, sock: socket.socket, into: memoryview) -> int:
        try:
            count = sock.recv_into(into)
        except BlockingIOError:
            return 0
        if not count:
            raise PeerClosed("end of stream")
        return count

    def buffered(self) -> bool:
        return False

    def output(self) -> bytes:
        return b""

    def release(self) -> None:
        pass


class TlsCipher(PlainCipher):
    """The TLS session the handshake made, through its memory BIOs."""

    RAW = 512 << 10

    def __init__(self, session: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.session = session
        self.incoming = incoming
        self.outgoing = outgoing
        raw = mmap.mmap(-1, self.RAW)
        self.scratch = raw
        self._raw_view = memoryview(raw)

    def release(self) -> None:
        self._raw_view.release()

    def seal(self, data: memoryview | bytes) -> bytes:
        self.session.write(data)
        return self.outgoing.read()

    def fill(self, sock: socket.socket, into: memoryview) -> int:
        """Decrypt into ``into``: what is buffered, plus one receive from the socket."""
        got = self._decrypt(into) if self.incoming.pending or self.session.pending() else 0
        if got < len(into):
            try:
                count = sock.recv_into(self._raw_view)
            except BlockingIOError:
                return got
            if count:
                self.incoming.write(self._raw_view[:count])
            else:
                self.incoming.write_eof()
            try:
                got += self._decrypt(into[got:])
            except PeerClosed:
                # The end arrived right behind plaintext decrypted above:
                # deliver that first; the next fill finds the end again.
                if not got:
                    raise
        return got

    def _decrypt(self, into: memoryview) -> int:
        got = 0
        # Asking only when bytes are there saves raising SSLWantReadError
        # per message, a measurable part of a small message's round trip.
        while got < len(into) and (self.incoming.pending or self.session.pending() or self.incoming.eof):
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                count = cast(int, self.session.read(len(into) - got, into[got:]))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
                if got:
                    break  # deliver what came before the end first
                raise PeerClosed("the TLS session ended") from exc
            if not count:
                if self.incoming.eof and not got:
                    # A Python that ignores an unexpected EOF (Debian's OpenSSL option
                    # OP_IGNORE_UNEXPECTED_EOF) reads 0 at the end instead of raising.
                    raise PeerClosed("the TLS session ended")
                break
            got += count
        return got

    def buffered(self) -> bool:
        return self.incoming.pending > 0 or self.session.pending() > 0

    def output(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""


@dataclasses.dataclass
class Submission:
    """One sendmsg with fds that the shim handed to the daemon.

    ``prepared`` are the described fds with what this side keeps (pipes);
    ``answer`` gets the errno (0 when the far side delivered the fds).
    """

    data: bytes
    prepared: Prepared
    answer: Callable[[int], None]

    def fail(self, code: int) -> None:
        close_all([kept for _, kept in self.prepared if kept is not None])
        self.prepared = []
        self.answer(code)


@dataclasses.dataclass(slots=True, eq=False)
class _Pipe:
    """One pipe channel: this side reads ``fd`` and sends, or receives and writes into it."""

    fd: int
    reading: bool
    # The reader spends its credit and is granted more; the writer counts
    # what arrived against what it allowed, so pending never exceeds WINDOW.
    window: Window = dataclasses.field(default_factory=lambda: Window(WINDOW))
    pending: collections.deque[bytes] = dataclasses.field(default_factory=collections.deque)  # writer: not yet written
    ending: bool = False  # writer: close once pending is written


class Relay:
    """One connection's data path; ``user`` None: the connection carries no fds (a pty's).

    ``rewrite`` edits what the peer sends before the local program reads it
    (``b""``: the peer's stream ended, release what it held back).  An fd
    the local program passes that cannot be carried ends the connection,
    unless ``drop_uncarried``: then its message goes on without fds (a QMP
    monitor command then fails with qemu's own error, and the monitor, on
    which libvirt's view of the guest hangs, stays up).  Two
    events tell other threads how far the relay got: `sent`, everything
    the local program wrote went out, with the end of its stream behind
    it; `delivered`, everything the peer sent reached the local program.
    Both are set when the relay ends, however it ends, and `ended` after
    them.  `link_lost` says that it ended because the link did, before the
    peer's end of stream, or was paused (`pause`): a session that outlives
    its link attaches the local end again.
    """

    def __init__(
        self,
        link: socket.socket,
        cipher: PlainCipher,
        local: socket.socket | ptys.PtyEnd,
        *,
        client: bool,
        seqpacket: bool = False,
        shared: tuple[str, ...] = (),
        user: users.RemoteUser | None = None,
        root: str = "/",
        leftover: bytes = b"",
        name: str = "",
        rewrite: Callable[[bytes], bytes] | None = None,
        drop_uncarried: bool = False,
    ) -> None:
        self.link = link
        self.cipher = cipher
        self.local = local
        self.seqpacket = seqpacket
        self.shared = shared
        self.user = user  # whose credentials re-open the files the peer passes
        self.root = root  # of the program on the local socket: its files' paths are relative to it
        self.name = name
        self.rewrite = rewrite
        self.drop_uncarried = drop_uncarried
        self.sent = threading.Event()
        self.delivered = threading.Event()
        self.ended = threading.Event()
        self.link_lost = False
        self._pause_asked = False  # by our owner: its server stops, and the connection is kept
        self._paused = False  # we sent Pause: nothing more is read from the program, nor sent
        self._peer_paused = False  # the peer's Pause arrived: everything it sent is here
        self._conn = wire.UdsProxyConnection.opened(client)
        link.setblocking(False)
        local.setblocking(False)
        # A UNIX socket queues at most its sender's SO_SNDBUF (about 200 kB by
        # default): bigger, and a 256 kB frame goes to the program in one send.
        with contextlib.suppress(OSError):
            local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_BUFFER)
        self._next_channel = 2 if client else 3  # the peer numbers the other parity
        # Anonymous mappings, not bytearrays: an idle connection gives their
        # pages back (see _idle), so a burst does not cost RSS forever.
        self._out = mmap.mmap(-1, HEADER_SIZE + wire.MAX_DATA)
        self._out_view = memoryview(self._out)
        self._in = mmap.mmap(-1, 2 * (HEADER_SIZE + wire.MAX_FRAME))
        self._scratch = [self._out, self._in, *([cipher.scratch] if cipher.scratch is not None else [])]
        self._busy = False  # the buffers hold pages worth giving back
        self._in_view = memoryview(self._in)
        self._in_start = self._in_end = 0
        self._filled = True  # the handshake may have left records in the cipher
        self._leftover = leftover
        self._link_out: collections.deque[bytes | memoryview] = collections.deque()
        self._link_out_bytes = 0
        self._local_out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._local_out_bytes = 0
        self._reading_local = True  # no end of file from the program yet
        self._reading_link = True
        self._sending = True  # False once sending to the link failed
        self._peer_eof = False  # the peer's Eof on the data channel
        self._local_shut = False
        self._pipes: dict[int, _Pipe] = {}
        self._arriving_fds: list[int] | None = None  # delivered with the next Data frame
        self._discard_next = False  # the next Data frame belonged to refused fds
        self._awaiting: collections.deque[Submission | None] = collections.deque()
        self._submissions: collections.deque[Submission] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._masks: dict[int, int] = {}
        self._local_fd = local.fileno()
        self._link_fd = link.fileno()
        self._want(self._wake_r, _IN)
        self._console = local if isinstance(local, ptys.PtyEnd) and local.watch >= 0 else None

    # -- called from other threads ---------------------------------------------------

    def submit(self, submission: Submission) -> bool:
        """Queue a sendmsg with fds; False if the relay has ended (the caller answers)."""
        with self._lock:
            if self._closed:
                return False
            self._submissions.append(submission)
            self._wake()
        return True

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            if not self._closed:
                self._wake()

    def pause(self) -> None:
        """End without losing a byte either way, to be attached again: the `Pause` handshake."""
        with self._lock:
            self._pause_asked = True
            if not self._closed:
                self._wake()

    @property
    def stopped(self) -> bool:
        """Told to `stop` (its owner ends it), rather than ended by either side."""
        return self._stopping

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._leftover:
                size = len(self._leftover)
                self._in[:size] = self._leftover
                self._in_end = size
                self._frames()
            while not self._finished():
                self._turn()
            if self._reading_link and not self._stopping:
                self._linger()
        except (OSError, ProtocolError, ssl.SSLError, UnsupportedFdError) as exc:
            log.warning("%s: connection ended: %s", self.name, exc)
            self.link_lost = not self._peer_eof and not self._stopping
        finally:
            self._close()

    def _finished(self) -> bool:
        if self._stopping:
            return True
        if self._paused and self._peer_paused and not self._local_out and not self._link_out:
            self.link_lost = True  # nothing is lost: everything either side sent arrived
            return True
        if not self._reading_link:  # the link ended: deliver what arrived, then end
            return not self._local_out and not any(pipe.pending for pipe in self._pipes.values())
        data_done = not self._reading_local and self._peer_eof and not self._local_out
        return (
            data_done
            and not self._pipes
            and not self._awaiting
            and not self._submissions
            and not self._link_out
            and not self._arriving_fds
        )

    def _want(self, fd: int, mask: int) -> None:
        if self._masks.get(fd, 0) == mask:
            return
        if mask:
            self._poll.register(fd, mask)
            self._masks[fd] = mask
        else:
            self._poll.unregister(fd)
            del self._masks[fd]

    def _turn(self) -> None:
        local_fd, link_fd = self._local_fd, self._link_fd
        link_room = self._link_out_bytes < HIGH_WATER
        reading_local = self._reading_local and link_room and not self._paused
        local = (_IN if reading_local else 0) | (_OUT if self._local_out else 0)
        console = self._console
        if console is not None:
            # Nobody has the console open: its master only polls POLLHUP, and
            # what waits for it is dropped; the watch says when it is opened.
            if not console.attached:
                self._local_out.clear()
                self._local_out_bytes = 0
                local = 0
            self._want(console.watch, 0 if console.attached else _IN)
        if self._masks.get(local_fd, 0) != local:
            self._want(local_fd, local)
        reading_link = self._reading_link and self._local_out_bytes < HIGH_WATER
        link = (_IN if reading_link else 0) | (_OUT if self._link_out else 0)
        if self._masks.get(link_fd, 0) != link:
            self._want(link_fd, link)
        if self._pipes:
            for pipe in self._pipes.values():
                if pipe.reading:
                    self._want(pipe.fd, _IN if pipe.window.credit > 0 and link_room and not self._paused else 0)
                else:
                    self._want(pipe.fd, _OUT if pipe.pending else 0)
        # Plaintext already decrypted (or records already received) does not
        # make the socket readable again: do not wait for it.
        timeout = 0 if reading_link and self._filled and self.cipher.buffered() else None
        if timeout is None and self._busy:
            timeout = IDLE_MS
        ready = self._poll.poll(timeout)
        if not ready and timeout == IDLE_MS:
            self._idle()
            return
        if timeout == 0 and not any(fd == link_fd for fd, _ in ready):
            ready.append((link_fd, _IN))
        for fd, events in ready:
            if fd == local_fd:
                if events & _OUT or (events & _TROUBLE and self._local_out):
                    self._flush_local()
                # Not once paused, even when the poll said readable before the pause in this turn:
                # nothing goes out after our Pause.
                if events & ~_OUT and self._reading_local and not self._paused:
                    self._read_local()
            elif fd == link_fd:
                if events & _OUT:
                    self._flush_link()
                if events & ~_OUT and self._reading_link:
                    self._read_link()
            elif fd == self._wake_r:
                self._woken()
            elif self._console is not None and fd == self._console.watch:
                self._console.opened()
            else:
                channel = next((c for c, p in self._pipes.items() if p.fd == fd), None)
                if channel is not None:
                    self._pipe_ready(channel, self._pipes[channel])

    # -- program -> peer ------------------------------------------------------------------

    def _idle(self) -> None:
        """Quiet for a while after bulk traffic: return the buffers' pages (they read as zeros)."""
        self._busy = False
        if self._in_start == self._in_end:
            self._in_start = self._in_end = 0
            for buffer in self._scratch:
                buffer.madvise(mmap.MADV_DONTNEED)

    def _read_local(self) -> bool:
        """One receive from the program; False when nothing was there."""
        try:
            count, ancillary, flags, _ = self.local.recvmsg_into(
                [self._out_view[HEADER_SIZE:]], CONTROL_SPACE, _MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            count, ancillary, flags = 0, [], 0
        passed = fds_of(ancillary) if ancillary else []
        if flags & _MSG_CTRUNC or (self.seqpacket and flags & _MSG_TRUNC):
            close_all(passed)
            raise OSError(errno.EMSGSIZE, "a message or its fds were truncated; ending the connection")
        if passed:
            self._carry_passed(passed)  # empties the list
        if not count and not ancillary:  # a message of no bytes but fds is not the end
            self._reading_local = False
            self._send_link(self._conn.send(wire.Eof()))
            if not self._link_out:
                self.sent.set()
            return True
        self._out[:HEADER_SIZE] = wire.data_header(wire.DATA_CHANNEL, count)
        self._send_link(self._out_view[: HEADER_SIZE + count])
        if count > BUSY:
            self._busy = True
        return True

    def _carry_passed(self, passed: list[int]) -> None:
        """fds that arrived on the local socket itself (not through the shim's request)."""
        try:
            prepared = prepare_all(passed, self.shared, self.root)
        except UnsupportedFdError as exc:
            code, why = errno.EOPNOTSUPP, f"fd {exc.fd}, {exc.kind}, which cannot be carried"
        except OSError as exc:  # an fstat that failed (a FUSE file, say)
            code, why = exc.errno or errno.EIO, f"an fd that cannot be described ({exc})"
        else:
            if self._room_for(description for description, _ in prepared):
                self._send_fds(prepared, None)
                return
            close_all([kept for _, kept in prepared if kept is not None])
            code, why = errno.EMFILE, _TOO_MANY_PIPES
        finally:
            close_all(passed)
        outcome = "its message goes on without fds" if self.drop_uncarried else "ending the connection"
        log.error("%s: the program passed %s; %s", self.name, why, outcome)
        if not self.drop_uncarried:
            raise OSError(code, why)

    def _room_for(self, passed: Iterable[wire.FdDescription]) -> bool:
        """Whether the pipes among ``passed`` fit beside this connection's open ones (MAX_PIPES)."""
        return len(self._pipes) + sum(1 for description in passed if description.is_pipe) <= MAX_PIPES

    def _send_fds(self, prepared: Prepared, submission: Submission | None) -> None:
        descriptions = []
        for description, kept in prepared:
            if kept is not None:
                channel = self._next_channel
                self._next_channel += 2
                self._pipes[channel] = _Pipe(kept, reading=description.kind == "pipe_r")
                description = dataclasses.replace(description, channel=channel)
            descriptions.append(description)
        self._send_link(self._conn.send(wire.Fds(tuple(descriptions))))
        self._awaiting.append(submission)

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        if self._pause_asked:
            self._pause()
        while True:
            with self._lock:
                if not self._submissions:
                    return
                submission = self._submissions.popleft()
            self._submit(submission)

    def _submit(self, submission: Submission) -> None:
        # What the program wrote before its sendmsg is in the local socket
        # already (a write returns once the bytes are queued): send it first.
        while self._reading_local and not self._paused and self._read_local():
            pass
        if self._paused or not self._reading_local or not self._sending:
            submission.fail(errno.EPIPE)
            return
        if not self._room_for(description for description, _ in submission.prepared):
            log.warning("%s: the program passed %s", self.name, _TOO_MANY_PIPES)
            submission.fail(errno.EMFILE)
            return
        self._send_fds(submission.prepared, submission)
        submission.prepared = []
        data = submission.data
        for at in range(0, len(data), wire.MAX_DATA):
            self._send_link(self._conn.send(wire.Data(data[at : at + wire.MAX_DATA])))

    def _pause(self) -> None:
        """Read nothing more from the program and send nothing more after our Pause."""
        if not self._paused:
            self._send_link(self._conn.send(wire.Pause()))
            self._paused = True

    def _send_link(self, data: memoryview | bytes) -> None:
        if not self._sending:
            return
        sealed = self.cipher.seal(data)
        sent = 0
        if not self._link_out:
            try:
                sent = self.link.send(sealed)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError) as exc:
                self._send_failed(str(exc))
                return
            if sent == len(sealed):
                return
        # TLS output is a fresh object: keep a view of what is left.  Plain
        # frames are views of our reused buffer: keep a copy.
        self._queue_link(memoryview(sealed)[sent:] if isinstance(sealed, bytes) else bytes(sealed[sent:]))

    def _queue_link(self, rest: memoryview | bytes) -> None:
        """Keep ``rest`` to go out on the link when it can take it, within LINK_OUT_LIMIT."""
        self._link_out.append(rest)
        self._link_out_bytes += len(rest)
        if self._link_out_bytes > LINK_OUT_LIMIT:
            raise RemoteProtocolError(f"the peer left {self._link_out_bytes} bytes unread; it does not read its link")

    def _flush_link(self) -> None:
        while self._link_out:
            head = self._link_out[0]
            try:
                sent = self.link.send(head)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError) as exc:
                self._send_failed(str(exc))
                return
            self._link_out_bytes -= sent
            if sent < len(head):
                self._link_out[0] = memoryview(head)[sent:]
                return
            self._link_out.popleft()
        if not self._reading_local:
            self.sent.set()

    def _send_failed(self, why: str) -> None:
        """Nothing more can go out; what the peer sent before it closed is still read."""
        if not self._sending:
            return
        self._sending = False
        if not (self._peer_eof and not self._reading_local):
            log.info("%s: the peer went away (%s)", self.name, why)
        self._link_out.clear()
        self._link_out_bytes = 0
        for channel, pipe in list(self._pipes.items()):
            if pipe.reading:  # its bytes have nowhere to go
                self._end_pipe(channel, tell=False)

    def _link_down(self, why: str) -> None:
        """The link ended: what arrived is still delivered, nothing more is sent."""
        if not self._peer_eof:
            # Unless its owner attaches it again, the program here will read an end of file the far
            # program never sent.
            log.warning("%s: the link ended before the far program's end of stream (%s)", self.name, why)
            self.link_lost = True
        self._send_failed(why)
        self._reading_link = False
        self._unanswered()

    def _unanswered(self) -> None:
        """fds sent that the peer will never answer for: their senders get ECONNRESET."""
        for waiting in self._awaiting:
            if waiting is not None:
                waiting.answer(errno.ECONNRESET)
        self._awaiting.clear()

    # -- peer -> program ------------------------------------------------------------------

    def _read_link(self) -> None:
        if len(self._in) - self._in_end < HEADER_SIZE + wire.MAX_FRAME:
            size = self._in_end - self._in_start
            self._in[:size] = self._in[self._in_start : self._in_end]
            self._in_start, self._in_end = 0, size
        try:
            into = self._in_view[self._in_end :]
            count = self.cipher.fill(self.link, into)
            # Only a full buffer can leave decrypted bytes behind in the cipher.
            self._filled = count == len(into)
            if count > BUSY:
                self._busy = True
        except (PeerClosed, ConnectionResetError, BrokenPipeError) as exc:
            self._link_down(str(exc))
            return
        output = self.cipher.output()
        if output and self._sending:  # e.g. a TLS key update answer
            self._queue_link(output)
        self._in_end += count
        self._frames()

    def _frames(self) -> None:
        # The payload views need no release: the buffer is a mapping that is
        # never resized, and _close tolerates views still alive.
        frames, used = split_frames(self._in_view[self._in_start : self._in_end], wire.MAX_FRAME)
        for kind, channel, payload in frames:
            self._frame(kind, channel, payload)
        self._in_start += used
        if self._in_start == self._in_end:
            self._in_start = self._in_end = 0

    def _frame(self, kind: int, channel: int, payload: memoryview) -> None:
        if kind == wire.T_DATA:  # the data path: the payload stays a view, without an event
            if channel == wire.DATA_CHANNEL:
                if self._peer_eof:
                    raise RemoteProtocolError("data after end of file")
                if self._discard_next:
                    self._discard_next = False
                    return
                passed, self._arriving_fds = self._arriving_fds or [], None
                if self.rewrite is None:
                    self._write_local(payload, passed)
                    return
                data = self.rewrite(bytes(payload))
                if passed and not data:
                    data = self.rewrite(b"")  # fds travel with bytes: release what was held for them
                self._write_local(data, passed)
                return
            pipe = self._pipes.get(channel)
            if pipe is not None and not pipe.reading and not pipe.ending:
                pipe.window.received(len(payload))
                pipe.pending.append(bytes(payload))
                self._write_pipe(channel, pipe)
            # else: a channel this side already ended; its bytes have nowhere to go
            return
        # Any other frame (a Hello, a Connect, an unknown type) is refused here.
        event = self._conn.event_of(kind, channel, bytes(payload))
        if isinstance(event, wire.Eof) and channel == wire.DATA_CHANNEL:
            if self.rewrite is not None and (rest := self.rewrite(b"")):
                self._write_local(rest, [])
            self._peer_eof = True
            self._flush_local()
        elif isinstance(event, wire.Pause):
            self._peer_paused = True
            self._pause()
        elif isinstance(event, wire.Fds):
            self._receive_fds(event.fds)
        elif isinstance(event, wire.FdsResult):
            if not self._awaiting:
                raise RemoteProtocolError("an fd result nobody waits for")
            submission = self._awaiting.popleft()
            code = errno_number(event.error) if event.error else 0
            if submission is not None:
                submission.answer(code)
            elif code:
                log.error("%s: the peer could not deliver passed fds: %s", self.name, event.error)
        elif (pipe := self._pipes.get(channel)) is None:
            return
        elif isinstance(event, wire.Window):
            if pipe.reading:
                pipe.window.granted(event.increment)
        elif pipe.reading:  # Eof: the far program closed its end: stop reading ours
            self._end_pipe(channel, tell=False)
        else:
            pipe.ending = True
            self._write_pipe(channel, pipe)

    def _receive_fds(self, descriptions: tuple[wire.FdDescription, ...]) -> None:
        if self.user is None:
            raise RemoteProtocolError("fds passed on a connection that carries none")
        if self._arriving_fds is not None:
            raise RemoteProtocolError("two fd messages without data between them")
        for description in descriptions:
            if description.channel and (
                description.channel % 2 == self._next_channel % 2 or description.channel in self._pipes
            ):
                raise RemoteProtocolError(f"pipe channel {description.channel} is not the peer's to open")
        try:
            if not self._room_for(descriptions):
                raise OSError(errno.EMFILE, _TOO_MANY_PIPES)
            made = materialize_all(descriptions, self.shared, self.user)
        except OSError as exc:
            reason = errno_name(exc.errno or errno.EIO)
            log.error("%s: cannot deliver passed fds here: %s", self.name, exc)
            self._send_link(self._conn.send(wire.FdsResult(reason)))
            # Without drop_uncarried the sender's program learns of it and its bytes are dropped with
            # the fds; with it, they go on alone, as a refusal on the sending side would have them.
            self._discard_next = not self.drop_uncarried
            return
        for description, (_, kept) in zip(descriptions, made, strict=True):
            if kept is not None:
                self._pipes[description.channel] = _Pipe(kept, reading=description.kind == "pipe_w")
        self._arriving_fds = [app_fd for app_fd, _ in made]
        self._send_link(self._conn.send(wire.FdsResult()))

    def _write_local(self, data: memoryview | bytes, passed: list[int]) -> None:
        if self._local_shut:
            close_all(passed)
            return
        if not self._local_out:
            if passed:
                sent = self._send_local(data, passed)
            else:  # the common case, without a call
                try:
                    sent = self.local.send(data)
                except BlockingIOError:
                    sent = 0
                except (BrokenPipeError, ConnectionResetError):
                    sent = None
                    self._program_gone()
            if sent is None or sent == len(data):  # the program is gone, or took it all
                return
            data = data[sent:]
        rest = bytes(data)
        self._local_out.append((rest, passed))
        self._local_out_bytes += len(rest)

    def _send_local(self, data: memoryview | bytes, passed: list[int]) -> int | None:
        """Bytes the program's socket took; None if the program is gone (the data is dropped).

        Once sendmsg returns, our copies of ``passed`` are closed and the list
        emptied, even if it took no bytes: a zero-length SOCK_SEQPACKET message
        delivers its fds and returns 0.
        """
        try:
            if passed:
                rights = array.array("i", passed).tobytes()
                sent = self.local.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                close_all(passed)
                return sent
            return self.local.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            self._program_gone()
            close_all(passed)
            return None

    def _program_gone(self) -> None:
        self._local_shut = True
        for _, passed in self._local_out:
            close_all(passed)
        self._local_out.clear()
        self._local_out_bytes = 0

    def _flush_local(self) -> None:
        while self._local_out:
            data, passed = self._local_out[0]
            sent = self._send_local(data, passed)
            if sent is None:
                return
            self._local_out_bytes -= sent
            if sent < len(data):
                self._local_out[0] = (data[sent:], passed)
                return
            self._local_out.popleft()
        if self._peer_eof and not self._local_shut:
            self._local_shut = True
            with contextlib.suppress(OSError):
                self.local.shutdown(socket.SHUT_WR)
        if self._peer_eof and not self._local_out:
            self.delivered.set()

    # -- pipe channels ----------------------------------------------------------------------

    def _pipe_ready(self, channel: int, pipe: _Pipe) -> None:
        if not pipe.reading:
            self._write_pipe(channel, pipe)
            return
        if self._paused:
            return
        limit = min(pipe.window.credit, wire.MAX_DATA)
        try:
            count = os.readv(pipe.fd, [self._out_view[HEADER_SIZE : HEADER_SIZE + limit]])
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("%s: pipe channel %d: %s", self.name, channel, exc.strerror)
            count = 0
        if not count:
            self._end_pipe(channel, tell=True)
            return
        pipe.window.sent(count)
        self._out[:HEADER_SIZE] = wire.data_header(channel, count)
        self._send_link(self._out_view[: HEADER_SIZE + count])

    def _write_pipe(self, channel: int, pipe: _Pipe) -> None:
        written = 0
        while pipe.pending:
            head = pipe.pending[0]
            try:
                count = os.write(pipe.fd, head)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the program closed its read end
                self._end_pipe(channel, tell=True)
                return
            written += count
            if count < len(head):
                pipe.pending[0] = head[count:]
                break
            pipe.pending.popleft()
        if written and (increment := pipe.window.consumed(written)):
            self._send_link(self._conn.send(wire.Window(channel, increment)))
        if pipe.ending and not pipe.pending:
            self._end_pipe(channel, tell=False)

    def _end_pipe(self, channel: int, *, tell: bool) -> None:
        pipe = self._pipes.pop(channel)
        self._want(pipe.fd, 0)
        os.close(pipe.fd)
        if tell:
            self._send_link(self._conn.send(wire.Eof(channel)))

    # -- the end ---------------------------------------------------------------------------------

    def _linger(self) -> None:
        """End the link without a reset: the peer may still be sending (credits, say).

        Closing a socket with unread bytes resets the connection, and a
        reset can make the peer lose what it has not read yet.  So: end our
        direction, then read and drop until the peer ends its own, briefly.
        """
        with contextlib.suppress(OSError):
            self.link.shutdown(socket.SHUT_WR)
            poller = select.poll()
            poller.register(self.link.fileno(), _IN)
            for _ in range(64):
                if not poller.poll(LINGER_MS) or not self.link.recv_into(self._in_view):
                    return

    def _close(self) -> None:
        self.sent.set()
        self.delivered.set()
        try:
            self._release()
        finally:
            self.ended.set()

    def _release(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._submissions)
            self._submissions.clear()
        for submission in pending:
            submission.fail(errno.EPIPE)
        self._unanswered()
        close_all(self._arriving_fds or [])
        self._program_gone()
        for pipe in self._pipes.values():
            os.close(pipe.fd)
        self._pipes.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.local.close()
        self.link.close()
        # Unmap now rather than whenever the relay object is collected.
        with contextlib.suppress(BufferError):
            self._in_view.release()
            self._out_view.release()
            self.cipher.release()
            for buffer in self._scratch:
                buffer.close()


def close_all(passed: list[int]) -> None:
    """Close the fds and empty the list, so that a list closed once is never closed again.

    A second close of the same numbers would close whatever the daemon opened
    under them meanwhile (another connection's socket).
    """
    for fd in passed:
        with contextlib.suppress(OSError):
            os.close(fd)
    passed.clear()


Prepared = list[tuple[wire.FdDescription, int | None]]


def prepare_all(fds: Iterable[int], shared: tuple[str, ...], root: str) -> Prepared:
    """`fdpass.prepare` for every fd, all or none: on failure the pipe ends kept so far are closed."""
    prepared: Prepared = []
    try:
        for fd in fds:
            prepared.append(fdpass.prepare(fd, shared, root))
    except BaseException:
        close_all([kept for _, kept in prepared if kept is not None])
        raise
    return prepared


def materialize_all(
    descriptions: Iterable[wire.FdDescription], shared: tuple[str, ...], user: users.RemoteUser
) -> list[tuple[int, int | None]]:
    """`fdpass.materialize` for every description, all or none: on failure what was made is closed."""
    made: list[tuple[int, int | None]] = []
    try:
        for description in descriptions:
            made.append(fdpass.materialize(description, shared, user))
    except BaseException:
        close_all([fd for pair in made for fd in pair if fd is not None])
        raise
    return made


def detach(stream: trio.abc.Stream) -> tuple[socket.socket, PlainCipher]:
    """The socket under an authenticated stream and its cipher, for a Relay; the stream must not be used again."""
    # The session the handshake made continues in the relay thread.
    cipher = TlsCipher(*stream.session()) if isinstance(stream, TlsStream) else PlainCipher()
    raw = stream.raw if isinstance(stream, TlsStream) else stream
    assert isinstance(raw, trio.SocketStream)
    link = socket.socket(fileno=raw.socket.detach())
    if link.family in (socket.AF_INET, socket.AF_INET6):
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # An idle connection over a dead link ends within about a minute.
        link.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    return link, cipher


async def run_in_thread(relay: Relay, limiter: trio.CapacityLimiter | None = None) -> None:
    """Run ``relay`` in a thread of its own until it ends; cancelled, it is stopped and waited for."""
    async with aio.open_nursery() as nursery:

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                relay.stop()

        nursery.start_soon(stop_when_cancelled)
        # Shielded: the thread always runs, so the relay always closes what it owns.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(relay.run, limiter=limiter or trio.CapacityLimiter(1))
        nursery.cancel_scope.cancel()
