"""The lab: host and DPU as two sets of namespaces on one machine (see lab.py)."""

#: Everything the lab can run, in start order; libvirt needs all the others.
SERVICES = ("rexec", "udsproxy", "qtfs", "libvirt")
#: The host directory the DPU side's libvirtd works in, served by qtfs.
LIBVIRT_EXPORTS = ("/var/lib/libvirt",)
