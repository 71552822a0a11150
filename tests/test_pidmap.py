"""The agent's pidmap directory: one session per stand-in, and the reference's locked files."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from offload.errors import RefusedError
from offload.rexec.pidmap import PidmapDir


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_stand_in_has_one_session_at_a_time(tmp_path: Path) -> None:
    pidmaps = PidmapDir(tmp_path)
    with pidmaps.claim(4242):
        with pytest.raises(RefusedError, match="4242 already has a session"), pidmaps.claim(4242):
            pass
        with pidmaps.claim(4243):  # another stand-in is not held up
            pass
    with pidmaps.claim(4242):  # free again once its session ended
        pass


def test_a_locked_pidmap_is_refused_not_overwritten(tmp_path: Path) -> None:
    pidmaps = PidmapDir(tmp_path)
    held = pidmaps.create(4242, 1001)
    try:
        before = open_fds()
        with pytest.raises(RefusedError, match="already holds its pidmap"):
            pidmaps.create(4242, 2002)
        assert open_fds() == before  # the refused attempt's fd is closed
        assert (tmp_path / "4242").read_text() == "1001"
        other = os.open(tmp_path / "4242", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(BlockingIOError):  # still the first stand-in's lock
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    finally:
        os.close(held)
