"""Userspace qtfs: host directories, and the host's /proc and /sys facts, on the DPU over FUSE.

``qtfs serve`` (server.py) runs on the host and serves its exports;
``qtfs mount`` (client.py: the link, fuse.py: the filesystem) runs on the
DPU.  Where the reference's kernel module is loaded (`kernel_qtfs_available`)
the mount orchestrator may mount with it instead; see README.md.
"""

from __future__ import annotations


def kernel_qtfs_available(filesystems: str = "/proc/filesystems") -> bool:
    """True when the running kernel has the qtfs module's filesystem type (``mount -t qtfs`` works)."""
    try:
        with open(filesystems) as file:
            lines = file.read().splitlines()
    except OSError:
        return False
    return any(line.split()[-1:] == ["qtfs"] for line in lines)
