"""Address parsing: the forms operators write, and clear errors for the rest."""

from __future__ import annotations

import pytest

from offload.errors import ConfigError
from offload.net import Address, parse_address


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
