"""A python-libvirt console client, as nova's serial proxy uses one: run by the DPU's /usr/bin/python3.

usage: python3 console_client.py URI DOMAIN

Commands on stdin, one per line; each is answered with one line on stdout:

  open [force]      virDomainOpenConsole on a non-blocking stream -> "opened" or "error MESSAGE"
  send TEXT         TEXT and a carriage return into the console -> "sent"
  expect WORDS      wait until a console line contains WORDS -> "found LINE" or "timeout"
  ended             wait until the stream ends (another client forced it away) -> "ended" or "timeout"
  close             virStreamFinish -> "closed"

The event loop is libvirt's default implementation, run in a thread, as
nova registers it; the stream's callback collects what the guest prints.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import libvirt  # Debian's python3-libvirt

TIMEOUT = 60.0


class Console:
    def __init__(self, conn: libvirt.virConnect, domain: libvirt.virDomain) -> None:
        self.conn = conn
        self.domain = domain
        self.stream: libvirt.virStream | None = None
        self.received = b""
        self.ended = False
        self.lock = threading.Condition()

    def open(self, force: bool) -> str:
        stream = self.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            self.domain.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
        except libvirt.libvirtError as exc:
            return f"error {exc.get_error_message()}"
        with self.lock:
            self.stream, self.received, self.ended = stream, b"", False
        stream.eventAddCallback(
            libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP,
            self._event,
            None,
        )
        return "opened"

    def _event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            try:
                data = stream.recv(65536)
            except libvirt.libvirtError:
                data = b""
            if isinstance(data, bytes) and data:
                with self.lock:
                    self.received += data
                    self.lock.notify_all()
                return
            if data == -2:  # would block
                return
        with self.lock:
            self.ended = True
            self.lock.notify_all()
        stream.eventRemoveCallback()

    def send(self, text: str) -> str:
        assert self.stream is not None
        data = text.encode() + b"\r"
        while data:
            sent = self.stream.send(data)
            if sent == -2:
                time.sleep(0.01)
                continue
            data = data[sent:]
        return "sent"

    def expect(self, words: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        with self.lock:
            while True:
                for line in self.received.decode(errors="replace").splitlines():
                    if words in line:
                        return f"found {line.strip()}"
                if self.ended or not self.lock.wait(deadline - time.monotonic()):
                    return "timeout"

    def wait_ended(self) -> str:
        with self.lock:
            ok = self.lock.wait_for(lambda: self.ended, TIMEOUT)
        return "ended" if ok else "timeout"

    def close(self) -> str:
        if self.stream is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.stream.eventRemoveCallback()
            try:
                self.stream.finish()
            except libvirt.libvirtError:
                self.stream.abort()
            self.stream = None
        return "closed"


def main() -> None:
    uri, name = sys.argv[1:3]
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    conn = libvirt.open(uri)
    console = Console(conn, conn.lookupByName(name))
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "open":
            answer = console.open(argument == "force")
        elif command == "send":
            answer = console.send(argument)
        elif command == "expect":
            answer = console.expect(argument)
        elif command == "ended":
            answer = console.wait_ended()
        elif command == "close":
            answer = console.close()
        else:
            answer = f"error unknown command {command}"
        print(answer, flush=True)
    console.close()


if __name__ == "__main__":
    main()
