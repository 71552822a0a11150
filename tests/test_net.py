"""Address parsing: the forms operators write, and clear errors for the rest; listeners and borrowed ends that fail leave no fd open."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offload import fdio
from offload.errors import ConfigError, OffloadError
from offload.net import Address, Transport, parse_address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("tcp://192.0.2.1:7001", Address("tcp", host="192.0.2.1", port=7001)),
        ("192.0.2.1:7001", Address("tcp", host="192.0.2.1", port=7001)),  # reference CMD_NET_ADDR form
        ("tcp://[fe80::1]:7001", Address("tcp", host="fe80::1", port=7001)),
        ("vsock://3:7001", Address("vsock", host="3", port=7001)),
        ("unix:///run/rexec/peer.sock", Address("unix", path="/run/rexec/peer.sock")),
    ],
)
def test_parse(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp//192.0.2.1:7777", "contains '/'"),  # the reference README's typo
        ("udp://h:1", "unknown scheme"),
        ("tcp://h:99999", "out of range"),
        ("tcp://h:x", "not a number"),
        ("tcp://:1", "missing host"),
        ("vsock://host:1", "numeric CID"),
        ("unix://relative", "absolute path"),
    ],
)
def test_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_address(text)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_vsock_listener_that_cannot_bind_leaves_no_socket_open() -> None:
    # CID 99 is no CID of this machine: bind(2) fails with EADDRNOTAVAIL.
    before = _open_fds()
    with pytest.raises(OffloadError):
        await Transport(None).listen(parse_address("vsock://99:7001"))
    assert _open_fds() <= before


def test_a_fifo_without_a_reader_is_borrowed_as_a_broken_end_and_its_fd_closed(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.close(reader)  # re-opening the writer's end now fails with ENXIO
    before = _open_fds()
    end = fdio.borrow(writer, writing=True)
    assert isinstance(end, fdio.BrokenEnd)
    assert _open_fds() == before - {str(writer)}
