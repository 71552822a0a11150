"""udsproxy across the lab: a program on the DPU side reaches a socket that exists only on the host side."""

from __future__ import annotations

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
