"""A compromised host against the DPU's stand-in: the daemon pidfile it writes as root.

libvirt's capability probe passes ``-daemonize -pidfile F`` with F under
/var/lib/libvirt, which the host serves.  The host answers "daemonized"
and plants a link at F; the stand-in, root on the DPU, must not write
through it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc
from offload.lab.lab import Lab
from tests.conftest import rexec

pytestmark = pytest.mark.lab


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process of ours whose pid the planted file names (the remote side follows it as the daemon)."""
    holder = proc.spawn(["sleep", "300"], stdin=subprocess.DEVNULL)
    try:
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_planted_link_at_the_pidfile_is_not_written_through(lab: Lab, shared: Path, live_pid: int) -> None:
    victim = shared / "dpu-private.pid"  # stands for any file of the DPU that root may write
    victim.write_text(f"{live_pid}\n")
    pidfile = shared / "probe.pid"
    pidfile.unlink(missing_ok=True)
    # The remote "daemon" plants the link instead of writing its pid.
    script = f"ln -s {victim} {pidfile}"
    try:
        result = rexec(lab, "--daemon-pidfile", str(pidfile), "/bin/sh", "-c", script, timeout=60)
        assert victim.read_text() == f"{live_pid}\n", "the stand-in wrote through the planted link"
        assert pidfile.is_symlink()
        assert result.returncode != 0
    finally:
        pidfile.unlink(missing_ok=True)
