"""Consoles across the two machines, in parts: the monitor's pty paths, the DPU's ptys, the host's rule.

The rewriter is sans-io and tested with bytes (whole, byte by byte, with
bytes behind); the pty helpers with real ptys of this machine.
"""

from __future__ import annotations

import os
import select
import tty

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload import proc, ptys
from offload.protocol.ptypaths import MAX_PTY_INDEX, PtyPathRewriter
from offload.rexec import console

QUERY = b'{"return": [{"frontend-open": false, "filename": "pty:/dev/pts/3", "label": "charserial0"}]}\r\n'
ADDED = b'{"return": {"pty": "/dev/pts/12"}, "id": "libvirt-9"}\r\n'
CASES = [
    (QUERY, QUERY.replace(b"pty:/dev/pts/3", b"pty:/dev/pts/40")),
    (ADDED, ADDED.replace(b"/dev/pts/12", b"/dev/pts/41")),
    # Not a path qemu reports: a file chardev, a guest's string that only looks alike.
    (b'{"filename": "file:/dev/pts/3"}\r\n', b'{"filename": "file:/dev/pts/3"}\r\n'),
    (b'{"data": "pty:/dev/pts/3x"}\r\n', b'{"data": "pty:/dev/pts/3x"}\r\n'),
    (b'{"return": {}}\r\n', b'{"return": {}}\r\n'),
]
MAPPING = {3: 40, 12: 41}


def rewrite(chunks: list[bytes]) -> bytes:
    rewriter = PtyPathRewriter(MAPPING.get)
    return b"".join(rewriter.feed(chunk) for chunk in chunks) + rewriter.feed(b"")


@pytest.mark.parametrize(("given", "delivered"), CASES)
def test_rewriter_whole_byte_by_byte_and_with_bytes_behind(given: bytes, delivered: bytes) -> None:
    assert rewrite([given]) == delivered
    assert rewrite([bytes([b]) for b in given]) == delivered
    assert rewrite([given + QUERY]) == delivered + CASES[0][1]


def test_rewriter_holds_only_an_unfinished_path() -> None:
    rewriter = PtyPathRewriter(MAPPING.get)
    # A whole reply goes at once: nothing waits for more bytes.
    assert rewriter.feed(QUERY) == CASES[0][1]
    # Half a path waits for its end; what is before it does not.
    assert rewriter.feed(b'{"filename": "pty:/dev/pt') == b'{"filename": '
    assert rewriter.feed(b"s/3") == b""
    assert rewriter.feed(b'"}') == b'"pty:/dev/pts/40"}'


def test_rewriter_leaves_an_unmapped_pty_as_it_is() -> None:
    assert PtyPathRewriter(lambda index: None).feed(QUERY) == QUERY


def test_rewriter_leaves_a_pty_number_no_pty_can_have_as_it_is() -> None:
    asked: list[int] = []

    def translate(index: int) -> int:
        asked.append(index)
        return 40

    for index in (MAX_PTY_INDEX, 2000000, 9999999):
        reply = QUERY.replace(b"/dev/pts/3", b"/dev/pts/%d" % index)
        assert PtyPathRewriter(translate).feed(reply) == reply
        reply = ADDED.replace(b"/dev/pts/12", b"/dev/pts/%d" % index)
        assert PtyPathRewriter(translate).feed(reply) == reply
    assert asked == []
    # The last number a pty may have is still translated.
    below = QUERY.replace(b"/dev/pts/3", b"/dev/pts/%d" % (MAX_PTY_INDEX - 1))
    assert PtyPathRewriter(translate).feed(below) == CASES[0][1]
    assert asked == [MAX_PTY_INDEX - 1]


def test_monitor_fds_from_libvirts_command_line() -> None:
    argv = (
        "/usr/bin/qemu-system-x86_64",
        "-chardev",
        "socket,id=charmonitor,fd=29,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-chardev",
        "socket,id=charchannel0,fd=31,server=on,wait=off",
        "-chardev",
        '{"id":"charjson","backend":"socket","addr":{"type":"fd","str":"33"},"server":true}',
        "-mon",
        "chardev=charjson,mode=control",
        "-chardev",
        "pty,id=charserial0",
    )
    assert console.monitor_fds(argv) == {29, 33}


def test_allocated_pty_is_raw_and_named_in_the_root_of_the_process() -> None:
    master, index = ptys.allocate_in_root(os.getpid())
    try:
        assert os.path.exists(f"/dev/pts/{index}")
        assert ptys.pty_index(master) == index
        other = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY)
        try:
            # Raw: what arrives from the guest is not echoed back towards it.
            os.write(master, b"guest output\n")
            assert os.read(other, 100) == b"guest output\n"
            os.set_blocking(master, False)
            with pytest.raises(BlockingIOError):
                os.read(master, 100)
        finally:
            os.close(other)
    finally:
        os.close(master)


def test_only_a_pty_whose_master_the_process_holds_is_opened() -> None:
    master, slave = os.openpty()
    index = ptys.pty_index(master)
    try:
        peer = ptys.program_pty_peer(os.getpid(), index)
        try:
            tty.setraw(slave)
            os.write(peer, b"through the peer")
            assert os.read(master, 100) == b"through the peer"
        finally:
            os.close(peer)
        with pytest.raises(PermissionError):
            ptys.program_pty_peer(os.getpid(), index + 1000)
        # Another process holds no master of ours.
        other = proc.spawn(["sleep", "60"], stdin=proc.DEVNULL)
        try:
            with pytest.raises(PermissionError):
                ptys.program_pty_peer(other.pid, index)
        finally:
            other.kill()
            other.wait()
    finally:
        os.close(master)
        os.close(slave)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 10)[0])


def test_console_end_drops_output_nobody_reads_and_delivers_to_an_opener() -> None:
    master, index = ptys.allocate_in_root(os.getpid())
    end = ptys.PtyEnd(master, console=True)
    try:
        assert end.send(b"before anyone opened it\n") == 24  # dropped, never queued
        opener = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            assert _readable(end.watch)
            end.opened()
            assert end.attached
            os.write(opener, b"keys")
            assert _readable(end.fd)
            buffer = bytearray(100)
            count, _, _, _ = end.recvmsg_into([memoryview(buffer)])
            assert bytes(buffer[:count]) == b"keys"
            end.send(b"guest output\n")
            assert _readable(opener)
            # Only what was written while someone had it open.
            assert os.read(opener, 100) == b"guest output\n"
        finally:
            os.close(opener)
        end.send(b"after the last opener left\n")
        assert not end.attached
        again = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            with pytest.raises(BlockingIOError):
                os.read(again, 100)
        finally:
            os.close(again)
    finally:
        end.close()


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(QUERY + ADDED)), max_size=12))
def test_rewriter_any_split_delivers_the_same(cuts: list[int]) -> None:
    stream = QUERY + ADDED + b'{"event": "pty:/dev/pts/"}\r\n'
    points = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert rewrite(chunks) == rewrite([stream])
