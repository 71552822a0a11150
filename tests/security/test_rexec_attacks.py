"""Callers on the DPU against the host's rexec_server, and against their own agent.

Each attack is judged by its effect: a root process of ours on the host side
stays alive, the server keeps serving, a signal's handler does not run, a
listener of ours sees no connection.  The attacker is `nobody` on the DPU
side (the lab maps root to root on purpose; `nobody` maps to itself), or root
where the point is that even a root caller gets no more than its program.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.lab.lab import Lab
from tests.conftest import gone, remote_pid_of, rexec, wait_for

pytestmark = pytest.mark.lab

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
REPO = Path(__file__).resolve().parents[2]


def rexec_as(lab: Lab, user: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``rexec ARGS`` on the DPU side as ``user`` (root or nobody)."""
    argv = [*(AS_NOBODY if user == "nobody" else []), *proc.program("rexec"), *args]
    return proc.run(lab.command("dpu", argv, cwd="/"), env=env or lab.env("dpu"), check=False, timeout=60, text=False)


@pytest.fixture
def attack_dir(shared: Path) -> Iterator[Path]:
    """A directory on the shared path that `nobody` may write on both sides."""
    path = shared / f"attack-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        end_stand_ins_naming(path)
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()


def end_stand_ins_naming(path: Path) -> None:
    """End detached stand-ins our attacks left (their command line names ``path``, unique to this test).

    Only a server that followed the wrong daemon leaves one; ending it is
    what makes that server signal the process it follows.
    """
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "offload.rexec_client" in cmdline and any(str(path) in arg for arg in cmdline):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@pytest.fixture
def victim() -> Iterator[subprocess.Popen]:
    """A root process of ours on the host side (the lab's sides share our pid namespace)."""
    process = proc.spawn(["sleep", "300"], stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("caller", ["nobody", "root"])
def test_daemon_pidfile_naming_another_process_is_not_followed(
    lab: Lab, attack_dir: Path, victim: subprocess.Popen, caller: str
) -> None:
    """The remote "daemon" is a host process the program did not start: nothing follows or signals it."""
    pidfile = attack_dir / f"{caller}.pid"
    script = f"echo {victim.pid} > {pidfile}"
    result = rexec_as(lab, caller, "--daemon-pidfile", str(pidfile), "/bin/sh", "-c", script)
    assert result.returncode == 126, result
    assert b"rexec: no daemon followed on host: pid" in result.stderr
    assert pidfile.read_text() == f"{victim.pid}\n"  # no stand-in took it over
    # The session is over and the server serves on; the victim was never touched.
    assert rexec(lab, "/bin/true").returncode == 0
    assert victim.poll() is None


def test_a_fifo_as_daemon_pidfile_does_not_block_the_server(lab: Lab, attack_dir: Path) -> None:
    fifo = attack_dir / "fifo.pid"
    try:
        result = rexec_as(lab, "nobody", "--daemon-pidfile", str(fifo), "/bin/sh", "-c", f"mkfifo {fifo}")
        assert result.returncode == 126, result
        assert b"is not a regular file" in result.stderr
        assert rexec(lab, "/bin/true", timeout=30).returncode == 0
    finally:
        unblock_fifo(fifo)


def unblock_fifo(fifo: Path) -> None:
    """Let a reader stuck opening ``fifo`` go (a server without the fix), and remove it."""
    try:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads it; ENOENT: never made
        writer = -1
    fifo.unlink(missing_ok=True)
    if writer >= 0:
        os.close(writer)


def test_daemon_pidfile_outside_the_shared_paths_is_not_read(lab: Lab, victim: subprocess.Popen) -> None:
    pidfile = Path("/tmp") / f"offload-attack-{uuid.uuid4().hex[:8]}.pid"
    try:
        result = rexec_as(
            lab, "nobody", "--daemon-pidfile", str(pidfile), "/bin/sh", "-c", f"echo {victim.pid} > {pidfile}"
        )
        assert result.returncode == 126, result
        assert b"beneath a shared path" in result.stderr
        assert victim.poll() is None
    finally:
        pidfile.unlink(missing_ok=True)
        end_stand_ins_naming(pidfile)


#: Speaks the agent's local protocol as a misbehaving stand-in: runs ARGV
#: remotely, sends the signals named in SIGNALS in order, prints the outcome.
SIGNALLING_STAND_IN = textwrap.dedent(
    """
    import json, os, socket, sys
    from offload.protocol import local
    from offload.protocol.framing import Frame, FrameDecoder

    argv, signals, ready = json.loads(sys.argv[1])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["REXEC_AGENT_SOCKET"])
    request = {"target": None, "argv": argv, "env": {}, "cwd": "/", "umask": 0o22, "fds": [], "daemon_pidfile": None}
    sock.sendall(local.encode(local.L_REQUEST, request))
    decoder = FrameDecoder(max_payload=local.MAX_REQUEST)

    def receive():
        while True:
            frame = decoder.next_frame()
            if isinstance(frame, Frame):
                return frame.type, local.decode(frame.payload)
            data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
            for fd in fds:
                os.close(fd)
            decoder.receive_data(data)

    type, document = receive()
    assert type == local.L_STARTED, (type, document)
    while not os.path.exists(ready):  # the remote shell has set its traps
        os.sched_yield()
    for name in signals:
        sock.sendall(local.encode(local.L_SIGNAL, {"signal": name}))
    print(json.dumps(receive()))
    """
)


def test_a_signal_outside_the_forwarded_set_is_not_delivered(lab: Lab, attack_dir: Path) -> None:
    """SIGXCPU (outside the set) then SIGWINCH (in it): only the second one's trap runs.

    The shell runs pending traps in signal-number order, so had SIGXCPU (24)
    been delivered before SIGWINCH (28), its trap would have run first.
    """
    marker, ready = attack_dir / "traps", attack_dir / "ready"
    script = (
        f"trap 'echo XCPU >> {marker}' XCPU; trap 'echo WINCH >> {marker}; exit 7' WINCH; "
        f": > {ready}; while :; do sleep 0.05; done"
    )
    plan = json.dumps([["/bin/sh", "-c", script], ["SIGXCPU", "SIGWINCH"], str(ready)])
    argv = [
        *AS_NOBODY,
        "/usr/bin/python3",
        "-I",
        "-c",
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + SIGNALLING_STAND_IN,
        plan,
    ]
    result = proc.run(lab.command("dpu", argv, cwd="/"), env=lab.env("dpu"), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [0x43, {"code": 7}]  # L_EXITED: the WINCH trap's exit
    assert marker.read_text() == "WINCH\n"


def test_cmd_net_addr_naming_an_unconfigured_peer_gets_no_connection(lab: Lab, attack_dir: Path) -> None:
    """The agent connects as root with the node's certificate: never to a caller's address."""
    trap = attack_dir / "trap.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(trap))
        os.chmod(trap, 0o777)
        listener.listen()
        listener.setblocking(False)
        env = lab.env("dpu") | {"CMD_NET_ADDR": f"unix://{trap}"}
        result = rexec_as(lab, "nobody", "/bin/true", env=env)
        assert result.returncode == 255
        assert result.stderr == f"rexec: unix://{trap} is not a configured peer\n".encode()
        with pytest.raises(BlockingIOError):
            listener.accept()
    # The configured peer, named or not, still works for the same caller.
    assert rexec_as(lab, "nobody", "/bin/true").returncode == 0
    named = lab.env("dpu") | {"CMD_NET_ADDR": lab.rexec_address(lab.host)}
    assert rexec_as(lab, "nobody", "/bin/true", env=named).returncode == 0


def test_a_legitimate_daemon_is_still_followed_and_ended(lab: Lab, attack_dir: Path) -> None:
    """qemu -daemonize's shape: fork, setsid, fork again; the grandchild writes the pidfile."""
    pidfile = attack_dir / "qemu.pid"
    script = f"setsid sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}' </dev/null >/dev/null 2>&1"
    result = rexec_as(lab, "nobody", "--daemon-pidfile", str(pidfile), "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    # The stand-in wrote its own pid: the DPU side's number for it.
    standin = lab.pid_here("dpu", int(pidfile.read_text()))
    assert "offload.rexec_client" in psutil.Process(standin).cmdline()
    remote = remote_pid_of(lab, standin)
    assert psutil.Process(remote).cmdline() == ["sleep", "300"]
    assert psutil.Process(remote).uids().real == NOBODY
    os.kill(standin, signal.SIGKILL)
    wait_for(lambda: gone(remote), 10, "the daemon's end")
