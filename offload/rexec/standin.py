"""rexec: run a program on the other machine through a local stand-in.

This process is the stand-in (ARCHITECTURE.md: what it sends and then only waits for).  All byte
relaying is done by the agent, which already has a warm, authenticated link; that keeps this program
small, synchronous and quick to start (no trio here).

Exit status: the remote program's; death by the same signal when the remote
program was killed; 126 when it may not run there (or an fd cannot be
carried); 127 when it does not exist there; 255 for rexec's own failures
(agent unreachable, link lost).
"""

from __future__ import annotations

# Start-up time is this program's cost (the pipeline of every remote
# program pays it), so it uses the C modules directly: `socket` and
# `signal` would import enum, `typing` and `json` would import re.
import _signal
import _socket
import errno
import os
import resource
import select
import stat
import sys

from offload import fdinfo
from offload.protocol import local
from offload.protocol.framing import CLOSED, NEED_DATA, Frame, FrameDecoder

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy: always_true)
if TYPE_CHECKING:
    from typing import NoReturn

USAGE = """\
usage: rexec [--daemon-pidfile FILE] [--] PROGRAM [ARGS ...]

Run PROGRAM on the machine named by CMD_NET_ADDR (or the local
rexec_server's default peer) as if it were a local child of the caller:
stdio, inherited fds, signals and the exit status are carried.

  --daemon-pidfile FILE  PROGRAM daemonizes and writes its pid to FILE on
                         the remote side; rexec returns when the foreground
                         process does, leaves a stand-in for the daemon and
                         writes that stand-in's pid to FILE here.

environment:
  CMD_NET_ADDR        remote rexec_server: tcp://HOST:PORT, vsock://CID:PORT
  REXEC_AGENT_SOCKET  local rexec_server socket (default {socket})
"""

EXIT_REFUSED = 126
EXIT_FAILURE = 255

#: Signals a caller may send to the stand-in that the remote program receives, by number and name.
SIGNAL_NAMES = {
    getattr(_signal, name): name
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT", "SIGALRM")
}
FORWARDED_SIGNALS = tuple(SIGNAL_NAMES)


def signal_number(name: str) -> int:
    """SIGTERM -> 15, by the C module's own constants (names travel, numbers differ by arch)."""
    number = getattr(_signal, name, None) if name.startswith("SIG") and not name.startswith("SIG_") else None
    if not isinstance(number, int):
        fail(f"unknown signal {name!r} from the local rexec_server")
    return number


# fd types whose fd travels to the agent (it relays their bytes).
_PASSED_TYPES = frozenset(
    {fdinfo.PIPE_READ, fdinfo.PIPE_WRITE, fdinfo.UNIX_STREAM, fdinfo.UNIX_LISTENER, fdinfo.STREAM}
)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    os.write(2, f"rexec: {message}\n".encode(errors="surrogateescape"))
    os._exit(code)


def die_by_signal(signum: int) -> NoReturn:
    """End this process with ``signum`` so waitpid() in the parent sees it."""
    # The remote program may have dumped core; the stand-in must not.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (_signal.SIGKILL, _signal.SIGSTOP):  # these have no handler to reset
        _signal.signal(signum, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    # Still alive: the signal does not terminate by default (or cannot be
    # raised here), so report it the way a shell would.
    os._exit(128 + signum)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    pidfile = None
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE.format(socket=local.DEFAULT_AGENT_SOCKET))
            os._exit(0)
        if arg == "--daemon-pidfile":
            if index + 1 >= len(argv):
                fail("--daemon-pidfile needs a FILE", 2)
            pidfile = argv[index + 1]
            index += 2
            continue
        if arg.startswith("--daemon-pidfile="):
            pidfile = arg.partition("=")[2]
            index += 1
            continue
        if arg.startswith("-") and arg != "-":
            fail(f"unknown option {arg} (see rexec --help)", 2)
        break
    program = argv[index:]
    if not program:
        fail("no PROGRAM given (see rexec --help)", 2)
    if pidfile is not None and not pidfile.startswith("/"):
        pidfile = os.path.abspath(pidfile)
    return pidfile, program


def write_pidfile(path: str, pid: int) -> None:
    """Write ``pid`` to ``path``, never through a link and never into anything but a regular file.

    The pidfile's directory may be served by the other machine (libvirt's
    probe puts it under /var/lib/libvirt, a qtfs mount), and we run as
    root: a symlink or FIFO planted there must not steer or stall the write.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)


def own_rlimits() -> dict[str, list[int | str]]:
    """Our limits of `local.RLIMITS`: libvirt set them in its child before it exec'ed us, for the program."""
    limits: dict[str, list[int | str]] = {}
    for name in local.RLIMITS:
        pair = resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))
        limits[name] = [local.UNLIMITED if v == resource.RLIM_INFINITY else v for v in pair]
    return limits


def build_request(program: list[str], pidfile: str | None) -> tuple[dict, list[int]]:
    descriptions = [fdinfo.describe(fd) for fd in fdinfo.open_fds()]
    passed = [
        d["fd"] for d in descriptions if d["type"] in _PASSED_TYPES or (d["type"] == fdinfo.FILE and d["fd"] <= 2)
    ]
    for description in descriptions:
        description["passed"] = description["fd"] in passed
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "target": os.environ.get("CMD_NET_ADDR") or None,
        "argv": [os.fsdecode(a) for a in program],
        "env": {os.fsdecode(k): os.fsdecode(v) for k, v in os.environb.items()},
        "cwd": cwd,
        "umask": umask,
        "fds": descriptions,
        "daemon_pidfile": pidfile,
        "rlimits": own_rlimits(),
    }
    return request, passed


class StandIn:
    def __init__(self, sock: _socket.socket, pidfile: str | None) -> None:
        self.sock = sock
        self.pidfile = pidfile
        self.decoder = FrameDecoder(max_payload=local.MAX_REQUEST)
        self.started = 0  # STARTED messages: the first, then one per adoption
        self.pidmap_fds: list[bytes] = []  # SCM_RIGHTS payloads; the fds stay open
        self.wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in FORWARDED_SIGNALS:
            # The C-level handler writes the number to the wakeup fd; the
            # Python-level one has nothing left to do.
            _signal.signal(signum, lambda *_: None)

    def run(self) -> NoReturn:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_read, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_read:
                    self.forward_signals()
                else:
                    self.receive()

    def forward_signals(self) -> None:
        try:
            numbers = os.read(self.wake_read, 64)
        except BlockingIOError:
            return
        for signum in numbers:
            if signum in SIGNAL_NAMES:
                self.send(local.encode(local.L_SIGNAL, {"signal": SIGNAL_NAMES[signum]}))

    def send(self, data: bytes) -> None:
        try:  # noqa: SIM105 (contextlib costs start-up time here)
            self.sock.sendall(data)
        except OSError:
            pass  # the agent is gone; receive() reports it

    def receive(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, _socket.CMSG_SPACE(16), _socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            data, ancillary = b"", []
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                # Held, never used: the pidmap file's lock lives with us.
                self.pidmap_fds.append(payload)
        self.decoder.receive_data(data)
        while True:
            try:
                frame = self.decoder.next_frame()
                if frame is NEED_DATA:
                    return
                if frame is CLOSED:
                    fail("the local rexec_server closed the connection")
                assert isinstance(frame, Frame)
                document = local.decode(frame.payload)
            except Exception as exc:
                fail(f"bad message from the local rexec_server: {exc}")
            self.handle(frame.type, document)

    def handle(self, type: int, document: dict) -> None:
        if type == local.L_STARTED:
            # The agent wrote and locked /var/run/rexec/pids/<our pid>; holding
            # the passed fd holds the lock for as long as we live.
            self.started += 1
            return
        if type == local.L_REFUSED:
            fail(str(document.get("message", "refused")), int(document.get("code", EXIT_REFUSED)))
        if type == local.L_LINK_LOST:
            fail(str(document.get("message", "link lost")))
        if type == local.L_EXITED:
            if document.get("lost"):
                fail("the remote program ended while its rexec_server restarted; how is not known")
            if "signal" in document:
                die_by_signal(signal_number(str(document["signal"])))
            os._exit(int(document["code"]))
        if type == local.L_DAEMONIZED:
            self.daemonize(int(document["code"]))
            return
        fail(f"unexpected message {type:#x} from the local rexec_server")

    def daemonize(self, foreground_code: int) -> None:
        """Return the foreground status to our parent; a child stands in for the daemon."""
        ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid:
            os.close(ready_write)
            # A byte: the child stands in for the daemon.  None: it failed
            # (and said why on our stderr, which it still shared).
            os._exit(foreground_code if os.read(ready_read, 1) else EXIT_FAILURE)
        os.close(ready_read)
        os.setsid()
        if self.pidfile:
            try:
                write_pidfile(self.pidfile, os.getpid())
            except OSError as exc:
                self.send(local.encode(local.L_SIGNAL, {"signal": "SIGTERM"}))
                fail(f"cannot write the daemon pidfile {self.pidfile}: {exc}")
        # The agent checks that we are the first stand-in's child, so the
        # parent must live until the agent has answered with our pidmap.
        expected = self.started + 1
        self.send(local.encode(local.L_ADOPT, {"pid": os.getpid()}))
        while self.started < expected:
            self.receive()
        # Like the remote daemon, let go of the caller's stdio so that a
        # caller waiting for EOF on our stdout or stderr is not held up.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.write(ready_write, b"x")
        os.close(ready_write)


def main(argv: list[str] | None = None) -> NoReturn:
    pidfile, program = parse_args(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(local.AGENT_SOCKET_ENV) or local.DEFAULT_AGENT_SOCKET
    # Describe our fds before opening any of our own.
    request, passed = build_request(program, pidfile)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    stand_in = StandIn(sock, pidfile)
    try:
        sock.connect(path)
    except OSError as exc:
        fail(f"cannot reach the local rexec_server at {path}: {exc.strerror or exc}")
    try:
        message = local.encode(local.L_REQUEST, request)
    except Exception as exc:
        fail(f"request too large: {exc}", EXIT_REFUSED)
    try:
        # The fds ride with the first bytes; the rest follows as plain data.
        head = message[:65536]
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in passed))]
        sent = sock.sendmsg([head], rights if passed else [])
        # Only a rest that exists: sendall(b"") still makes one send(), and a
        # quick program may have run and the agent closed by then (EPIPE).
        if sent < len(message):
            sock.sendall(message[sent:])
    except OSError as exc:
        fail(f"cannot send the request to the local rexec_server at {path}: {exc.strerror or exc}")
    # Our copies stay open: libvirt's pidfile lock and listeners live here.
    stand_in.run()


if __name__ == "__main__":
    main()
