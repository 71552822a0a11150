"""rexec across the lab: the stand-in on the DPU side, programs on the host side."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.lab import mountns
from offload.lab.lab import LAB_RESUME_WINDOW, REXEC_KEEPALIVE, Lab
from tests.conftest import (
    MISSING,
    PYTHON,
    dup_at,
    gone,
    listener_at_fd,
    pidmap,
    remote_pid_of,
    rexec,
    server_pid,
    start_rexec,
    wait_for,
)
from tests.test_rexec_restart import read_line

pytestmark = pytest.mark.lab

#: dash (/bin/sh) takes only single-digit fds in redirections; bash takes any.
BASH = ("/usr/bin/env", "bash", "-c")


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 1", 1), ("exit 7", 7)])
def test_exit_codes(lab: Lab, script: str, code: int) -> None:
    assert rexec(lab, "/bin/sh", "-c", script).returncode == code


def test_not_allowed_is_126_with_message(lab: Lab) -> None:
    result = rexec(lab, "/usr/bin/id")
    assert result.returncode == 126
    assert result.stderr == b"rexec: /usr/bin/id: not allowed on host\n"


@pytest.mark.parametrize("program", [MISSING, "no-such-program"])
def test_missing_program_is_127(lab: Lab, program: str) -> None:
    result = rexec(lab, program)
    assert result.returncode == 127
    assert program.encode() in result.stderr and b"host" in result.stderr


def test_program_runs_in_the_host_namespace(lab: Lab) -> None:
    result = rexec(lab, "/usr/bin/env", "sh", "-c", "readlink /proc/self/ns/net")
    assert result.returncode == 0, result.stderr
    # /run/netns/NAME is a bind mount of the namespace's nsfs inode.
    assert result.stdout.decode().strip() == lab.netns_id("host")


def test_stdin_to_stdout(lab: Lab) -> None:
    result = rexec(lab, "cat", input=b"abc")
    assert (result.returncode, result.stdout) == (0, b"abc")


def test_stdin_eof_reaches_remote(lab: Lab) -> None:
    # wc only prints once stdin ends; a lost EOF would hang until the timeout.
    result = rexec(lab, "/bin/sh", "-c", "cat | wc -c", input=b"x" * 1000, timeout=20)
    assert result.stdout.strip() == b"1000"


def test_ten_mib_binary_output_intact(lab: Lab, shared: Path) -> None:
    data = os.urandom(10 << 20)
    (shared / "random.bin").write_bytes(data)
    result = rexec(lab, "cat", str(shared / "random.bin"))
    assert result.returncode == 0
    assert result.stdout == data


def test_ten_mib_both_ways_through_cat(lab: Lab) -> None:
    data = os.urandom(10 << 20)
    result = rexec(lab, "cat", input=data)
    assert result.stdout == data


def test_stdout_and_stderr_separate_and_complete(lab: Lab) -> None:
    result = rexec(lab, "/bin/sh", "-c", "echo out; echo err >&2; head -c 300000 /dev/zero; exit 3")
    assert result.returncode == 3
    assert result.stdout == b"out\n" + bytes(300000)
    assert result.stderr == b"err\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_seen_by_waitpid(lab: Lab, signum: int) -> None:
    result = rexec(lab, "/bin/sh", "-c", f"kill -{signal.Signals(signum).name[3:]} $$")
    assert result.returncode == -signum  # subprocess's form of WIFSIGNALED/WTERMSIG


@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
    ],
)
def test_signals_forwarded(lab: Lab, signum: int) -> None:
    assert_trapped_remotely(lab, signum)


def assert_trapped_remotely(lab: Lab, signum: int) -> None:
    """``signum`` sent to the stand-in reaches the remote shell, whose trap decides how it ends."""
    name = signal.Signals(signum).name[3:]
    script = f"trap 'echo got {name}; exit 42' {name}; echo ready; while :; do sleep 0.05; done"
    child = start_rexec(lab, "/bin/sh", "-c", script, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        child.send_signal(signum)
        # Generous: only a lost signal takes anywhere near this long.
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 42
        assert out == f"got {name}\n".encode()
    finally:
        child.kill()
        child.wait()


def signal_set(status: str, field: str) -> set[int]:
    """The signals in a mask line of /proc/PID/status (SigIgn, SigBlk, ...)."""
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")), 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def test_program_gets_default_signals_whatever_its_server_inherited(lab: Lab) -> None:
    """A daemon started as a background job of a non-interactive shell has SIGINT and SIGQUIT ignored.

    The programs it runs must not inherit that: a remote shell would silently
    ignore its trap for SIGQUIT, and the forwarded signal with it.
    """
    background = (signal.SIGINT, signal.SIGQUIT)
    try:
        ours = {signum: signal.signal(signum, signal.SIG_IGN) for signum in background}
        try:
            server = lab.restart_service("host-rexec")  # inherits our dispositions, as from such a shell
        finally:
            for signum, handler in ours.items():
                signal.signal(signum, handler)
        assert signal.SIGQUIT in signal_set(Path(f"/proc/{server}/status").read_text(), "SigIgn")
        result = rexec(lab, "/bin/cat", "/proc/self/status")
        assert result.returncode == 0, result.stderr
        status = result.stdout.decode()
        assert (signal_set(status, "SigIgn"), signal_set(status, "SigBlk")) == (set(), set())
        for signum in background:
            assert_trapped_remotely(lab, signum)
    finally:
        lab.restart_service("host-rexec")


def test_pidmap_file_locked_and_removed(lab: Lab) -> None:
    child = start_rexec(lab, "/bin/sleep", "30")
    try:
        remote = remote_pid_of(lab, child.pid)
        path = pidmap(lab, child.pid)
        assert path.read_bytes() == str(remote).encode()  # decimal, no newline
        assert psutil.Process(remote).cmdline() == ["/bin/sleep", "30"]
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        child.terminate()
        child.wait(timeout=10)
        wait_for(lambda: not path.exists(), 5, "pidmap removal")
    finally:
        child.kill()
        child.wait()


def test_sigkill_of_stand_in_leaves_no_remote_process(lab: Lab) -> None:
    child = start_rexec(lab, "/bin/sh", "-c", "trap '' TERM; sleep 60")
    try:
        remote = remote_pid_of(lab, child.pid)
        assert psutil.pid_exists(remote)
        child.kill()
        child.wait()
        start = time.monotonic()
        # The script ignores SIGTERM: only the SIGKILL after the grace ends it.
        wait_for(
            lambda: not psutil.pid_exists(remote) or psutil.Process(remote).status() == "zombie",
            5,
            f"remote pid {remote} to go",
        )
        assert time.monotonic() - start < 5
    finally:
        child.kill()
        child.wait()


def test_regular_file_fd_at_offset(lab: Lab, shared: Path) -> None:
    path = shared / "offset.txt"
    path.write_bytes(b"0123456789abcdef")
    with open(path, "rb") as stream:
        stream.seek(10)
        fd = dup_at(stream.fileno(), 70)
        try:
            result = rexec(lab, *BASH, f"cat <&{fd}", pass_fds=[fd])
        finally:
            os.close(fd)
    assert result.stdout == b"abcdef"


def test_local_only_file_fd_stays_local(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "pidfile"
    path.write_text("1")
    opened = os.open(path, os.O_RDWR)
    fd = dup_at(opened, 60)
    os.close(opened)
    try:
        result = rexec(lab, *BASH, f"test -e /proc/self/fd/{fd} && echo open || echo closed", pass_fds=[fd])
    finally:
        os.close(fd)
    assert result.stdout == b"closed\n"


def test_pipe_fds_both_directions(lab: Lab) -> None:
    to_remote_r, to_remote_w = os.pipe()
    from_remote_r, from_remote_w = os.pipe()
    reader = dup_at(to_remote_r, 90)
    writer = dup_at(from_remote_w, 80)
    for fd in (to_remote_r, from_remote_w):
        os.close(fd)
    try:
        script = f'read line <&{reader}; echo "got $line" >&{writer}'
        child = start_rexec(lab, *BASH, script, pass_fds=[reader, writer])
    finally:
        os.close(reader)
        os.close(writer)
    os.write(to_remote_w, b"hello\n")
    os.close(to_remote_w)
    try:
        assert child.wait(timeout=20) == 0
        assert os.read(from_remote_r, 100) == b"got hello\n"
        assert os.read(from_remote_r, 100) == b""  # every write end is closed
    finally:
        os.close(from_remote_r)
        child.kill()
        child.wait()


def test_listening_socket_is_bridged(lab: Lab, tmp_path: Path) -> None:
    """libvirt hands qemu its QMP listener as fd N; connections must reach the remote program."""
    path = str(tmp_path / "monitor.sock")
    fd = listener_at_fd(path, 29)
    server = textwrap.dedent(
        f"""
        import socket
        listener = socket.socket(fileno={fd})
        for _ in range(2):
            conn, _ = listener.accept()
            line = conn.makefile("rb").readline()
            conn.sendall(b"remote says " + line)
            conn.close()
        """
    )
    try:
        child = start_rexec(lab, PYTHON, "-c", server, pass_fds=[fd], stderr=subprocess.PIPE)
    finally:
        os.close(fd)
    try:
        for word in (b"one", b"two"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(20)
                client.connect(path)
                client.sendall(word + b"\n")
                assert client.makefile("rb").readline() == b"remote says " + word + b"\n"
        assert child.wait(timeout=20) == 0, child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_connected_socket_relayed(lab: Lab) -> None:
    ours, theirs = socket.socketpair()
    fd = dup_at(theirs.fileno(), 110)
    theirs.close()
    try:
        child = start_rexec(lab, *BASH, f'read x <&{fd}; echo "pong $x" >&{fd}', pass_fds=[fd])
    finally:
        os.close(fd)
    try:
        ours.sendall(b"ping\n")
        ours.settimeout(20)
        assert ours.recv(100) == b"pong ping\n"
        assert child.wait(timeout=20) == 0
    finally:
        ours.close()
        child.kill()
        child.wait()


def test_eventfd_refused_naming_the_fd(lab: Lab) -> None:
    efd = os.eventfd(0)
    fd = dup_at(efd, 100)
    os.close(efd)
    try:
        result = rexec(lab, "/bin/true", pass_fds=[fd])
    finally:
        os.close(fd)
    assert result.returncode == 126
    assert f"fd {fd}".encode() in result.stderr and b"eventfd" in result.stderr


def test_environment_allowlist_cwd_and_umask(lab: Lab, shared: Path) -> None:
    env = lab.env("dpu") | {
        "LANG": "C.UTF-8",
        "LD_PRELOAD": "/nonexistent.so",
        "SECRET": "x",
        "XDG_RUNTIME_DIR": "/run/user/0",
    }
    result = proc.run(
        lab.command("dpu", ["sh", "-c", "umask 027; exec rexec /usr/bin/env sh -c 'env; pwd; umask'"], cwd=shared),
        env=env,
        check=False,
        timeout=30,
    )
    lines = result.stdout.splitlines()
    assert "LANG=C.UTF-8" in lines and "XDG_RUNTIME_DIR=/run/user/0" in lines
    assert not [line for line in lines if line.startswith(("LD_PRELOAD=", "SECRET=", "CMD_NET_ADDR="))]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in lines
    assert str(shared) in lines
    assert "0027" in lines


def test_daemon_mode(lab: Lab, shared: Path) -> None:
    pidfile = shared / "daemon.pid"
    script = f"sleep 60 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"
    result = rexec(lab, "--daemon-pidfile", str(pidfile), "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    # The stand-in wrote its own pid: the DPU side's number for it.
    standin = lab.pid_here("dpu", int(pidfile.read_text()))
    stand_in_process = psutil.Process(standin)
    assert "rexec" in " ".join(stand_in_process.cmdline())
    remote = remote_pid_of(lab, standin)
    assert psutil.Process(remote).cmdline() == ["sleep", "60"]
    os.kill(standin, signal.SIGKILL)
    wait_for(lambda: gone(remote), 5, "the daemon to be ended")


def test_unreachable_agent(lab: Lab) -> None:
    env = lab.env("dpu") | {"REXEC_AGENT_SOCKET": "/nonexistent/rexec.sock"}
    result = proc.run(lab.command("dpu", ["rexec", "/bin/true"]), env=env, check=False, timeout=30)
    assert result.returncode == 255
    assert "cannot reach the local rexec_server at /nonexistent/rexec.sock" in result.stderr


def test_hundred_concurrent_sessions_and_no_fd_leak(lab: Lab) -> None:
    servers = {role: psutil.Process(server_pid(lab, role)) for role in ("host", "dpu")}
    rexec(lab, "/bin/true")
    time.sleep(0.5)  # let the warm pool refill
    before = {role: p.num_fds() for role, p in servers.items()}
    children = [
        start_rexec(lab, "/bin/sh", "-c", "sleep 0.5; echo $0", str(n), stdout=subprocess.PIPE) for n in range(100)
    ]
    try:
        for n, child in enumerate(children):
            out, _ = child.communicate(timeout=120)
            assert (child.returncode, out) == (0, f"{n}\n".encode())
    finally:
        for child in children:
            child.kill()
            child.wait()
    time.sleep(1.0)
    after = {role: p.num_fds() for role, p in servers.items()}
    # The warm pool may hold a different number of idle links at any moment.
    for role in servers:
        assert after[role] <= before[role] + 4, (role, before, after)


#: A cut of the link that both sides notice (each declares the link lost after the keepalive), within the
#: resume window.
NOTICED_CUT = REXEC_KEEPALIVE + 2


def test_a_session_outlives_a_link_cut_shorter_than_the_resume_window(lab: Lab) -> None:
    assert NOTICED_CUT < LAB_RESUME_WINDOW
    child = start_rexec(lab, "/bin/cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        remote = remote_pid_of(lab, child.pid)
        started = psutil.Process(remote).create_time()
        child.stdin.write(b"before\n")
        child.stdin.flush()
        assert read_line(child.stdout, 10) == b"before\n"
        lab.set_link(up=False)
        try:
            time.sleep(NOTICED_CUT)
            assert child.poll() is None, child.stderr.read()
        finally:
            lab.set_link(up=True)
        child.stdin.write(b"after the cut\n")
        child.stdin.flush()
        assert read_line(child.stdout, LAB_RESUME_WINDOW + 10) == b"after the cut\n"
        assert psutil.Process(remote).create_time() == started  # the same program all along
        child.stdin.close()
        assert child.wait(timeout=10) == 0, child.stderr.read()
        wait_for(lambda: gone(remote), 10, "the host's program to end with its input")
    finally:
        lab.set_link(up=True)
        child.kill()
        child.wait()


@pytest.mark.timeout(REXEC_KEEPALIVE + 3 * LAB_RESUME_WINDOW + 60)
def test_a_link_cut_longer_than_the_resume_window_ends_the_session(lab: Lab) -> None:
    child = start_rexec(lab, "/bin/sleep", "600", stderr=subprocess.PIPE)
    try:
        remote = remote_pid_of(lab, child.pid)
        lab.set_link(up=False)
        try:
            start = time.monotonic()
            _, err = child.communicate(timeout=REXEC_KEEPALIVE + LAB_RESUME_WINDOW + 15)
            elapsed = time.monotonic() - start
            assert (child.returncode, err) == (255, f"rexec: link to {lab.host.link.address} lost\n".encode())
            # It was waited for: the link is given up once the resume window is over, not at its loss.
            assert LAB_RESUME_WINDOW <= elapsed < REXEC_KEEPALIVE + LAB_RESUME_WINDOW + 5
            # The host side's window ends too, and with it the program.
            wait_for(lambda: gone(remote), REXEC_KEEPALIVE + LAB_RESUME_WINDOW + 5, "the host side to end the program")
        finally:
            lab.set_link(up=True)
    finally:
        child.kill()
        child.wait()
    # A new session works once the link is back.
    assert wait_for(lambda: rexec(lab, "/bin/true").returncode == 0, 20, "a session after the link came back")


def test_remote_program_runs_as_the_callers_user(lab: Lab) -> None:
    """SO_PEERCRED decides, not the request: an unprivileged caller gets an unprivileged program."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = [*nobody, "rexec", "/usr/bin/env", "sh", "-c", "id -u; id -g"]
    result = proc.run(lab.command("dpu", argv, cwd="/"), env=lab.env("dpu"), check=False, timeout=30, text=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"65534", b"65534"]


#: A misbehaving stand-in: sends its stdin to the agent's socket (with N copies of a pipe's read
#: end), prints the answer.  Run on the DPU side: the agent serves no caller it cannot see.
EXCHANGE = r"""
import os, socket, sys
data = sys.stdin.buffer.read()
read_end, _ = os.pipe()
fds = [read_end] * int(sys.argv[2])
with socket.socket(socket.AF_UNIX) as sock:
    sock.settimeout(20)
    sock.connect(sys.argv[1])
    socket.send_fds(sock, [data], fds) if fds else sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    while chunk := sock.recv(65536):
        sys.stdout.buffer.write(chunk)
"""


def agent_exchange(lab: Lab, data: bytes, pipe_copies: int = 0) -> bytes:
    """Talk to the DPU agent's socket directly, as a misbehaving stand-in on the DPU side would."""
    argv = [PYTHON, "-c", EXCHANGE, str(lab.dpu.run_dir / "rexec.sock"), str(pipe_copies)]
    return proc.run(lab.command("dpu", argv, cwd="/"), env=lab.env("dpu"), input=data, text=False, timeout=30).stdout


def test_a_caller_outside_the_agents_pid_namespace_is_refused(lab: Lab) -> None:
    """From outside the DPU's pid namespace SO_PEERCRED names no process: nothing runs for such a caller."""
    from offload.protocol import local

    marker = lab.dir / "shared" / "ran-for-an-invisible-caller"
    request = {"target": None, "argv": ["/bin/sh", "-c", f"touch {marker}"], "env": {}, "cwd": "/", "umask": 18}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # from here: the host's pid namespace
        sock.settimeout(20)
        sock.connect(str(lab.dpu.run_dir / "rexec.sock"))
        with contextlib.suppress(BrokenPipeError):  # the agent may have refused it before it read it
            sock.sendall(local.encode(local.L_REQUEST, {**request, "fds": []}))
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    assert b"pid is not visible" in reply
    assert not marker.exists()
    assert rexec(lab, "/bin/true").returncode == 0


@pytest.mark.parametrize(
    "data",
    [
        b"garbage that is not a frame",
        b"OF\x01\x40\x00\x00\x00\x00\x00\x00\x00\x05{nope",
        b"OF\x01\x40\x00\x00\x00\x00\x7f\xff\xff\xff",  # a 2 GiB request
    ],
    ids=["garbage", "bad-json", "oversized"],
)
def test_bad_stand_in_messages_leave_the_agent_serving(lab: Lab, data: bytes) -> None:
    agent_exchange(lab, data)
    assert rexec(lab, "/bin/true").returncode == 0


def test_duplicate_fd_description_refused(lab: Lab) -> None:
    from offload.protocol import local

    entry = {"fd": 0, "type": "pipe_r", "access": "r", "passed": True}
    request = {
        "target": None,
        "argv": ["/bin/true"],
        "env": {},
        "cwd": "/",
        "umask": 18,
        "fds": [entry, entry],
        "daemon_pidfile": None,
    }
    reply = agent_exchange(lab, local.encode(local.L_REQUEST, request), pipe_copies=2)
    assert b"described an fd number twice" in reply
    assert rexec(lab, "/bin/true").returncode == 0


def host_limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits on the host side: "Max open files" -> (soft, hard)."""
    found = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = re.match(r"(.+?)\s{2,}(\S+)\s+(\S+)", line).groups()  # type: ignore[union-attr]
        found[name] = (soft, hard)
    return found


def lowered(limit: int, hard: int) -> tuple[int, int]:
    """A (soft, hard) pair below the current ``limit``'s hard, so that any user may set it."""
    current = resource.getrlimit(limit)[1]
    top = hard if current == resource.RLIM_INFINITY else min(hard, current)
    return top // 2, top


def test_the_stand_ins_resource_limits_are_the_programs(lab: Lab) -> None:
    """libvirt sets qemu's limits in its child before exec, so on the stand-in: the host's program gets them."""
    limits = {
        "nofile": lowered(resource.RLIMIT_NOFILE, 200),
        "nproc": lowered(resource.RLIMIT_NPROC, 3000),
        "memlock": lowered(resource.RLIMIT_MEMLOCK, 1 << 20),
        "core": (0, 0),
    }
    prlimit = ["prlimit", *(f"--{name}={soft}:{hard}" for name, (soft, hard) in limits.items()), "--"]
    child = proc.spawn(
        lab.command("dpu", [*prlimit, *proc.program("rexec"), "/bin/sleep", "30"]),
        env=lab.env("dpu"),
        stdin=subprocess.DEVNULL,
    )
    try:
        remote = remote_pid_of(lab, child.pid)
        assert psutil.Process(remote).cmdline() == ["/bin/sleep", "30"]
        shown = host_limits(remote)
        assert shown["Max open files"] == tuple(map(str, limits["nofile"]))
        assert shown["Max processes"] == tuple(map(str, limits["nproc"]))
        assert shown["Max locked memory"] == tuple(map(str, limits["memlock"]))
        assert shown["Max core file size"] == ("0", "0")
    finally:
        child.kill()
        child.wait()


#: A stand-in that asks for more than it has: RLIMIT_NOFILE with an unlimited hard limit.
GREEDY_STAND_IN = """\
import sys
from offload.rexec import standin
own = standin.own_rlimits
standin.own_rlimits = lambda: {**own(), "NOFILE": [64, "unlimited"]}
standin.main(sys.argv[1:])
"""


def test_a_hard_limit_above_the_users_is_not_granted(lab: Lab) -> None:
    """A hard limit above what the program's user may have is lowered to the host daemon's, never granted."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    script = ["/bin/sh", "-c", "echo ran; grep 'open files' /proc/self/limits"]

    def on_dpu(*argv: str) -> subprocess.CompletedProcess:
        return proc.run(
            lab.command("dpu", list(argv), cwd="/"), env=lab.env("dpu"), check=False, timeout=30, text=False
        )

    greedy = on_dpu(*nobody, PYTHON, "-P", "-c", GREEDY_STAND_IN, *script)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.split()[0] == b"ran"
    daemon = Path(f"/proc/{lab.pid_of('host-rexec')}/limits").read_text()
    daemons_hard = next(line.split()[-2] for line in daemon.splitlines() if "open files" in line)
    assert daemons_hard != "unlimited"
    assert greedy.stdout.split()[-3:-1] == [b"64", daemons_hard.encode()]
    # Lowering its own limits is any user's right: the same user's program gets them.
    modest = on_dpu("prlimit", "--nofile=64:128", "--", *nobody, *proc.program("rexec"), *script)
    assert modest.returncode == 0, modest.stderr
    assert modest.stdout.split()[0] == b"ran"
    assert modest.stdout.split()[-3:-1] == [b"64", b"128"]


@pytest.mark.parametrize(
    ("rlimits", "why"),
    [({"NOFILE": [2, 1]}, b"soft limit above the hard limit"), ({"RTPRIO": [1, 1]}, b"is not one that is carried")],
)
def test_malformed_rlimits_refused_by_the_agent(lab: Lab, rlimits: dict, why: bytes) -> None:
    from offload.protocol import local

    request = {"target": None, "argv": ["/bin/true"], "env": {}, "cwd": "/", "umask": 18, "fds": [], "rlimits": rlimits}
    reply = agent_exchange(lab, local.encode(local.L_REQUEST, request))
    assert why in reply
    assert rexec(lab, "/bin/true").returncode == 0


#: A stand-in that starts in a directory its user may not search: it entered as root, then dropped root.
STAND_IN_IN_A_CLOSED_DIRECTORY = """\
import os, sys
from offload.rexec import standin
os.chdir(sys.argv[1])
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
standin.main(sys.argv[2:])
"""


def test_a_working_directory_the_user_may_not_search_is_not_entered_for_it(lab: Lab, shared: Path) -> None:
    """The host enters the program's working directory as its user: root's search right opens nothing below it."""
    closed = shared / "root-only"
    closed.mkdir(mode=0o700)
    below = closed / "open"  # searchable by anyone, but only through a directory they may not search
    below.mkdir(mode=0o755)
    (below / "secret").write_text("root's secret\n")
    (below / "secret").chmod(0o644)
    argv = [PYTHON, "-P", "-c", STAND_IN_IN_A_CLOSED_DIRECTORY, str(below), "/bin/cat", "secret"]
    result = proc.run(lab.command("dpu", argv, cwd="/"), env=lab.env("dpu"), check=False, timeout=30, text=False)
    assert b"secret" not in result.stdout
    assert result.returncode == 126, result.stderr
    assert str(below).encode() in result.stderr and b"Permission denied" in result.stderr


def test_an_unprivileged_user_holds_a_bounded_share_of_the_links(lab: Lab) -> None:
    """The host's connection budget is libvirt's too: one user's sessions past its share are refused, root's are not."""
    from offload.lab.lab import LAB_USER_LINKS

    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    sleeper = [*nobody, *proc.program("rexec"), "/bin/sleep", "60"]
    held = []
    try:
        for _ in range(LAB_USER_LINKS):
            held.append(proc.spawn(lab.command("dpu", sleeper, cwd="/"), env=lab.env("dpu")))
        for standin in held:
            remote_pid_of(lab, standin.pid)  # running on the host: it holds its link
        refused = proc.run(lab.command("dpu", sleeper, cwd="/"), env=lab.env("dpu"), check=False, timeout=30)
        assert refused.returncode == 255
        assert f"uid 65534 holds {LAB_USER_LINKS} connections to peers already" in refused.stderr
        assert rexec(lab, "/bin/true").returncode == 0  # root's are not counted
        victim = held.pop()
        os.kill(mountns.entered_program(victim.pid), signal.SIGKILL)  # the stand-in, in the DPU's namespace
        victim.wait()
        again = [*nobody, *proc.program("rexec"), "/bin/true"]
        assert wait_for(
            lambda: proc.run(lab.command("dpu", again, cwd="/"), env=lab.env("dpu"), check=False).returncode == 0,
            20,
            "a place freed by the user's ended session",
        )
    finally:
        for standin in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(mountns.entered_program(standin.pid), signal.SIGKILL)
            standin.wait()
