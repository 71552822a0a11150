"""Which of the host's /proc and /sys the DPU sees (README.md, "/proc and /sys facts (LXCFS-style)").

The lists are what libvirt 9 reads for node info and capabilities
(virhostcpu.c, virhostmem.c, virnuma.c, the qemu capability probe; from the
paths compiled into Debian's libvirt 9.0 and its qemu driver).  Names are
relative to /proc and /sys; a name missing on either side is skipped by the
mount orchestrator.  The server serves exactly these of an exported procfs
or sysfs (`PROC_SERVED`, `SYS_SERVED`), whatever path the peer names.
"""

from __future__ import annotations

from offload.prefix import is_under

#: /proc files (relative to /proc) whose host content replaces the DPU's.
PROC_FILES: tuple[str, ...] = (
    "cpuinfo",  # virHostCPUGetInfo: model, MHz, flags
    "meminfo",  # virHostMemGetInfo, node memory
    "stat",  # virHostCPUGetStats, boot time
    "uptime",
    "loadavg",
    "vmstat",
    "zoneinfo",
    "buddyinfo",
    "swaps",
    "cmdline",  # host kernel options (iommu, SEV checks)
    "sys/vm/nr_hugepages",
    "sys/vm/nr_overcommit_hugepages",
    "sys/vm/overcommit_memory",
    "sys/crypto/fips_enabled",  # the qemu capability probe
)

#: /sys directories (relative to /sys) whose host content replaces the DPU's.
SYS_DIRS: tuple[str, ...] = (
    "devices/system",  # cpu/online, cpuN/topology, node/nodeN/{meminfo,hugepages,distance}
    "kernel/mm",  # hugepages, transparent_hugepage, ksm
    "module/kvm",
    "module/kvm_intel",  # parameters/nested
    "module/kvm_amd",  # parameters/nested, sev
)

#: Top-level /proc names that belong to processes: never served.
PER_PROCESS = frozenset({b"self", b"thread-self"})

#: What the server serves of a /proc export and of a /sys export (allowlists, relative to the export).
PROC_SERVED: tuple[bytes, ...] = tuple(f.encode() for f in PROC_FILES)
SYS_SERVED: tuple[bytes, ...] = tuple(d.encode() for d in SYS_DIRS)


def allowed(served: tuple[bytes, ...], path: bytes) -> bool:
    """``path`` is one of ``served``, inside one, or a directory on the way to one (``b""``: the root)."""
    if not path:
        return True
    return any(is_under(path, top) or is_under(top, path, strict=True) for top in served)


def sys_visible(path: bytes) -> bool:
    """``path`` (relative to /sys) is one of `SYS_DIRS`, inside one, or on the way to one."""
    return allowed(SYS_SERVED, path)
