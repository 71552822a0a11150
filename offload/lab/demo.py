"""What `make demo` runs: stock libvirt on the DPU side runs a VM on the host side.

Each step prints its time; the last line says whether the demo succeeded or
which step failed and why (README, "The lab", says what each step shows).
"""

from __future__ import annotations

import argparse
import sys

import psutil

from offload import proc
from offload.errors import LabError, OffloadError
from offload.lab import SERVICES, dpu_libvirt, guest, libvirt, mountns
from offload.lab.lab import Lab
from offload.lab.libvirt import IMAGES, guest_domain, install_argv, qemu_processes, step, wait_for_marker, wait_until

DOMAIN = "offload-demo"


def where_qemu_runs(lab: Lab, name: str) -> str:
    """Check the domain's qemu runs on the host side, under the host's rexec_server; describe it."""
    found = qemu_processes(name)
    if len(found) != 1:
        raise LabError(f"expected one qemu for {name}, found {len(found)}")
    qemu = found[0]
    host_net = lab.netns_id("host")
    if mountns.namespace_of(qemu.pid) != host_net:
        raise LabError(f"qemu pid {qemu.pid} runs in {mountns.namespace_of(qemu.pid)}, not the host side's {host_net}")
    server = lab.pid_of("host-rexec")
    ancestors = [p.pid for p in qemu.parents()]
    if server not in ancestors:
        raise LabError(f"qemu pid {qemu.pid}'s parents {ancestors} do not include the host rexec_server {server}")
    libvirtd = lab.pid_of("dpu-libvirtd")
    if mountns.namespace_of(libvirtd) != lab.netns_id("dpu"):
        raise LabError(f"libvirtd pid {libvirtd} is not on the DPU side")
    return f"qemu pid {qemu.pid} in {lab.host.netns}, child of the host's rexec_server (pid {server}); libvirtd pid {libvirtd} in {lab.dpu.netns}"


def run(lab: Lab, domain_type: str = "qemu") -> None:
    virsh = dpu_libvirt.virsh(lab)
    image = guest.build()
    domain = guest_domain(DOMAIN, image, domain_type)

    step("lab down (leftovers)", lambda: ", ".join(lab.down()) or "nothing left over")
    step("guest kernel and initramfs", lambda: f"{image.version} (cached in {image.kernel.parent})")
    step("lab up", lambda: "\n    " + "\n    ".join(lab.up(only=list(SERVICES))))

    def images() -> str:
        proc.run(lab.command("host", install_argv(image)))
        return f"{image.kernel.name} and {image.initrd.name} in {IMAGES} on the host side"

    step("images on the host", images)

    def define() -> str:
        virsh.define(domain)
        return f"{DOMAIN}, type {domain.type}, emulator {domain.emulator}"

    step("virsh define (DPU side)", define)
    step("virsh start (DPU side)", lambda: virsh("start", DOMAIN).strip() or f"{DOMAIN} started")
    console = lab.path_on("host", domain.console_log)
    step("guest console (host side file)", lambda: wait_for_marker(lambda: libvirt.console_text(console)))
    step("where it runs", lambda: where_qemu_runs(lab, DOMAIN))
    step("virsh list", lambda: " / ".join(line.strip() for line in virsh("list").splitlines() if line.strip()))
    step("virsh dominfo", lambda: _fields(virsh("dominfo", DOMAIN), ("State", "CPU(s)", "Max memory")))
    step(
        "virsh domstats",
        lambda: _fields(virsh("domstats", DOMAIN), ("state.state", "cpu.time", "balloon.current"), "="),
    )
    step(
        "qemu-monitor-command query-status",
        lambda: " ".join(virsh("qemu-monitor-command", "--pretty", DOMAIN, '{"execute":"query-status"}').split()),
    )

    def destroy() -> str:
        virsh("destroy", DOMAIN)
        wait_until(lambda: not qemu_processes(DOMAIN), 10, "qemu still runs on the host 10 s after destroy")
        return f"state {virsh.state(DOMAIN)}; no qemu left on the host"

    step("virsh destroy", destroy)
    step("virsh undefine", lambda: virsh("undefine", DOMAIN).strip() or f"{DOMAIN} undefined")
    step("lab down", lambda: f"removed {len(lab.down())} things")


def _fields(text: str, names: tuple[str, ...], separator: str = ":") -> str:
    found = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(separator)
        if key.strip() in names:
            found[key.strip()] = value.strip()
    return ", ".join(f"{k} {v}" for k, v in found.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload lab demo", description=__doc__)
    parser.add_argument("--name", default="offload", help="lab name (default offload)")
    parser.add_argument("--type", default="qemu", choices=["qemu", "kvm"], help="domain type (default qemu, TCG)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up after a failure, for a look around")
    args = parser.parse_args(argv)
    lab = Lab(args.name)
    try:
        run(lab, args.type)
    except (OffloadError, OSError, psutil.Error) as exc:
        print(f"demo FAILED: {exc}", flush=True)
        if args.keep:
            print(f"the lab stays up: offload lab --name {lab.name} status / down", flush=True)
        else:
            lab.down()
        sys.exit(1)
    print("demo succeeded: virsh on the DPU side ran a VM whose qemu ran on the host side", flush=True)


if __name__ == "__main__":
    main()
