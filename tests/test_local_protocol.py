"""The stand-in's message codec (JSON through the stdlib's C accelerator)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.protocol import local
from offload.protocol.framing import FrameDecoder

documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), documents, max_size=6))
def test_round_trip_agrees_with_json(document: dict) -> None:
    frame = local.encode(local.L_REQUEST, document)
    decoder = FrameDecoder(max_payload=local.MAX_REQUEST)
    decoder.receive_data(frame)
    payload = decoder.next_frame().payload  # type: ignore[union-attr]
    assert json.loads(payload) == document
    assert local.decode(payload) == document


def test_surrogate_escaped_bytes_survive() -> None:
    document = {"argv": ["\udcff\udcfe", "ü"]}
    assert local.decode(local.encode(local.L_REQUEST, document)[12:]) == document


@pytest.mark.parametrize("payload", [b"[1]", b'{"a":1} trailing', b"{", b"NaN", b'{"a":NaN}', b"\xff"])
def test_bad_payloads_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        local.decode(payload)
