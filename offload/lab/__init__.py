"""The lab: host and DPU as two sets of namespaces on one machine (see lab.py)."""

#: Everything the lab can run, in start order; libvirt needs all the others.
SERVICES = ("rexec", "udsproxy", "qtfs", "libvirt")
