"""VM start, destroy, save and restore: offloaded libvirt against a local libvirtd, in one run.

The offloaded side is the whole lab (virsh on the DPU side, qemu on the host
side).  The local side is the same Debian libvirtd with the same qemu.conf
(the one the rootfs builder wrote into the lab's /another_rootfs), run
directly in a private mount namespace of this machine.  Both start the same
TCG domain booting the same kernel; "start" is `virsh start` until the
guest's marker is on its serial console, "destroy" is `virsh destroy` until
the qemu process is gone, "save and restore" is `virsh save` of the running
256 MiB guest to a file in /var/lib/libvirt (the host's, through qtfs, when
offloaded) followed by `virsh restore` of that file, which returns with the
guest running again, and "console round trip" is a line typed into a pty
console opened with virDomainOpenConsole (python-libvirt, as nova's serial
proxy) until the guest's echo of it comes back, both domains running and the
sides typing in turn.  Medians of several rounds; ratios matter, not
absolutes, on these shared machines.

Runnable alone: python -m bench.libvirt_bench [--rounds N] [--console]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.report import run_alone
from offload import proc
from offload.lab import SERVICES, dpu_libvirt, guest, mountns
from offload.lab.lab import Lab
from offload.lab.libvirt import IMAGES, Domain, Virsh, guest_domain, install_argv, qemu_processes, wait_for_marker


def measure(virsh: Virsh, domain: Domain, console: Callable[[], Path], rounds: int) -> tuple[float, float]:
    """Median seconds of (start until marker, destroy until qemu is gone)."""
    starts, destroys = [], []
    virsh.define(domain)
    try:
        for _ in range(rounds):
            path = console()
            if path.exists():
                path.write_text("")
            began = time.monotonic()
            virsh("start", domain.name)
            wait_for_marker(_reader(path))
            starts.append(time.monotonic() - began)
            began = time.monotonic()
            virsh("destroy", domain.name)
            while qemu_processes(domain.name):
                time.sleep(0.005)
            destroys.append(time.monotonic() - began)
    finally:
        proc.run(virsh.argv("destroy", domain.name), check=False)
        proc.run(virsh.argv("undefine", domain.name), check=False)
    return statistics.median(starts), statistics.median(destroys)


def measure_save_restore(virsh: Virsh, domain: Domain, here: Callable[[str], Path], rounds: int) -> float:
    """Median seconds of `virsh save` then `virsh restore` of the running guest.

    ``here`` is where a path of qemu's machine is reachable from this process.
    """
    image = f"/var/lib/libvirt/{domain.name}.save"
    console = here(domain.console_log)
    if console.exists():
        console.write_text("")
    took = []
    virsh.define(domain)
    try:
        virsh("start", domain.name)
        wait_for_marker(_reader(console))
        for _ in range(rounds):
            began = time.monotonic()
            virsh("save", domain.name, image)
            virsh("restore", image)
            took.append(time.monotonic() - began)
            if virsh.state(domain.name) != "running":
                raise SystemExit(f"bench: {domain.name} is not running after its restore")
            here(image).unlink()
    finally:
        proc.run(virsh.argv("destroy", domain.name), check=False)
        proc.run(virsh.argv("undefine", domain.name), check=False)
        here(image).unlink(missing_ok=True)
    return statistics.median(took)


#: The python-libvirt console client the tests use (nova's way: virDomainOpenConsole, libvirt's event loop).
CONSOLE_CLIENT = Path(__file__).resolve().parent.parent / "tests" / "console_client.py"
#: The machine's python, the one Debian's python3-libvirt is for.
SYSTEM_PYTHON = "/usr/bin/python3"


@contextlib.contextmanager
def open_console(
    virsh: Virsh, domain: Domain, here: Callable[[str], Path], wrap: Callable[[list[str]], list[str]]
) -> Iterator[Callable[[], float]]:
    """``domain`` started with its pty console open (virDomainOpenConsole, as nova's serial proxy does).

    Yields a function that types one line and returns the seconds until the
    guest's echo of it arrives.  The domain is destroyed and undefined after.
    """
    console = here(domain.console_log)
    if console.exists():
        console.write_text("")
    virsh.define(domain)
    client = None
    lines = itertools.count()
    try:
        virsh("start", domain.name)
        wait_for_marker(_reader(console))
        client = proc.spawn(
            wrap([SYSTEM_PYTHON, str(CONSOLE_CLIENT), virsh.uri, domain.name]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def ask(command: str) -> str:
            assert client is not None and client.stdin is not None and client.stdout is not None
            client.stdin.write(command + "\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        def round_trip() -> float:
            line = f"bench{next(lines)}x{time.monotonic_ns()}"
            began = time.monotonic()
            ask(f"send {line}")
            if not ask(f"expect {guest.ECHO} {line}").startswith("found"):
                raise SystemExit(f"bench: {domain.name} did not echo {line} on its console")
            return time.monotonic() - began

        if ask("open") != "opened":
            raise SystemExit(f"bench: cannot open the console of {domain.name}")
        round_trip()  # warms the path up
        yield round_trip
        ask("close")
    finally:
        if client is not None:
            if client.stdin is not None:
                client.stdin.close()
            proc.end_pid(client.pid)
            client.wait(5)
        proc.run(virsh.argv("destroy", domain.name), check=False)
        proc.run(virsh.argv("undefine", domain.name), check=False)


def alternate(offloaded: Callable[[], float], local: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Medians of ``rounds`` measures of each side, taken in turn, so that a change in the machine's load
    between two stretches of time weighs on both sides alike."""
    off: list[float] = []
    loc: list[float] = []
    for round_ in range(rounds):
        # Each side goes first in every other round: neither always follows the other's wake-ups.
        pair = ((off, offloaded), (loc, local)) if round_ % 2 == 0 else ((loc, local), (off, offloaded))
        for figures, measure_once in pair:
            figures.append(measure_once())
    return statistics.median(off), statistics.median(loc)


def _reader(path: Path) -> Callable[[], str]:
    """What the console log holds so far (nothing before qemu made it)."""
    return lambda: path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def local_libvirtd(work: Path, qemu_conf: str, image: guest.GuestImage) -> Iterator[tuple[Virsh, int]]:
    """Debian's libvirtd on this machine, in a private mount namespace with its own state."""
    steps = [mountns.Tmpfs("/var/lib/libvirt"), mountns.Tmpfs("/run/libvirt"), mountns.Tmpfs("/etc/libvirt", keep=True)]
    holder = mountns.start_holder(None, steps, work / "local-ns.log")
    daemons: list[subprocess.Popen] = []
    try:
        enter = lambda argv: mountns.enter(holder, argv, "/")  # noqa: E731
        proc.run(enter(["sh", "-c", 'cat > /etc/libvirt/qemu.conf; mkdir -p "$0"', str(IMAGES)]), input=qemu_conf)
        proc.run(enter(install_argv(image)))
        for daemon in ("/usr/sbin/virtlogd", "/usr/sbin/libvirtd"):
            with open(work / f"local-{Path(daemon).name}.log", "ab") as log:
                daemons.append(proc.spawn(enter([daemon]), stdout=log, stderr=subprocess.STDOUT))
        virsh = Virsh("/run/libvirt/libvirt-sock", wrap=enter)
        virsh.wait_ready()
        yield virsh, holder
    finally:
        for daemon in reversed(daemons):
            proc.end_pid(daemon.pid)
            daemon.wait(5)
        proc.end_pid(holder)


#: Lines typed per side (each one echo), the sides taking turns.
CONSOLE_ROUNDS = 60


def libvirt_rows(lab: Lab, work: Path, rounds: int = 3) -> list[tuple[str, str, str]]:
    """Rows for `make bench`; ``lab`` must be up with every service."""
    image = guest.build()
    proc.run(lab.command("host", install_argv(image)))
    offloaded = guest_domain("bench-offload", image)
    on_host = lambda path: lab.path_on("host", path)  # noqa: E731
    off_start, off_destroy = measure(dpu_libvirt.virsh(lab), offloaded, lambda: on_host(offloaded.console_log), rounds)
    off_save = measure_save_restore(dpu_libvirt.virsh(lab), offloaded, on_host, rounds)
    qemu_conf = (dpu_libvirt.target(lab) / "etc" / "libvirt" / "qemu.conf").as_posix()
    conf_text = lab.path_on("dpu", qemu_conf).read_text()
    local = guest_domain("bench-local", image)
    with local_libvirtd(work, conf_text, image) as (virsh, holder):
        in_ns = lambda path: Path(f"/proc/{holder}/root") / path.lstrip("/")  # noqa: E731
        loc_start, loc_destroy = measure(virsh, local, lambda: in_ns(local.console_log), rounds)
        loc_save = measure_save_restore(virsh, local, in_ns, rounds)
        off_console, loc_console = _console_pair(lab, image, virsh, holder)
    return [
        ("`virsh start` until the guest's marker: offloaded", f"{off_start:.2f} s", ""),
        (
            "`virsh start` until the guest's marker: local libvirtd",
            f"{loc_start:.2f} s",
            f"offloaded = {off_start / loc_start:.2f}x (target <= 1.3x)",
        ),
        ("`virsh destroy` until qemu is gone: offloaded", f"{off_destroy * 1000:.0f} ms", ""),
        (
            "`virsh destroy` until qemu is gone: local libvirtd",
            f"{loc_destroy * 1000:.0f} ms",
            f"offloaded = {off_destroy / loc_destroy:.2f}x",
        ),
        (f"`virsh save` + `restore`, {offloaded.memory_mib} MiB guest: offloaded", f"{off_save:.2f} s", ""),
        (
            f"`virsh save` + `restore`, {local.memory_mib} MiB guest: local libvirtd",
            f"{loc_save:.2f} s",
            f"offloaded = {off_save / loc_save:.2f}x (target <= 1.3x)",
        ),
        *_console_rows(off_console, loc_console),
    ]


def console_rows(lab: Lab, work: Path) -> list[tuple[str, str, str]]:
    """The console round trip alone, offloaded and local."""
    image = guest.build()
    proc.run(lab.command("host", install_argv(image)))
    qemu_conf = (dpu_libvirt.target(lab) / "etc" / "libvirt" / "qemu.conf").as_posix()
    conf_text = lab.path_on("dpu", qemu_conf).read_text()
    with local_libvirtd(work, conf_text, image) as (virsh, holder):
        return _console_rows(*_console_pair(lab, image, virsh, holder))


def _console_pair(lab: Lab, image: guest.GuestImage, local_virsh: Virsh, holder: int) -> tuple[float, float]:
    """Console round trips, offloaded and under the local libvirtd (in ``holder``'s namespace), in turn."""
    on_host = lambda path: lab.path_on("host", path)  # noqa: E731
    on_dpu = lambda argv: lab.command("dpu", argv, cwd="/")  # noqa: E731
    in_ns = lambda path: Path(f"/proc/{holder}/root") / path.lstrip("/")  # noqa: E731
    enter = lambda argv: mountns.enter(holder, argv, "/")  # noqa: E731
    offloaded = guest_domain("bench-console", image, serial="pty")
    local = guest_domain("bench-console-local", image, serial="pty")
    with (
        open_console(dpu_libvirt.virsh(lab), offloaded, on_host, on_dpu) as offloaded_trip,
        open_console(local_virsh, local, in_ns, enter) as local_trip,
    ):
        return alternate(offloaded_trip, local_trip, CONSOLE_ROUNDS)


def _console_rows(offloaded: float, local: float) -> list[tuple[str, str, str]]:
    return [
        ("console round trip (a line echoed by the guest, median): offloaded", f"{offloaded * 1000:.1f} ms", ""),
        (
            "console round trip (a line echoed by the guest, median): local libvirtd",
            f"{local * 1000:.1f} ms",
            f"offloaded = {offloaded / local:.2f}x (target <= 1.3x)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.libvirt_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--console", action="store_true", help="only the console round trip")
    args = parser.parse_args()
    if args.console:
        run_alone("offbc", list(SERVICES), console_rows)
    else:
        run_alone("offbv", list(SERVICES), lambda lab, work: libvirt_rows(lab, work, args.rounds))


if __name__ == "__main__":
    main()
