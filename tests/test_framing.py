"""The frame layer, bytes in and bytes out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol.framing import (
    CLOSED,
    HEADER,
    NEED_DATA,
    VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
)

# (frame, its exact bytes): one table drives the encoder and the decoder.
CASES = [
    (Frame(0x01, 0, b""), b"OF\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00"),
    (Frame(0x20, 2, b"abc"), b"OF\x01\x20\x00\x00\x00\x02\x00\x00\x00\x03abc"),
    (
        Frame(0xFF, 0xFFFFFFFF, b"\x00" * 5),
        b"OF\x01\xff\xff\xff\xff\xff\x00\x00\x00\x05" + b"\x00" * 5,
    ),
]


@pytest.mark.parametrize(("frame", "wire"), CASES)
def test_encode(frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame.type, frame.channel, frame.payload) == wire


def _decode_all(decoder: FrameDecoder) -> list:
    out = []
    while (item := decoder.next_frame()) not in (NEED_DATA, CLOSED):
        out.append(item)
    return out


@pytest.mark.parametrize(("frame", "wire"), CASES)
def test_decode_whole_and_byte_by_byte(frame: Frame, wire: bytes) -> None:
    whole = FrameDecoder()
    whole.receive_data(wire)
    assert _decode_all(whole) == [frame]

    trickle = FrameDecoder()
    seen = []
    for byte in wire:
        trickle.receive_data(bytes([byte]))
        seen += _decode_all(trickle)
    assert seen == [frame]
    trickle.receive_data(b"")
    assert trickle.next_frame() is CLOSED


def test_decode_with_trailing_bytes_keeps_them() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(CASES[1][1] + CASES[0][1][:5])
    assert decoder.next_frame() == CASES[1][0]
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered == 5


def test_all_cases_back_to_back() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(wire for _, wire in CASES))
    assert _decode_all(decoder) == [frame for frame, _ in CASES]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"XX\x01\x01" + bytes(8), "bad frame magic"),
        (b"OF\x09\x01" + bytes(8), "unsupported protocol version 9"),
        (HEADER.pack(b"OF", VERSION, 1, 0, 1 << 30), "exceeds the limit"),
    ],
)
def test_malformed_headers_are_the_peers_fault(wire: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.next_frame()


def test_truncated_stream() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(CASES[1][1][:-1])
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decoder.next_frame()


def test_oversized_payload_refused_before_buffering_it() -> None:
    decoder = FrameDecoder(max_payload=16)
    decoder.receive_data(struct.pack("!2sBBII", b"OF", VERSION, 0x20, 1, 17))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_encoder_refuses_what_a_peer_would_reject() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(0x20, 1, b"x" * 17, max_payload=16)
    with pytest.raises(LocalProtocolError):
        encode_frame(256, 1)
    with pytest.raises(LocalProtocolError):
        encode_frame(1, -1)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_decoder_on_arbitrary_bytes(data: bytes, step: int) -> None:
    """Any bytes: frames, NEED_DATA, CLOSED or RemoteProtocolError, never anything else."""
    decoder = FrameDecoder(max_payload=256)
    try:
        for start in range(0, len(data), step):
            decoder.receive_data(data[start : start + step])
            _decode_all(decoder)
        decoder.receive_data(b"")
        _decode_all(decoder)
        assert decoder.next_frame() is CLOSED
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
        max_size=8,
    )
)
def test_round_trip(frames: list[tuple[int, int, bytes]]) -> None:
    wire = b"".join(encode_frame(t, c, p) for t, c, p in frames)
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    decoder.receive_data(b"")
    assert _decode_all(decoder) == [Frame(t, c, p) for t, c, p in frames]
