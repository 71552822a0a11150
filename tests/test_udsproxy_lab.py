"""udsproxy across the lab: a program on the DPU side reaches a socket that exists only on the host side."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc
from offload.lab.lab import Lab
from tests.conftest import PYTHON

pytestmark = pytest.mark.lab

ECHO = textwrap.dedent(
    """
    import socket, sys
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(b"host got:" + data)
    """
)


@pytest.fixture
def host_socket(lab: Lab) -> Iterator[Path]:
    path = lab.sockets / "echo.sock"
    path.unlink(missing_ok=True)
    server = proc.spawn(lab.command("host", [PYTHON, "-c", ECHO, str(path)]), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "the host-side echo server did not start"
            time.sleep(0.05)
        yield path
    finally:
        server.kill()
        server.wait()
        path.unlink(missing_ok=True)


def on_dpu_without(lab: Lab, hidden: Path, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    """Run argv on the DPU side in a mount namespace where ``hidden`` is an empty directory."""
    command = lab.command("dpu", proc.with_hidden_dir(hidden, argv))
    return proc.run(command, env=lab.env("dpu"), check=False, input=stdin, timeout=30)


def test_python_reaches_a_host_only_socket(lab: Lab, host_socket: Path) -> None:
    client = textwrap.dedent(
        """
        import os, socket, sys
        assert not os.path.exists(sys.argv[1])
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(b"hello from the dpu")
        s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode())
        """
    )
    result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(host_socket)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "host got:hello from the dpu"


def test_socat_reaches_a_host_only_socket(lab: Lab, host_socket: Path) -> None:
    result = on_dpu_without(lab, lab.sockets, ["socat", "-t", "5", "-", f"UNIX-CONNECT:{host_socket}"], stdin="ping")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "host got:ping"


def test_missing_on_both_sides_is_enoent(lab: Lab) -> None:
    client = "import socket, sys\ntry:\n    socket.socket(socket.AF_UNIX).connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)"
    result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(lab.sockets / "nobody.sock")])
    assert result.stdout.strip() == "2"


def test_refused_is_econnrefused(lab: Lab) -> None:
    """A socket that exists on the host side but nobody listens on: ECONNREFUSED reaches the caller."""
    path = lab.sockets / "dead.sock"
    path.unlink(missing_ok=True)
    bound = [
        "python3",
        "-c",
        f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); time.sleep(60)",
    ]
    holder = proc.spawn(lab.command("host", bound), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = "import socket, sys\ntry:\n    socket.socket(socket.AF_UNIX).connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)"
        result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(path)])
        assert result.stdout.strip() == str(errno.ECONNREFUSED), result.stderr
    finally:
        holder.kill()
        holder.wait()
        path.unlink(missing_ok=True)


def test_nonblocking_connect_from_trio(lab: Lab, host_socket: Path) -> None:
    client = textwrap.dedent(
        """
        import sys, trio
        async def main():
            stream = await trio.open_unix_socket(sys.argv[1])  # a non-blocking connect()
            await stream.send_all(b"trio says hi")
            await stream.send_eof()
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
            print(data.decode())
        trio.run(main)
        """
    )
    result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(host_socket)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "host got:trio says hi"


@contextlib.contextmanager
def host_program(lab: Lab, path: Path, argv: list[str]) -> Iterator[Path]:
    """A server on the host side that creates ``path``; stopped and removed afterwards."""
    path.unlink(missing_ok=True)
    server = proc.spawn(lab.command("host", argv), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, f"{argv[0]} did not create {path}"
            time.sleep(0.05)
        yield path
    finally:
        server.kill()
        server.wait()
        if server.stderr:
            server.stderr.close()
        path.unlink(missing_ok=True)


QMP_CLIENT = textwrap.dedent(
    """
    import json, os, socket, sys
    assert not os.path.exists(sys.argv[1])
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    stream = s.makefile("rwb")
    greeting = json.loads(stream.readline())
    print(json.dumps(greeting["QMP"]["version"]["qemu"]))
    for command in ("qmp_capabilities", "query-status", "query-version"):
        stream.write(json.dumps({"execute": command}).encode() + b"\\n")
        stream.flush()
        while "event" in (reply := json.loads(stream.readline())):
            pass
        print(json.dumps(reply))
    """
)


#: A directory only the host side has: each side of the lab has its own /run.
HOST_ONLY = Path("/run/libvirt/offload-test-qmp")


def on_dpu(lab: Lab, argv: list[str]) -> subprocess.CompletedProcess:
    return proc.run(lab.command("dpu", argv), env=lab.env("dpu"), check=False, timeout=30)


@pytest.fixture
def qmp_socket(lab: Lab) -> Iterator[Path]:
    """qemu's QMP monitor in a directory of the host side's own (-machine none needs no KVM)."""
    proc.run(lab.command("host", ["mkdir", "-p", str(HOST_ONLY)]))
    path = HOST_ONLY / "qmp.sock"
    qemu = [
        "qemu-system-x86_64",
        "-S",
        "-nodefaults",
        "-nographic",
        "-machine",
        "none",
        "-qmp",
        f"unix:{path},server=on,wait=off",
    ]
    with host_program(lab, lab.path_on("host", path), qemu):
        yield path
    proc.run(lab.command("host", ["rm", "-rf", str(HOST_ONLY)]))


def test_qemu_qmp_from_python(lab: Lab, qmp_socket: Path) -> None:
    assert not lab.path_on("dpu", HOST_ONLY).exists()
    result = on_dpu(lab, [PYTHON, "-c", QMP_CLIENT, str(qmp_socket)])
    assert result.returncode == 0, result.stderr
    version, capabilities, status, query_version = (json.loads(line) for line in result.stdout.splitlines())
    assert capabilities == {"return": {}}
    assert status["return"]["status"] == "prelaunch"  # -S: not started
    assert query_version["return"]["qemu"] == version


def test_qemu_qmp_from_socat(lab: Lab, qmp_socket: Path) -> None:
    # socat's input stays open until both answers arrived: qemu drops
    # answers to a monitor that already closed.
    socat = proc.spawn(
        lab.command("dpu", ["socat", "-", f"UNIX-CONNECT:{qmp_socket}"]),
        env=lab.env("dpu"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert socat.stdin is not None and socat.stdout is not None
    try:
        replies = [json.loads(socat.stdout.readline())]
        socat.stdin.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
        socat.stdin.flush()
        answers = []
        while len(answers) < 2:
            reply = json.loads(socat.stdout.readline())
            if "event" not in reply:
                answers.append(reply)
        socat.stdin.close()
        assert socat.wait(timeout=30) == 0
    finally:
        socat.kill()
        socat.wait()
        socat.stdout.close()
    assert "QMP" in replies[0]
    assert answers[0] == {"return": {}}
    assert answers[1]["return"]["status"] == "prelaunch"


SEQPACKET_SERVER = textwrap.dedent(
    """
    import socket, sys
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(sys.argv[1])
    listener.listen(4)
    conn, _ = listener.accept()
    while packet := conn.recv(65536):
        conn.send(b"echo:" + packet)
    """
)


def test_seqpacket_keeps_boundaries_for_a_real_program(lab: Lab) -> None:
    client = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(sys.argv[1])
        for packet in (b"one", b"two", b"three" * 1000):
            s.send(packet)
        print([len(s.recv(100000)) for _ in range(3)])
        """
    )
    path = lab.sockets / "packets.sock"
    with host_program(lab, path, [PYTHON, "-c", SEQPACKET_SERVER, str(path)]):
        result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[8, 8, 5005]"


PIPE_SERVER = textwrap.dedent(
    """
    import os, socket, sys
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen(4)
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 100, 4)
    readable, writable = fds
    piped = b""
    while chunk := os.read(readable, 100):
        piped += chunk
    os.write(writable, b"pong through a pipe from the host")
    os.close(writable)
    conn.sendall(data + b"|" + piped)
    conn.close()
    """
)

PIPE_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    to_host_r, to_host_w = os.pipe()
    from_host_r, from_host_w = os.pipe()
    socket.send_fds(s, [b"two pipes"], [to_host_r, from_host_w])
    os.close(to_host_r)
    os.close(from_host_w)
    os.write(to_host_w, b"ping through a pipe from the dpu")
    os.close(to_host_w)
    print(s.recv(1000).decode())
    print(os.read(from_host_r, 1000).decode())
    """
)


def test_pipes_passed_across_the_lab(lab: Lab) -> None:
    path = lab.sockets / "pipes.sock"
    with host_program(lab, path, [PYTHON, "-c", PIPE_SERVER, str(path)]):
        result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", PIPE_CLIENT, str(path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "two pipes|ping through a pipe from the dpu",
        "pong through a pipe from the host",
    ]


FILE_SERVER = textwrap.dedent(
    """
    import os, socket, sys
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen(4)
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 100, 4)
    [shared] = fds
    # Read from where the sender left the offset, then append.
    rest = os.read(shared, 100)
    os.write(shared, b"+host")
    conn.sendall(data + b"|" + rest + b"|" + os.readlink(f"/proc/self/fd/{shared}").encode())
    conn.close()
    """
)

FILE_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    fd = os.open(sys.argv[2], os.O_RDWR)
    os.lseek(fd, 6, os.SEEK_SET)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socket.send_fds(s, [b"a file"], [fd])
    print(s.recv(1000).decode())
    """
)


def test_a_shared_file_passed_across_the_lab(lab: Lab, shared: Path) -> None:
    path = lab.sockets / "file.sock"
    data = shared / "passed.txt"
    data.write_bytes(b"hello world")
    with host_program(lab, path, [PYTHON, "-c", FILE_SERVER, str(path)]):
        result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", FILE_CLIENT, str(path), str(data)])
    assert result.returncode == 0, result.stderr
    # The host side got the same file, re-opened there at the sender's offset.
    assert result.stdout.strip() == f"a file|world|{data}"
    assert data.read_bytes() == b"hello world+host"


def test_a_file_outside_the_shared_prefixes_is_refused_at_sendmsg(lab: Lab, tmp_path: Path) -> None:
    path = lab.sockets / "file.sock"
    data = tmp_path / "private.txt"
    data.write_bytes(b"not shared")
    client = FILE_CLIENT.replace(
        'socket.send_fds(s, [b"a file"], [fd])',
        'try:\n    socket.send_fds(s, [b"a file"], [fd])\nexcept OSError as exc:\n    print(exc.errno); sys.exit(0)',
    )
    with host_program(lab, path, [PYTHON, "-c", FILE_SERVER, str(path)]):
        result = on_dpu_without(lab, lab.sockets, [PYTHON, "-c", client, str(path), str(data)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(errno.EOPNOTSUPP)
