"""What both labs, the demos, the end-to-end tests and the benchmarks share around stock libvirt.

The domain XML of the lab's guest, virsh against a libvirtd socket, the
guest's console and its marker, a domain's qemu processes, a demo's steps,
and starting a daemon with its log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from xml.sax.saxutils import escape

import psutil

from offload import proc
from offload.errors import LabError
from offload.lab.guest import MARKER, GuestImage

if TYPE_CHECKING:  # types only: processes are started through offload.proc
    from subprocess import Popen

T = TypeVar("T")

#: Where images live on the host side (under the qtfs export /var/lib/libvirt).
IMAGES = Path("/var/lib/libvirt/images")
#: libvirt's own state directory, where serial console logs are kept.
QEMU_STATE = Path("/var/lib/libvirt/qemu")
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
#: The environment a unit file gives a program: no LD_PRELOAD or lab variables leaking in.
UNIT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Domain:
    name: str
    kernel: str
    initrd: str
    #: "qemu" (TCG) or "kvm".  Debian's kernels hang early in boot under
    #: KVM on these machines (nested virtualization), so the lab uses TCG
    #: unless asked otherwise; the offload path is the same for both.
    type: str = "qemu"
    memory_mib: int = 256
    emulator: str = QEMU_BINARY
    #: "file": the serial port writes the console log only; "pty": a pty
    #: serial port with the same log and a console on it, as nova defines one.
    serial: str = "file"
    #: How many iothreads qemu runs (``<iothreads>``); 0: none.
    iothreads: int = 0
    #: ``<cputune><iothreadpin>`` of iothread 1 at start (a cpuset such as "1"); "": no pin.
    iothread_pin: str = ""
    #: ``<cputune><emulatorpin>`` at start; "": no pin.
    emulator_pin: str = ""
    #: ``<numatune><memory>``'s nodeset at start (such as "0"); "": no numatune.
    numa_nodeset: str = ""
    #: ``<numatune><memory>``'s mode: "strict", "restrictive", "preferred" or "interleave".
    numa_mode: str = "strict"

    @property
    def console_log(self) -> str:
        return str(QEMU_STATE / f"{self.name}.console.log")

    def xml(self) -> str:
        name = escape(self.name)
        return f"""<domain type='{self.type}'>
  <name>{name}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>1</vcpu>
  {self._tuning_xml()}<os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(self.kernel)}</kernel>
    <initrd>{escape(self.initrd)}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(self.emulator)}</emulator>
    {self._serial_xml()}
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def _tuning_xml(self) -> str:
        """``<iothreads>``, ``<cputune>`` and ``<numatune>`` as asked for, each ending its line; "" for none."""
        parts = []
        if self.iothreads:
            parts.append(f"<iothreads>{self.iothreads}</iothreads>")
        pins = [f"<iothreadpin iothread='1' cpuset='{escape(self.iothread_pin)}'/>"] if self.iothread_pin else []
        pins += [f"<emulatorpin cpuset='{escape(self.emulator_pin)}'/>"] if self.emulator_pin else []
        if pins:
            parts.append(f"<cputune>{''.join(pins)}</cputune>")
        if self.numa_nodeset:
            mode, nodeset = escape(self.numa_mode), escape(self.numa_nodeset)
            parts.append(f"<numatune><memory mode='{mode}' nodeset='{nodeset}'/></numatune>")
        return "".join(f"{part}\n  " for part in parts)

    def _serial_xml(self) -> str:
        log = escape(self.console_log)
        if self.serial == "pty":
            return (
                f"<serial type='pty'><log file='{log}' append='off'/><target port='0'/></serial>\n"
                "    <console type='pty'><target type='serial' port='0'/></console>"
            )
        return f"<serial type='file'><source path='{log}'/></serial>"


def guest_domain(name: str, image: GuestImage, domain_type: str = "qemu", serial: str = "file") -> Domain:
    """A domain booting the lab's guest from the images directory (see ``install_argv``)."""
    kernel, initrd = str(IMAGES / image.kernel.name), str(IMAGES / image.initrd.name)
    return Domain(name, kernel, initrd, type=domain_type, serial=serial)


def install_argv(image: GuestImage) -> list[str]:
    """The command that puts the guest's kernel and initramfs into the images directory, run where qemu runs."""
    return ["cp", str(image.kernel), str(image.initrd), str(IMAGES)]


class Virsh:
    """virsh against one libvirtd, run through ``wrap`` (e.g. into a lab side's namespaces)."""

    def __init__(self, socket: str, wrap: Callable[[list[str]], list[str]] = list, env: dict | None = None) -> None:
        self.uri = f"qemu:///system?socket={socket}"
        self._wrap = wrap
        self._env = env

    def argv(self, *args: str) -> list[str]:
        return self._wrap(["virsh", "--quiet", "-c", self.uri, *args])

    def __call__(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        result = proc.run(self.argv(*args), check=False, input=input, timeout=timeout, env=self._env)
        if result.returncode != 0:
            raise LabError(f"virsh {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def define(self, domain: Domain) -> None:
        self("define", "/dev/stdin", input=domain.xml())

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # `list` answers before the emulator's capabilities are probed.
            result = proc.run(self.argv("list", "--all"), check=False, timeout=30, env=self._env)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd at {self.uri} did not answer in {timeout:.0f} s: {result.stderr.strip()}")
            time.sleep(0.1)

    def state(self, name: str) -> str:
        return self("domstate", name).strip()


def step(title: str, action: Callable[[], str]) -> None:
    """One step of a demo: run ``action``, print its answer and time; LabError naming the step if it fails."""
    started = time.monotonic()
    try:
        detail = action()
    except Exception as exc:
        print(f"[{time.monotonic() - started:6.2f} s] {title}: FAILED", flush=True)
        raise LabError(f"step '{title}' failed: {exc}") from exc
    print(f"[{time.monotonic() - started:6.2f} s] {title}: {detail}", flush=True)


@contextlib.contextmanager
def timed(say: Callable[[str], None], what: str) -> Iterator[None]:
    """Say ``what`` and how long the block took, once it succeeded."""
    started = time.monotonic()
    yield
    say(f"{what} ({time.monotonic() - started:.1f} s)")


def console_text(path: Path) -> str:
    """A guest's console log so far ("" before qemu made it)."""
    return path.read_text(errors="replace") if path.exists() else ""


def spawn_logged(argv: list[str], log_path: Path, **options) -> Popen[bytes]:
    """Start a daemon in a session of its own, its output appended to ``log_path``; the caller ends it by pid."""
    with open(log_path, "ab") as log_file:
        return proc.spawn(
            argv, stdin=proc.DEVNULL, stdout=log_file, stderr=proc.STDOUT, start_new_session=True, **options
        )


def wait_for_marker(read: Callable[[], str], timeout: float = 120) -> str:
    """Poll a console log (through ``read``) until the guest's marker line appears; return that line."""
    return wait_until(
        lambda: next((line.strip() for line in read().splitlines() if MARKER in line), None),
        timeout,
        lambda: f"no {MARKER} on the guest's console after {timeout:.0f} s; console ends with: {read()[-400:]!r}",
    )


def wait_until(
    done: Callable[[], T | None], timeout: float, failure: str | Callable[[], str], interval: float = 0.05
) -> T:
    """Poll ``done`` until it is true, and return what it said; LabError(``failure``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := done()):
        if time.monotonic() > deadline:
            raise LabError(failure if isinstance(failure, str) else failure())
        time.sleep(interval)
    return result


def tail(path: Path, missing: str = "", lines: int = 15) -> str:
    """The last ``lines`` lines of a log file; ``missing`` if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing


def qemu_processes(guest: str) -> list[psutil.Process]:
    """qemu processes (not stand-ins) running the named guest, anywhere on the machine."""
    found = []
    for process in psutil.process_iter(["exe", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["exe"] == QEMU_BINARY and f"guest={guest}," in " ".join(cmdline):
            found.append(process)
    return found
