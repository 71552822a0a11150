"""rexec: run a program on the other machine through a local stand-in.

This process is the stand-in (see DESIGN.md): its parent sees it as the
program.  It describes its own file descriptors, hands the ones that carry
bytes to the local rexec_server (the agent) over a UNIX socket, and then
only waits: it forwards the signals it receives, holds the pidmap file's
lock, and ends exactly as the remote program ended.  All byte relaying is
done by the agent, which already has a warm, authenticated link; that keeps
this program small, synchronous and quick to start (no trio here).

Exit status: the remote program's; death by the same signal when the remote
program was killed; 126 when it may not run there (or an fd cannot be
carried); 127 when it does not exist there; 255 for rexec's own failures
(agent unreachable, link lost).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from typing import NoReturn

from offload import fdinfo
from offload.protocol import local
from offload.protocol.framing import CLOSED, NEED_DATA, Frame, FrameDecoder

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

#: Signals a caller may send to the stand-in that the remote program receives.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
    signal.SIGALRM,
)

# fd types whose fd travels to the agent (it relays their bytes).
_PASSED_TYPES = frozenset(
    {
        fdinfo.PIPE_READ,
        fdinfo.PIPE_WRITE,
        fdinfo.UNIX_STREAM,
        fdinfo.UNIX_LISTENER,
        fdinfo.STREAM,
    }
)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    os.write(2, f"rexec: {message}\n".encode(errors="surrogateescape"))
    os._exit(code)


def die_by_signal(signum: int) -> NoReturn:
    """End this process with ``signum`` so waitpid() in the parent sees it."""
    import resource  # only on this path: keep start-up imports small

    # The remote program may have dumped core; the stand-in must not.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # these have no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
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
    }
    return request, passed


class StandIn:
    def __init__(self, sock: socket.socket, pidfile: str | None) -> None:
        self.sock = sock
        self.pidfile = pidfile
        self.decoder = FrameDecoder(max_payload=local.MAX_REQUEST)
        self.pidmap_fds: list[int] = []
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_read = wake_read
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in FORWARDED_SIGNALS:
            # The C-level handler writes the number to the wakeup fd; the
            # Python-level one has nothing left to do.
            signal.signal(signum, lambda *_: None)

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
            name = signal.Signals(signum).name
            self.send(local.encode(local.L_SIGNAL, {"signal": name}))

    def send(self, data: bytes) -> None:
        try:  # noqa: SIM105 (contextlib costs start-up time here)
            self.sock.sendall(data)
        except OSError:
            pass  # the agent is gone; receive() reports it

    def receive(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            data, fds = b"", []
        self.pidmap_fds.extend(fds)
        self.decoder.receive_data(data)
        while True:
            try:
                frame = self.decoder.next_frame()
            except Exception as exc:
                fail(f"bad message from the local rexec_server: {exc}")
            if frame is NEED_DATA:
                return
            if frame is CLOSED:
                fail("the local rexec_server closed the connection")
            assert isinstance(frame, Frame)
            try:
                document = local.decode(frame.payload)
            except ValueError as exc:
                fail(f"bad message from the local rexec_server: {exc}")
            self.handle(frame.type, document)

    def handle(self, type: int, document: dict) -> None:
        if type == local.L_STARTED:
            # The agent wrote and locked /var/run/rexec/pids/<our pid>; holding
            # the passed fd holds the lock for as long as we live.
            return
        if type == local.L_REFUSED:
            fail(str(document.get("message", "refused")), int(document.get("code", EXIT_REFUSED)))
        if type == local.L_LINK_LOST:
            fail(str(document.get("message", "link lost")))
        if type == local.L_EXITED:
            if "signal" in document:
                die_by_signal(signal.Signals[document["signal"]])
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
            os.read(ready_read, 1)  # the child has written the pidfile
            os._exit(foreground_code)
        os.close(ready_read)
        os.setsid()
        # Like the remote daemon, let go of the caller's stdio so that a
        # caller waiting for EOF on our stdout or stderr is not held up.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        if self.pidfile:
            try:
                with open(self.pidfile, "w") as stream:
                    stream.write(f"{os.getpid()}\n")
            except OSError as exc:
                self.send(local.encode(local.L_SIGNAL, {"signal": "SIGTERM"}))
                fail(f"cannot write the daemon pidfile {self.pidfile}: {exc}")
        self.send(local.encode(local.L_ADOPT, {"pid": os.getpid()}))
        os.close(ready_write)


def main(argv: list[str] | None = None) -> NoReturn:
    pidfile, program = parse_args(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(local.AGENT_SOCKET_ENV) or local.DEFAULT_AGENT_SOCKET
    # Describe our fds before opening any of our own.
    request, passed = build_request(program, pidfile)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
        sent = socket.send_fds(sock, [head], passed) if passed else sock.send(head)
        sock.sendall(message[sent:])
    except OSError as exc:
        fail(f"cannot send the request to the local rexec_server at {path}: {exc.strerror or exc}")
    # Our copies stay open: libvirt's pidfile lock and listeners live here.
    stand_in.run()


if __name__ == "__main__":
    main()
