"""A relay paused for its server's restart loses no byte either way, and its programs see no end.

Two relays joined by a socketpair stand for the host's and the DPU's; each
has a program's socket as its local end.  Both programs write without
pause while one side pauses (`Relay.pause`, the `Pause` handshake).  Then
two new relays on a new link attach copies of the same program sockets, as
a restarted server's would, and the programs go on writing.  Every byte
each wrote arrives at the other once and in order, and neither read an end
of file on the way.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from offload.udsproxy.relay import PlainCipher, Relay

#: Each program writes this many numbered lines: enough that the pause lands mid-stream.
LINES = 20000


def line(number: int) -> bytes:
    return f"{number:08d}\n".encode()


class Program:
    """One end of a relayed connection: writes numbered lines, reads the other's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()
        self.eof = False
        self._reader = threading.Thread(target=self._read)
        self._writer = threading.Thread(target=self._write)

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        for number in range(LINES):
            self.sock.sendall(line(number))
            if number % 500 == 0:
                time.sleep(0.001)  # the stream spans the pause

    def _read(self) -> None:
        while len(self.received) < LINES * 9:
            data = self.sock.recv(1 << 16)
            if not data:
                self.eof = True
                return
            self.received += data

    def join(self, timeout: float) -> None:
        self._writer.join(timeout)
        self._reader.join(timeout)


def relays(host_local: socket.socket, dpu_local: socket.socket) -> tuple[Relay, Relay, list[threading.Thread]]:
    """A relay on each side of a fresh link, running; they own copies of the program sockets."""
    host_link, dpu_link = socket.socketpair()
    host = Relay(host_link, PlainCipher(), host_local.dup(), client=False, name="host")
    dpu = Relay(dpu_link, PlainCipher(), dpu_local.dup(), client=True, name="dpu")
    threads = [threading.Thread(target=relay.run) for relay in (host, dpu)]
    for thread in threads:
        thread.start()
    return host, dpu, threads


@pytest.mark.parametrize("pausing", ["host", "dpu"])
def test_a_paused_relay_loses_nothing_and_its_programs_see_no_end(pausing: str) -> None:
    qemu, host_local = socket.socketpair()  # the program on the host, and the host relay's end
    libvirt, dpu_local = socket.socketpair()  # the program on the DPU, and the DPU relay's end
    programs = [Program(qemu), Program(libvirt)]
    try:
        host, dpu, threads = relays(host_local, dpu_local)
        for program in programs:
            program.start()
        while len(programs[0].received) < 9 * 1000:  # well into the stream
            time.sleep(0.001)
        (host if pausing == "host" else dpu).pause()
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads)
        assert host.link_lost and dpu.link_lost  # both are to be attached again
        # Attached again, as after a restart: the rest of each stream follows.
        host, dpu, threads = relays(host_local, dpu_local)
        for program in programs:
            program.join(30)
        for program in programs:
            assert not program.eof
            assert bytes(program.received) == b"".join(line(n) for n in range(LINES))
        host.stop()
        dpu.stop()
        for thread in threads:
            thread.join(10)
    finally:
        for sock in (qemu, host_local, libvirt, dpu_local):
            sock.close()
