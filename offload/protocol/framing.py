"""Versioned, bounded frames: the one wire layer under rexec, udsproxy and qtfs.

Sans-io.  `split_frames` is `FrameDecoder`'s splitting for a driver that keeps
the bytes in a buffer of its own (udsproxy's relay): payloads come out as views
into it, without a copy.  This module is imported by the rexec stand-in on
every start, so it imports nothing heavier than `struct`.

Wire format of one frame (network byte order)::

    0      2         3       4          8          12
    +------+---------+-------+----------+----------+-------------+
    | "OF" | version | type  | channel  | length   | payload ... |
    +------+---------+-------+----------+----------+-------------+

The magic catches a peer speaking something else (for example TLS on a
plaintext port) at the first frame instead of as a bogus length.
"""

from __future__ import annotations

import struct

from offload.errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"OF"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size

#: Upper bound of any payload, whatever a connection configures.  It bounds
#: the memory one frame can make us hold before we look at it.
ABSOLUTE_MAX_PAYLOAD = 4 << 20
DEFAULT_MAX_PAYLOAD = 1 << 20
MAX_CHANNEL = 0xFFFFFFFF


class Frame:
    """One decoded frame.  ``payload`` is bytes (never a view into a buffer)."""

    __slots__ = ("channel", "payload", "type")

    def __init__(self, type: int, channel: int, payload: bytes = b"") -> None:
        self.type = type
        self.channel = channel
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.channel, self.payload) == (other.type, other.channel, other.payload)

    def __repr__(self) -> str:
        return f"Frame(type={self.type:#04x}, channel={self.channel}, {len(self.payload)} bytes)"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: `next_frame` found no complete frame in what has been received so far.
NEED_DATA = _Sentinel("NEED_DATA")
#: The peer ended the stream cleanly, on a frame boundary.
CLOSED = _Sentinel("CLOSED")


def encode_frame(type: int, channel: int, payload: bytes = b"", *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Return the bytes of one frame; refuse what a conforming peer would reject."""
    if not 0 <= type <= 0xFF:
        raise LocalProtocolError(f"frame type {type} out of range")
    if not 0 <= channel <= MAX_CHANNEL:
        raise LocalProtocolError(f"channel {channel} out of range")
    if len(payload) > max_payload:
        raise LocalProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_payload}")
    return HEADER.pack(MAGIC, VERSION, type, channel, len(payload)) + payload


def encode_header(type: int, channel: int, length: int) -> bytes:
    """The header of a frame whose payload the caller sends separately (no copy)."""
    return HEADER.pack(MAGIC, VERSION, type, channel, length)


def read_header(buffer: bytes | bytearray | memoryview, at: int, max_payload: int) -> tuple[int, int, int]:
    """The (type, channel, length) of the header at ``at``; a bad one is the peer's `RemoteProtocolError`."""
    magic, version, type, channel, length = HEADER.unpack_from(buffer, at)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic {bytes(magic)!r}: peer is not speaking this protocol")
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version} (we speak {VERSION})")
    if length > max_payload:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {max_payload}")
    return type, channel, length


def split_frames(buffer: memoryview, max_payload: int) -> tuple[list[tuple[int, int, memoryview]], int]:
    """The complete frames at the start of ``buffer`` as (type, channel, payload), and how many bytes they use.

    Payloads are views into ``buffer`` (no copy): the caller copies what it
    keeps before it reuses the buffer.
    """
    frames = []
    at = 0
    end = len(buffer)
    while end - at >= HEADER_SIZE:
        type, channel, length = read_header(buffer, at, max_payload)
        start = at + HEADER_SIZE
        if end - start < length:
            break
        at = start + length
        frames.append((type, channel, buffer[start:at]))
    return frames, at


class FrameDecoder:
    """Splits a byte stream into frames, validating each header as it arrives."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if not 0 < max_payload <= ABSOLUTE_MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{ABSOLUTE_MAX_PAYLOAD}")
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def take_buffered(self) -> bytes:
        """The bytes received beyond the frames returned so far, for whoever reads the stream from here on."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; ``b""`` means the peer closed it."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
            return
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_frame(self) -> Frame | _Sentinel:
        """Return the next complete frame, `NEED_DATA`, or `CLOSED`.

        Raises `RemoteProtocolError` for a malformed header, an oversized
        payload, or a stream that ends inside a frame.
        """
        buffer = self._buffer
        if len(buffer) >= HEADER_SIZE:
            type, channel, length = read_header(buffer, 0, self.max_payload)
            end = HEADER_SIZE + length
            if len(buffer) >= end:
                with memoryview(buffer) as view:
                    payload = view[HEADER_SIZE:end].tobytes()  # one copy; slicing the bytearray would make two
                del buffer[:end]
                return Frame(type, channel, payload)
        if not self._eof:
            return NEED_DATA
        if buffer:
            raise RemoteProtocolError("stream ended inside a frame (truncated)")
        return CLOSED
