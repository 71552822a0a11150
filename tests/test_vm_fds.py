"""fds passed over the bridged QMP monitor: save, restore, managedsave, dump and memory snapshots from the DPU side.

libvirt 9.0 passes qemu the write end of a pipe with ``getfd`` for ``virsh
save``, ``managedsave``, ``dump`` and a snapshot's memory (libvirt_iohelper, on the DPU side,
writes the image from the pipe's other end), and gives a restoring qemu
the read end of a pipe at an inherited fd.  A bridged connection goes on a
connection of its own, relayed by a thread on each side
(`offload.rexec.attached`), with the rules of `offload.fdpass`.  The first
test passes fds on one such connection without libvirt; the rest drive the
real thing in a lab of libvirt and check each operation by its effect on
the host side: the image's bytes, and a guest whose counter goes on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc
from offload.lab import dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import Domain, Virsh, guest_domain, qemu_processes, wait_for_marker
from offload.rexec.agent import MAX_BRIDGED
from tests.conftest import libvirt_lab
from tests.test_e2e_libvirt import cleanup, console_of, wait_until

# -- one bridged connection across the lab, without libvirt -------------------------------------

#: The host's program: accepts on its bridged listener (fd 29, as qemu's monitor) and answers each
#: message with what came with it; into a passed pipe it writes; "quit" ends it.
HOST_PROGRAM = r"""
import array, os, socket, threading
def serve(conn):
    while True:
        data, ancillary, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(64))
        if not data:
            return
        if data == b"quit":
            os._exit(0)
        fds = array.array("i")
        for _, _, payload in ancillary:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if data == b"pipe" and len(fds) == 1:
            os.write(fds[0], b"through the pipe")
        for fd in fds:
            os.close(fd)
        conn.sendall(data + b": %d fds" % len(fds))
listener = socket.socket(fileno=29)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

#: The DPU's side: hands the host's program a listener, connects to it, and passes fds on the connection.
DPU_PROGRAM = r"""
import json, os, socket, subprocess, sys, tempfile, time
path = os.path.join(tempfile.mkdtemp(), "bridged.sock")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(64)
os.dup2(listener.fileno(), 29)
listener.close()
program = subprocess.Popen(["rexec", "/usr/bin/env", "python3", "-c", sys.argv[1]], pass_fds=(29,))
os.close(29)
def connect():
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    conn.settimeout(20)
    return conn
def ask(conn, data, fds=()):
    try:
        socket.send_fds(conn, [data], list(fds))
        return conn.recv(1024).decode()
    except (BrokenPipeError, ConnectionResetError):  # closed: over the session's limit
        return ""
try:
    conn = connect()
    read_end, write_end = os.pipe()
    answers = {"pipe": ask(conn, b"pipe", [write_end])}
    os.close(write_end)
    answers["through"] = os.read(read_end, 100).decode()
    mine, theirs = socket.socketpair()
    answers["socket"] = ask(conn, b"socket", [theirs.fileno()])
    os.makedirs(sys.argv[2], exist_ok=True)
    with open(os.path.join(sys.argv[2], "only-here"), "w") as only_here:
        answers["file"] = ask(conn, b"file", [only_here.fileno()])
    answers["after"] = ask(conn, b"after")
    more = [connect() for _ in range(int(sys.argv[3]))]
    answers["more"] = [ask(extra, b"more") for extra in more[:-1]]
    answers["one too many"] = more[-1].recv(1024).decode()
    more[0].close()
    deadline = time.monotonic() + 20
    while not (again := ask(connect(), b"again")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the place is free once the closed connection's relays have ended
    answers["again"] = again
    socket.send_fds(conn, [b"quit"], [])
    answers["status"] = program.wait(30)
finally:
    if program.poll() is None:
        program.kill()
print(json.dumps(answers))
"""


@pytest.mark.lab
def test_a_bridged_connection_carries_a_pipe_and_survives_fds_it_cannot_carry(fdlab: Lab) -> None:
    """qemu's monitor gets libvirt's pipes.  A socket (not carried) or a file the host cannot re-open drops
    from its message, whose bytes go on: qemu answers, the connection stays.  A session's bridged
    connections are bounded: the one past MAX_BRIDGED is closed, and a place that frees is taken again."""
    only_on_dpu = "/var/lib/libvirt/only-on-the-dpu"  # under a shared prefix, but the DPU's own directory
    argv = [sys.executable, "-c", DPU_PROGRAM, HOST_PROGRAM, only_on_dpu, str(MAX_BRIDGED)]
    result = proc.run(fdlab.command("dpu", argv, cwd="/"), env=fdlab.env("dpu"), timeout=120)
    answers = json.loads(result.stdout)
    assert answers["pipe"] == "pipe: 1 fds"
    assert answers["through"] == "through the pipe"
    assert answers["socket"] == "socket: 0 fds"
    assert answers["file"] == "file: 0 fds"
    assert answers["after"] == "after: 0 fds"
    assert answers["more"] == ["more: 0 fds"] * (MAX_BRIDGED - 1)
    assert answers["one too many"] == ""
    assert answers["again"] == "again: 0 fds"
    assert answers["status"] == 0
    assert not fdlab.path_on("host", only_on_dpu).exists()  # the host never had that file


# -- the real thing: libvirt on the DPU side, qemu on the host side ------------------------------

#: Small enough that a memory dump and two save images fit the lab's tmpfs with room to spare.
MEMORY_MIB = 128


@pytest.fixture(scope="module")
def fdlab() -> Iterator[Lab]:
    with libvirt_lab("f") as lab:
        yield lab


@pytest.fixture
def virsh(fdlab: Lab) -> Virsh:
    return dpu_libvirt.virsh(fdlab)


def start_counting_guest(lab: Lab, virsh: Virsh, name: str) -> Domain:
    """A running guest that has printed its marker and a few ticks."""
    domain = dataclasses.replace(guest_domain(name, guest.build()), memory_mib=MEMORY_MIB)
    virsh.define(domain)
    virsh("start", name)
    wait_for_marker(lambda: console_of(lab, domain))
    wait_until(lambda: len(guest.ticks(console_of(lab, domain))) >= 2, 60, "the guest counts")
    return domain


def goes_on_from(lab: Lab, domain: Domain, before: str) -> None:
    """The guest's console after a restore continues the count ``before`` ended with.

    A restored guest prints the next number; a guest that booted again
    would print its marker and start from 0.  libvirt opens the console
    file anew for the new qemu, truncating it; should it append, only what
    follows ``before`` is new.
    """
    last = guest.ticks(before)[-1]

    def new_output() -> str:
        console = console_of(lab, domain)
        return console[len(before) :] if console.startswith(before) else console

    wait_until(lambda: guest.ticks(new_output()), 60, f"the restored guest counts on from {last}")
    after = new_output()
    assert guest.MARKER not in after, after
    assert guest.ticks(after)[0] == last + 1, after


def on_host(lab: Lab, path: str) -> Path:
    return lab.path_on("host", path)


def remove_on_host(lab: Lab, *paths: str) -> None:
    proc.run(lab.command("host", ["rm", "-f", *paths]), check=False)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_save_and_restore(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-save"
    image = f"/var/lib/libvirt/{name}.save"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("save", name, image)
        # The guest stopped on the host, and its image is there, complete.
        assert not qemu_processes(name)
        assert virsh.state(name) == "shut off"
        with on_host(fdlab, image).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        assert on_host(fdlab, image).stat().st_size > 1 << 20
        before = console_of(fdlab, domain)

        virsh("restore", image)
        assert virsh.state(name) == "running"
        assert len(qemu_processes(name)) == 1
        goes_on_from(fdlab, domain, before)
    finally:
        cleanup(virsh, name)
        remove_on_host(fdlab, image)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_managedsave_then_start(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-managed"
    image = f"/var/lib/libvirt/qemu/save/{name}.save"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("managedsave", name)
        assert not qemu_processes(name)
        assert virsh.state(name) == "shut off"
        with on_host(fdlab, image).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        before = console_of(fdlab, domain)

        virsh("start", name)
        assert virsh.state(name) == "running"
        goes_on_from(fdlab, domain, before)
        # A start from the managed save image consumes it.
        assert not on_host(fdlab, image).exists()
    finally:
        proc.run(virsh.argv("managedsave-remove", name), check=False)
        cleanup(virsh, name)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_memory_only_dump(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-dump"
    core = f"/var/lib/libvirt/{name}.core"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("dump", "--memory-only", name, core)
        # An ELF core with the guest's memory in it, written on the host side.
        with on_host(fdlab, core).open("rb") as dumped:
            assert dumped.read(4) == b"\x7fELF"
        assert on_host(fdlab, core).stat().st_size >= MEMORY_MIB << 20
        # The guest was paused for the dump, not ended: it counts on.
        assert virsh.state(name) == "running"
        before = console_of(fdlab, domain)
        last = guest.ticks(before)[-1]
        wait_until(lambda: guest.ticks(console_of(fdlab, domain))[-1] > last, 60, "the guest counts on after the dump")
    finally:
        cleanup(virsh, name)
        remove_on_host(fdlab, core)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_snapshot_with_memory(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-snap"
    memory = f"/var/lib/libvirt/{name}.mem"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        # Paused, its console holds still: the snapshot is taken after the last tick on it.
        virsh("suspend", name)
        before = console_of(fdlab, domain)
        virsh("snapshot-create-as", name, "with-memory", "--memspec", f"file={memory},snapshot=external")
        with on_host(fdlab, memory).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        virsh("resume", name)
        last = guest.ticks(before)[-1]
        wait_until(lambda: guest.ticks(console_of(fdlab, domain))[-1] > last, 60, "the guest counts on")

        # The memory image brings the guest back to the moment of the snapshot.
        virsh("snapshot-delete", name, "with-memory", "--metadata")
        virsh("destroy", name)
        virsh("restore", "--running", memory)
        goes_on_from(fdlab, domain, before)
    finally:
        proc.run(virsh.argv("snapshot-delete", name, "with-memory", "--metadata"), check=False)
        cleanup(virsh, name)
        remove_on_host(fdlab, memory)
