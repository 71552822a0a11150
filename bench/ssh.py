"""sshd on the lab's host side, the baseline an operator would use instead of rexec and qtfs."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from offload import proc
from offload.lab.lab import Lab

SSH_PORT = 2222


@contextlib.contextmanager
def sshd(lab: Lab, work: Path) -> Iterator[list[str]]:
    """sshd in the host namespace; yields the ssh command prefix for the DPU side."""
    for name in ("host_key", "client_key"):
        proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)])
    (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
    (work / "empty_rc").write_text("")
    config = work / "sshd_config"
    config.write_text(
        f"ListenAddress {lab.host.link.address}\nPort {SSH_PORT}\nHostKey {work}/host_key\n"
        f"AuthorizedKeysFile {work}/authorized_keys\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {work}/sshd.pid\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    # root's .bashrc here runs pyenv init (over 100 ms per command): give ssh
    # a clean login shell in a private mount namespace, as the issue asks.
    script = (
        f"mount --bind {work}/empty_rc /root/.bashrc 2>/dev/null; "
        f"mount --bind {work}/empty_rc /root/.profile 2>/dev/null; "
        f"exec /usr/sbin/sshd -D -e -f {config}"
    )
    server = proc.spawn(
        lab.command("host", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]),
        stdin=subprocess.DEVNULL,
        stderr=open(work / "sshd.log", "wb"),  # noqa: SIM115 (lives as long as sshd)
        start_new_session=True,
    )
    ssh = [
        "ssh",
        "-i",
        str(work / "client_key"),
        "-p",
        str(SSH_PORT),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        f"root@{lab.host.link.address}",
    ]
    try:
        deadline = time.monotonic() + 20
        while proc.run(lab.command("dpu", [*ssh, "true"]), check=False, timeout=20).returncode != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"bench: sshd did not come up: {(work / 'sshd.log').read_text()}")
            time.sleep(0.2)
        yield ssh
    finally:
        server.terminate()
        server.wait(10)
