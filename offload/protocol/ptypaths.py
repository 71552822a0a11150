"""The pty paths in qemu's monitor replies, rewritten as they cross to the DPU, sans-io.

qemu tells libvirt where a pty chardev's other end is in two replies:
``query-chardev`` (``"filename": "pty:/dev/pts/3"``) and ``chardev-add``
(``"return": {"pty": "/dev/pts/3"}``).  libvirt later opens that path
itself (``virsh console``), so on the DPU it must name a pty of the DPU:
`PtyPathRewriter` finds each such string in the monitor's byte stream
and replaces the host's number with the one ``translate`` gives (the
stand-in's side owns a pty per host pty and relays it).

Only the two forms qemu writes are recognised, as whole JSON strings; a
string split across reads is held back until it is complete, and nothing
else is ever held: any other byte passes at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: How the two replies begin the path, as qemu's JSON writer spells them.
_PREFIXES = (b'"pty:/dev/pts/', b'"pty": "/dev/pts/')
_MAX_DIGITS = 7
#: Unix98 pty numbers are below this (the kernel's own limit is far lower).
#: A path naming a number at or above it is left as it is: no pty stands for it.
MAX_PTY_INDEX = 1 << 20
_PATH = re.compile(rb'("pty:/dev/pts/|"pty": "/dev/pts/)(\d{1,7})"')


class PtyPathRewriter:
    """Feed monitor bytes in with `feed`; the bytes to deliver come out, paths translated.

    ``translate(host_index)`` returns the index of the pty that stands for
    it here, or None to leave that path as it is.
    """

    def __init__(self, translate: Callable[[int], int | None]) -> None:
        self._translate = translate
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes that can be delivered now (``b""`` at end of input releases what was held)."""
        if not data:
            held, self._held = self._held, b""
            return held
        buffer = self._held + data
        whole = [match.end() for match in _PATH.finditer(buffer)]
        cut = _incomplete_tail(buffer, whole[-1] if whole else 0)
        self._held = buffer[cut:]
        return _PATH.sub(self._replace, buffer[:cut])

    def _replace(self, match: re.Match[bytes]) -> bytes:
        index = int(match.group(2))
        local = self._translate(index) if index < MAX_PTY_INDEX else None
        return match.group(0) if local is None else match.group(1) + str(local).encode() + b'"'


def _incomplete_tail(buffer: bytes, after: int) -> int:
    """Where a path string that has not ended yet begins in ``buffer`` (not before ``after``,
    the end of the last whole one); the buffer's length if none does.

    The earliest candidate counts: a quote inside a path's beginning is
    itself the start of a possible one.
    """
    start = buffer.find(b'"', max(after, len(buffer) - len(_PREFIXES[1]) - _MAX_DIGITS))
    while start >= 0:
        if _could_begin_path(buffer[start:]):
            return start
        start = buffer.find(b'"', start + 1)
    return len(buffer)


def _could_begin_path(tail: bytes) -> bool:
    for prefix in _PREFIXES:
        if prefix.startswith(tail):
            return True
        if tail.startswith(prefix):
            digits = tail[len(prefix) :]
            return len(digits) <= _MAX_DIGITS and digits.isdigit()
    return False
