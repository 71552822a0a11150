"""The DPU's side of a remote program's ptys: one local pty per host pty, relayed on the session (ARCHITECTURE.md).

The mapping lives as long as the session: libvirt keeps the path in its status XML and finds it again
after a restart of its own.  A pty nobody has opened behaves as qemu's own does: what the guest prints
is dropped, not queued (`offload.ptys.PtyEnd`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from offload import ptys
from offload.fdinfo import closed_on_error

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from offload.rexec.keep import Keep

#: Ptys one session may have (a guest has a few serial ports and consoles).
MAX_PTYS = 16


class SessionConsoles:
    """The DPU ptys standing for the host ptys of one session's program.

    ``relay(host_index, end)`` carries one of them to the host; it owns
    ``end`` and runs in ``nursery`` (the session's) until the session ends.
    """

    def __init__(
        self, stand_in: int, nursery: trio.Nursery, relay: Callable[[int, ptys.PtyEnd], Awaitable[None]]
    ) -> None:
        self.stand_in = stand_in
        self.nursery = nursery
        self.relay = relay
        self.local: dict[int, int] = {}  # host pty number -> ours
        # Each master, held for the session (its relays get copies): our number must not
        # name another session's pty while libvirt may still open it, even
        # after its relay ended (the host refused it); and a relay that lost its link is
        # given another end of the same pty.
        self._held: dict[int, int] = {}
        #: Where each pty is kept for the next server (`offload.rexec.keep`), once the session may outlive us.
        self.keep: Keep | None = None

    def translate(self, host_index: int) -> int | None:
        """Our pty for host pty ``host_index``, made at its first mention; None if none can be made."""
        if host_index in self.local:
            return self.local[host_index]
        if len(self.local) >= MAX_PTYS:
            log.warning("stand-in %d: more than %d ptys; pty %d left unmapped", self.stand_in, MAX_PTYS, host_index)
            return None
        try:
            master, index = ptys.allocate_in_root(self.stand_in)
            with closed_on_error(master):
                end = ptys.PtyEnd(os.dup(master), console=True)
        except OSError as exc:
            log.error("stand-in %d: no pty for host pty %d: %s", self.stand_in, host_index, exc)
            return None
        try:
            self.nursery.start_soon(self.relay, host_index, end)
        except BaseException:
            end.close()
            os.close(master)
            raise
        self._held[host_index] = master
        if self.keep is not None:
            self.keep.keep(f"p{host_index}", master)
        self.local[host_index] = index
        log.info("stand-in %d: host pty %d is /dev/pts/%d here", self.stand_in, host_index, index)
        return index

    def adopt(self, host_index: int, held: int) -> None:
        """Take over our pty for host pty ``host_index`` that the server before a restart made (``held``)."""
        try:
            index = ptys.pty_index(held)
        except OSError as exc:
            os.close(held)
            log.error("stand-in %d: the kept pty for host pty %d is no pty: %s", self.stand_in, host_index, exc)
            return
        self._held[host_index] = held
        self.local[host_index] = index
        end = self.reopen(host_index)
        if end is not None:
            self.nursery.start_soon(self.relay, host_index, end)

    def reopen(self, host_index: int) -> ptys.PtyEnd | None:
        """Another end for the relay of host pty ``host_index`` (its last one lost its link); None if none."""
        try:
            end = ptys.PtyEnd(os.dup(self._held[host_index]), console=True)
        except (KeyError, OSError) as exc:
            log.error("stand-in %d: pty for host pty %d not relayed again: %s", self.stand_in, host_index, exc)
            return None
        # Not a fresh pty: whoever has it open (a console) keeps it open across the relays.
        end.attached = not ptys.hung_up(end.fd)
        return end

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()


def monitor_fds(argv: tuple[str, ...]) -> set[int]:
    """The fds of the QMP monitors libvirt passes qemu: ``-chardev socket,id=ID,fd=N`` used by ``-mon chardev=ID,mode=control``.

    Only a monitor's replies are rewritten: bytes on any other bridged
    socket (a guest agent's channel) are the guest's, untouched.
    """
    chardev_fds: dict[str, int] = {}
    monitors: set[str] = set()
    for option, value in itertools.pairwise(argv):
        if option == "-chardev":
            fields = _chardev_fields(value)
            if fields.get("backend") == "socket" and fields.get("fd", "").isdigit() and "id" in fields:
                chardev_fds[fields["id"]] = int(fields["fd"])
        elif option == "-mon":
            fields = dict(part.partition("=")[::2] for part in value.split(","))
            if fields.get("mode", "readline") == "control" and "chardev" in fields:
                monitors.add(fields["chardev"])
    return {fd for name, fd in chardev_fds.items() if name in monitors}


def _chardev_fields(value: str) -> dict[str, str]:
    """``socket,id=X,fd=N,...`` or its JSON form, as backend, id and fd."""
    if value.startswith("{"):
        try:
            document = json.loads(value)
            address = document.get("addr", {}).get("data", document.get("addr", {}))
            return {
                "backend": str(document.get("backend", "")),
                "id": str(document.get("id", "")),
                "fd": str(address.get("str", "")) if address.get("type") == "fd" else "",
            }
        except (ValueError, AttributeError):
            return {}
    backend, _, rest = value.partition(",")
    fields = dict(part.partition("=")[::2] for part in rest.split(",") if part)
    fields["backend"] = backend
    return fields
