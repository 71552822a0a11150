"""The netlink seam: every pyroute2 call of the project is in this module.

pyroute2 is blocking; trio code calls these through trio.to_thread.run_sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from offload.errors import LabError


@dataclass(frozen=True)
class Side:
    netns: str
    ifname: str
    address: str  # IPv4, /30 with the other side


def namespaces() -> list[str]:
    return list(netns.listnetns())


def create_pair(a: Side, b: Side) -> None:
    """Two network namespaces joined by a veth pair, addressed and up."""
    for side in (a, b):
        if side.netns in namespaces():
            raise LabError(f"network namespace {side.netns} already exists (run 'offload lab down' first)")
    try:
        for side in (a, b):
            netns.create(side.netns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=a.ifname, kind="veth", peer={"ifname": b.ifname})
            for side in (a, b):
                index = ipr.link_lookup(ifname=side.ifname)[0]
                ipr.link("set", index=index, net_ns_fd=side.netns)
        for side in (a, b):
            with IPRoute(netns=side.netns) as ipr:
                index = ipr.link_lookup(ifname=side.ifname)[0]
                ipr.addr("add", index=index, address=side.address, prefixlen=30)
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except NetlinkError as exc:
        raise LabError(f"netlink: {exc}") from None


def remove(names: list[str], ifnames: list[str]) -> list[str]:
    """Remove namespaces (which takes their veth ends along) and stray veths; idempotent."""
    removed = []
    present = namespaces()
    for name in names:
        if name in present:
            netns.remove(name)
            removed.append(f"network namespace {name}")
    with IPRoute() as ipr:
        for ifname in ifnames:
            for index in ipr.link_lookup(ifname=ifname):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)
                    removed.append(f"interface {ifname}")
    return removed


def set_link(side: Side, up: bool) -> None:
    """Take one side's veth down or up (to cut the link in tests)."""
    try:
        with IPRoute(netns=side.netns) as ipr:
            index = ipr.link_lookup(ifname=side.ifname)[0]
            ipr.link("set", index=index, state="up" if up else "down")
    except (NetlinkError, IndexError) as exc:
        raise LabError(f"cannot set {side.ifname} in {side.netns} {'up' if up else 'down'}: {exc}") from None
