"""offload rootfs: build and check /another_rootfs, where libvirtd runs chrooted on the DPU.

`overlay_mount_spec` tells the mount orchestrator how an overlay rootfs is
mounted again after a reboot.
"""

from offload.rootfs_builder.layout import overlay_mount_spec

__all__ = ["overlay_mount_spec"]
