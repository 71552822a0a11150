"""Userspace qtfs: host directories, and the host's /proc and /sys facts, on the DPU over FUSE.

``qtfs serve`` (server.py) runs on the host and serves its exports;
``qtfs mount`` (client.py: the link, fuse.py: the filesystem) runs on the
DPU.  Where the reference's kernel module is loaded the mount orchestrator
may mount with it instead; see README.md.
"""
