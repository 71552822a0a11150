"""The qtfs server against a malicious DPU: what a compromised peer with a valid certificate tries.

Each test runs a real `qtfs serve` in the lab's host namespaces (tests/test_qtfs.py's
`Server`) and attacks it the way a compromised DPU would: by speaking the
protocol itself with the lab's DPU certificate (`peer`, any request and any
field the wire can carry), or as a DPU user through a real FUSE mount
(tests/test_qtfs.py's `Agent`).  Every test checks the attack's effect on the
host (the secret was not read, no setuid file exists, the file was not
linked, the server still answers), never an error message.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import trio

from offload.lab.lab import Lab
from offload.net import Transport, parse_address
from offload.pki import TlsConfig
from offload.protocol import qtfs as wire
from offload.protocol.framing import encode_frame
from offload.qtfs.client import Link
from tests.test_qtfs import Agent, Server, _child_pid, mount

pytestmark = pytest.mark.lab

PORT = 7023
T = TypeVar("T")
#: A version 2 file capability granting CAP_SETUID (what `setcap cap_setuid+ep` writes).
CAP_SETUID_XATTR = struct.pack("<IIIII", 0x02000001, 1 << 7, 1 << 7, 0, 0)


def peer(lab: Lab, work: Path, root: str | Path, attack: Callable[[Link], Awaitable[T]]) -> T:
    """``attack(link)`` on a link mounted at ``root``, as a DPU holding a valid certificate."""

    async def main() -> T:
        transport = Transport(TlsConfig.load(lab.dir / "pki" / "dpu"))
        link = Link(transport, parse_address(f"unix://{work}/qtfs.sock"), os.fsencode(root), keepalive=30)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                try:
                    return await attack(link)
                finally:
                    nursery.cancel_scope.cancel()

    return trio.run(main)


async def outcome(link: Link, request: wire.Message) -> Any:
    """The reply, or the errno name the server answered with."""
    try:
        return await link.call(request)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def refused_mount(lab: Lab, work: Path, root: str) -> str:
    """The errno name a Mount of ``root`` got (the peer's link never came up)."""

    async def main() -> str:
        transport = Transport(TlsConfig.load(lab.dir / "pki" / "dpu"))
        link = Link(transport, parse_address(f"unix://{work}/qtfs.sock"), os.fsencode(root))
        try:
            with trio.fail_after(30):
                await link.connect()
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        assert link._current is not None
        await link._current.stream.aclose()
        return "mounted"

    return trio.run(main)


@contextlib.contextmanager
def served(lab: Lab, work: Path, exports: list[str], *options: str) -> Iterator[Server]:
    running = Server(lab, work, exports, *options, port=PORT)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def server(lab: Lab, work: Path) -> Iterator[Server]:
    with served(lab, work, [str(work / "export")]) as running:
        yield running


# -- 1. /proc and /sys facts: nothing but the allowlist ------------------------------------------------


def test_no_host_process_memory_through_the_proc_export(lab: Lab, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"qtfs-secret-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("QTFS_SECURITY_MARKER", marker)  # in the server's environment, a host secret
    with served(lab, work, ["/proc:ro", "/sys:ro", "/:ro"]) as running:
        pid = _child_pid(running.process.pid)  # type: ignore[union-attr]
        assert marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()  # the secret is there to take
        got: list[bytes] = []
        pids: list[bytes] = []  # process directories seen in any listing

        async def take(link: Link, paths: list[bytes]) -> None:
            for path in paths:
                reply = await outcome(link, wire.Open(path, os.O_RDONLY))
                if isinstance(reply, wire.HandleReply):
                    data = await outcome(link, wire.Read(reply.handle, 0, wire.MAX_IO))
                    if isinstance(data, wire.DataReply):
                        got.append(data.data)
                listing = await outcome(link, wire.Opendir(path))
                if isinstance(listing, wire.DirReply):
                    got.append(listing.entries)
                    pids.extend(n for n, _ in wire.decode_entries(listing.entries) if n.isdigit())

        per_process = [b"environ", b"maps", b"mem", b"cmdline", b"status"]
        # Mount roots below the /proc export (and /proc reached from the "/" export).
        for root in (f"/proc/{pid}", "/proc/self", "/proc/1", "/proc/thread-self", f"/proc/{pid}/task/{pid}"):
            if refused_mount(lab, work, root) == "mounted":
                peer(lab, work, root, lambda link: take(link, [b"", *per_process]))
        # The export's root, naming per-process entries and what lies outside the allowlist.
        named = [p + b"/" + f for p in (str(pid).encode(), b"self", b"thread-self", b"1") for f in per_process]
        peer(lab, work, "/proc", lambda link: take(link, [*named, b"", b"self", str(pid).encode(), b"mounts"]))
        # procfs reached below the "/" export.
        peer(lab, work, "/", lambda link: take(link, [b"proc/" + p for p in named] + [b"proc"]))
        assert got  # the allowed facts were read (the attacks ran)
        assert not any(marker.encode() in data for data in got)
        assert pids == []
        # The facts themselves are still served.
        cpuinfo = peer(lab, work, "/proc", lambda link: take_file(link, b"cpuinfo"))
        assert b"processor" in cpuinfo


async def take_file(link: Link, path: bytes) -> bytes:
    reply = await link.call(wire.Open(path, os.O_RDONLY))
    assert isinstance(reply, wire.HandleReply)
    data = await link.call(wire.Read(reply.handle, 0, wire.MAX_IO))
    assert isinstance(data, wire.DataReply)
    return data.data


def test_mount_roots_below_facts_exports_are_refused(lab: Lab, work: Path) -> None:
    with served(lab, work, ["/proc:ro", "/sys:ro", "/:ro"]) as running:
        pid = _child_pid(running.process.pid)  # type: ignore[union-attr]
        for root in (f"/proc/{pid}", "/proc/self", "/proc/sys", "/sys/kernel/mm", "/sys/devices/system"):
            assert refused_mount(lab, work, root) == "EACCES", root
        assert refused_mount(lab, work, "/proc") == "mounted"
        assert refused_mount(lab, work, "/sys") == "mounted"


def test_sys_export_serves_only_its_allowlist(lab: Lab, work: Path) -> None:
    outside = [b"kernel/uevent_seqnum", b"devices/system/cpu/cpu0/subsystem/drivers_autoprobe", b"kernel/address_bits"]
    for path in outside:
        assert (Path("/sys") / os.fsdecode(path)).read_text()  # real, readable /sys files outside SYS_DIRS
    with served(lab, work, ["/sys:ro"]):

        async def attack(link: Link) -> dict[str, Any]:
            results = {}
            # directly, and through a symlink inside an allowed directory (cpu0/subsystem -> bus/cpu)
            for path in outside:
                reply = await outcome(link, wire.Open(path, os.O_RDONLY))
                results[path.decode()] = reply if isinstance(reply, str) else "opened"
            results["listing"] = await outcome(link, wire.Opendir(b"kernel"))
            results["allowed"] = await take_file(link, b"devices/system/cpu/online")
            return results

        results = peer(lab, work, "/sys", attack)
        assert results["allowed"] == Path("/sys/devices/system/cpu/online").read_bytes()
        assert [results[path.decode()] for path in outside] == ["ENOENT"] * len(outside)
        names = [name for name, _ in wire.decode_entries(results["listing"].entries)]
        assert names == [b"mm"]  # /sys/kernel lists only the way to kernel/mm


# -- 2. no setuid, setgid, capabilities or root-owned files made for a peer --------------------------------


def privileged(tree: Path, host_made: tuple[str, ...] = ()) -> list[str]:
    """Every file below ``tree`` a peer could use to gain privileges on the host.

    A directory may have the setgid bit its parent passed on; ``host_made``
    names (relative to ``tree``) are the host's own, root's by right.
    """
    found = []
    for where, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = Path(where) / name
            st = path.lstat()
            hosts = str(path.relative_to(tree)) in host_made
            inherited = stat.S_ISDIR(st.st_mode) and (hosts or path.parent.stat().st_mode & stat.S_ISGID)
            if st.st_mode & stat.S_ISUID or (st.st_mode & stat.S_ISGID and not inherited):
                found.append(f"{path}: mode {oct(st.st_mode)}")
            if st.st_uid == 0 and not hosts:
                found.append(f"{path}: owned by root")
            if not path.is_symlink() and "security.capability" in os.listxattr(path):
                found.append(f"{path}: file capability")
    return found


def test_no_setuid_capability_or_root_file_from_a_peer(lab: Lab, work: Path, server: Server) -> None:
    export = work / "export"
    (export / "host-setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(export / "host-setuid", 0o4755)  # a host's setuid-root program inside the export
    (export / "sgid").mkdir()
    os.chmod(export / "sgid", 0o2775)  # a host's setgid directory: its children inherit the bit

    async def attack(link: Link) -> dict[str, Any]:
        calls = {
            "create 4755": wire.Create(b"made", os.O_WRONLY, 0o4755, 0, 0),
            "create 2755": wire.Create(b"made-g", os.O_WRONLY, 0o2755, 1000, 1000),
            "mknod 6755": wire.Mknod(b"node", stat.S_IFREG | 0o6755, 0, 0, 0),
            "mkdir 6755": wire.Mkdir(b"dir", 0o6755, 0, 0),
            "mkdir in sgid": wire.Mkdir(b"sgid/sub", 0o755, 1000, 1000),
            "symlink": wire.Symlink(b"link", b"made", 0, 0),
            "chmod 4755": wire.Setattr(b"made", 0, wire.SET_MODE, 0o4755),
            "chmod 2755 of a dir": wire.Setattr(b"dir", 0, wire.SET_MODE, 0o2755),
            "chown to root": wire.Setattr(b"made-g", 0, wire.SET_UID | wire.SET_GID, 0, 0, 0),
            "capability": wire.Setxattr(b"made", b"security.capability", CAP_SETUID_XATTR),
            "trusted": wire.Setxattr(b"made", b"trusted.overlay.opaque", b"y"),
        }
        results = {name: await outcome(link, request) for name, request in calls.items()}
        # by handle, and writing a host's setuid program (CAP_FSETID must not keep the bit)
        opened = await link.call(wire.Open(b"made-g", os.O_RDWR))
        assert isinstance(opened, wire.HandleReply)
        results["fchmod 6755"] = await outcome(link, wire.Setattr(b"made-g", opened.handle, wire.SET_MODE, 0o6755))
        host_program = await link.call(wire.Open(b"host-setuid", os.O_WRONLY))
        assert isinstance(host_program, wire.HandleReply)
        results["write"] = await outcome(link, wire.Write(host_program.handle, 0, b"#!/bin/sh\nid\n"))
        return results

    results = peer(lab, work, export, attack)
    assert privileged(export, ("host-setuid", "sgid")) == [], results
    # What is allowed still happens: the files exist, owned by nobody (root squash), the
    # setgid directory's child inherits its bit as the kernel gives it.
    assert (export / "made").stat().st_uid == 65534 and (export / "node").exists()
    assert stat.S_IMODE((export / "made").stat().st_mode) == 0o755
    assert (export / "sgid" / "sub").stat().st_mode & stat.S_ISGID
    assert (export / "host-setuid").read_bytes() == b"#!/bin/sh\nid\n"


def test_no_setuid_through_the_fuse_mount(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    """DPU root, through its own kernel: chmod u+s, create 04755, chown root, setcap."""
    m = str(work / "mnt")
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    agent.run(
        f"fd = os.open({m + '/shell'!r}, os.O_CREAT | os.O_WRONLY, 0o4755); os.write(fd, b'x'); os.close(fd)\n"
        f"for call in (lambda: os.chmod({m + '/shell'!r}, 0o6755), lambda: os.chown({m + '/shell'!r}, 0, 0),\n"
        f"             lambda: os.setxattr({m + '/shell'!r}, 'security.capability', {CAP_SETUID_XATTR!r})):\n"
        "    errname(call)"
    )
    assert (work / "export" / "shell").exists()
    assert privileged(work / "export") == []


def test_no_root_squash_is_explicit_and_still_sets_no_setuid(lab: Lab, work: Path) -> None:
    export = work / "export"
    with served(lab, work, [str(export)], "--no-root-squash"):

        async def attack(link: Link) -> None:
            await outcome(link, wire.Create(b"rootfile", os.O_WRONLY, 0o4755, 0, 0))
            await outcome(link, wire.Setattr(b"rootfile", 0, wire.SET_MODE, 0o4755))

        peer(lab, work, export, attack)
        st = (export / "rootfile").stat()
        assert st.st_uid == 0  # DPU root is host root, as asked
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_serve_help_documents_root_squash() -> None:
    from offload.qtfs.cli import build_parser

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as text:
        build_parser().parse_args(["serve", "--help"])
    assert "--root-squash" in text.getvalue() and "--no-root-squash" in text.getvalue()
    serve = ["serve", "--listen", "unix:///x", "--export", "/x"]
    assert build_parser().parse_args(serve).root_squash is True
    assert build_parser().parse_args([*serve, "--no-root-squash"]).root_squash is False


# -- 3. the whitelist judges where a path really leads, both names, the handle's own file ---------------


@pytest.fixture
def fenced(lab: Lab, work: Path) -> Iterator[Path]:
    """A server whose whitelist lets the peer change only export/qemu; export/other holds a host file."""
    export = work / "export"
    (export / "qemu").mkdir()
    (export / "other").mkdir()
    (export / "other" / "f").write_text("host data")
    os.chmod(export / "other" / "f", 0o600)
    rules = work / "whitelist"
    changing = ("Write", "Create", "Unlink", "Rename", "Setattr", "Setxattr", "Mkdir", "Rmdir")
    rules.write_text(
        f"[Open]\nPath={export}\n[Read]\nPath={export}\n[Readdir]\nPath={export}\n[Mount]\nPath={export}\n"
        + "".join(f"[{section}]\nPath={export}/qemu\n" for section in changing)
    )
    with served(lab, work, [str(export)], "--whitelist", str(rules)):
        yield export


def test_whitelist_cannot_be_bypassed(lab: Lab, work: Path, fenced: Path) -> None:
    export = fenced

    async def attack(link: Link) -> dict[str, Any]:
        results = {
            # LINK: only the new name lies in qemu/; the file stays where the rules keep it
            "link": await outcome(link, wire.Link(b"other/f", b"qemu/f")),
            # a symlink the peer may make in qemu/ leads back to other/
            "symlink": await outcome(link, wire.Symlink(b"qemu/l", b"../other", 1000, 1000)),
        }
        for name, request in {
            "rename through the link": wire.Rename(b"qemu/l/f", b"qemu/stolen"),
            "rename into the link": wire.Rename(b"qemu/stolen2", b"qemu/l/planted"),
            "create through the link": wire.Create(b"qemu/l/new", os.O_WRONLY, 0o644, 0, 0),
            "truncate through the link": wire.Open(b"qemu/l/f", os.O_WRONLY | os.O_TRUNC),
            "unlink through the link": wire.Unlink(b"qemu/l/f"),
            "chmod through the link": wire.Setattr(b"qemu/l/f", 0, wire.SET_MODE, 0o666),
            "xattr through the link": wire.Setxattr(b"qemu/l/f", b"user.x", b"y"),
        }.items():
            results[name] = await outcome(link, request)
        return results

    (export / "qemu" / "stolen2").write_text("peer's own")
    results = peer(lab, work, export, attack)
    assert sorted(os.listdir(export / "other")) == ["f"], results
    assert (export / "other" / "f").read_text() == "host data", results
    assert stat.S_IMODE((export / "other" / "f").stat().st_mode) == 0o600, results
    assert (export / "other" / "f").stat().st_nlink == 1, results
    assert "user.x" not in os.listxattr(export / "other" / "f")
    assert sorted(os.listdir(export / "qemu")) == ["l", "stolen2"], results


def test_whitelist_judges_a_handle_by_its_own_file(lab: Lab, work: Path, fenced: Path) -> None:
    export = fenced

    async def attack(link: Link) -> Any:
        # SETATTR by a handle of other/f (opened for reading), naming a path in qemu/
        opened = await link.call(wire.Open(b"other/f", os.O_RDONLY))
        assert isinstance(opened, wire.HandleReply)
        return await outcome(
            link, wire.Setattr(b"qemu/x", opened.handle, wire.SET_SIZE | wire.SET_MODE, 0o666, 0, 0, 0)
        )

    result = peer(lab, work, export, attack)
    assert (export / "other" / "f").read_text() == "host data", result
    assert stat.S_IMODE((export / "other" / "f").stat().st_mode) == 0o600, result


def test_whitelist_still_allows_what_it_allows(lab: Lab, work: Path, fenced: Path) -> None:
    export = fenced

    async def work_in_qemu(link: Link) -> None:
        made = await link.call(wire.Create(b"qemu/a", os.O_WRONLY, 0o644, 1000, 1000))
        assert isinstance(made, wire.HandleReply)
        await link.call(wire.Write(made.handle, 0, b"ok"))
        await link.call(wire.Setattr(b"qemu/a", made.handle, wire.SET_MODE, 0o600))
        await link.call(wire.Link(b"qemu/a", b"qemu/b"))
        await link.call(wire.Rename(b"qemu/b", b"qemu/c"))

    peer(lab, work, export, work_in_qemu)
    assert (export / "qemu" / "c").read_text() == "ok"
    assert stat.S_IMODE((export / "qemu" / "a").stat().st_mode) == 0o600


# -- 4. nothing blocks the server, nothing grows without bound --------------------------------------------


def test_fifo_create_and_open_do_not_block_the_server(lab: Lab, work: Path, server: Server) -> None:
    os.mkfifo(work / "export" / "fifo")
    (work / "export" / "f").write_text("x")

    async def attack(link: Link) -> dict[str, Any]:
        results = {}
        for name, request in {
            "create O_WRONLY": wire.Create(b"fifo", os.O_WRONLY, 0o644, 0, 0),
            "create O_RDONLY": wire.Create(b"fifo", os.O_RDONLY, 0o644, 0, 0),
            "open O_WRONLY": wire.Open(b"fifo", os.O_WRONLY),
            "open O_RDONLY": wire.Open(b"fifo", os.O_RDONLY),
        }.items():
            # Each is sent without waiting for it; a good request follows at once
            # and must be answered whatever became of the FIFO's.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome, link, request)
                await trio.sleep(0.2)  # the FIFO's request reaches the server first
                with trio.move_on_after(5):
                    results[name] = await outcome(link, wire.Lookup(b"f"))
                nursery.cancel_scope.cancel()
        return results

    results = peer(lab, work, work / "export", attack)
    assert len(results) == 4 and all(isinstance(r, wire.AttrReply) for r in results.values()), results


def fd_count(server: Server) -> int:
    return len(os.listdir(f"/proc/{_child_pid(server.process.pid)}/fd"))  # type: ignore[union-attr]


def test_open_handles_are_bounded_per_connection(lab: Lab, work: Path, server: Server) -> None:
    (work / "export" / "f").write_text("x")
    before = fd_count(server)

    async def hoard(link: Link) -> tuple[int, int, Any]:
        opened = refused = 0
        for _ in range(5000):
            reply = await outcome(link, wire.Open(b"f", os.O_RDONLY))
            if isinstance(reply, wire.HandleReply):
                opened += 1
            else:
                assert reply == "EMFILE"
                refused += 1
        held = fd_count(server)
        return opened, held, await outcome(link, wire.Lookup(b"f"))

    opened, held, after = peer(lab, work, work / "export", hoard)
    assert held - before <= 4096 + 16, (opened, held)
    assert isinstance(after, wire.AttrReply)  # the connection still works
    deadline = time.monotonic() + 10
    while fd_count(server) > before + 4:  # all closed with the connection
        assert time.monotonic() < deadline, fd_count(server)
        time.sleep(0.1)


def test_directory_listings_are_bounded_per_connection(lab: Lab, work: Path, server: Server) -> None:
    big = work / "export" / "big"
    big.mkdir()
    for number in range(1000):  # about 300 KB of entries: more than one page, so the server holds it
        (big / f"{number:04d}{'x' * 200}").touch()
    process = psutil.Process(_child_pid(server.process.pid))  # type: ignore[union-attr]
    before = process.memory_info().rss

    async def hoard(link: Link) -> tuple[int, int]:
        held = 0
        for _ in range(600):  # opendir, never releasedir
            reply = await outcome(link, wire.Opendir(b"big"))
            if isinstance(reply, wire.DirReply) and reply.handle:
                held += 1
        return held, process.memory_info().rss

    held, during = peer(lab, work, work / "export", hoard)
    assert during - before < 120 << 20, f"{held} listings held, {(during - before) >> 20} MiB more"
    assert held < 600


def test_calls_waiting_for_a_thread_are_bounded_per_connection(lab: Lab, work: Path, server: Server) -> None:
    """A peer sending fsyncs faster than they finish gets EAGAIN past MAX_THREADED, not a server that grows."""
    from offload.qtfs.server import MAX_THREADED

    (work / "export" / "f").write_text("x")

    async def flood(link: Link) -> tuple[list[Any], Any]:
        opened = await link.call(wire.Open(b"f", os.O_RDWR))
        assert isinstance(opened, wire.HandleReply)
        replies: list[Any] = []

        async def fsync() -> None:
            replies.append(await outcome(link, wire.Fsync(opened.handle)))

        async with trio.open_nursery() as nursery:
            for _ in range(20 * MAX_THREADED):
                nursery.start_soon(fsync)
        return replies, await outcome(link, wire.Lookup(b"f"))

    replies, after = peer(lab, work, work / "export", flood)
    assert "EAGAIN" in replies  # the excess was refused at once...
    assert any(isinstance(reply, wire.Empty) for reply in replies)  # ...and the rest synced
    assert set(map(type, replies)) <= {wire.Empty, str}
    assert isinstance(after, wire.AttrReply)  # the connection still works


# -- 5. a peer's malformed frames fail its call or end its link, never the server -----------------------


def test_malformed_requests_fail_the_call_and_keep_the_link(lab: Lab, work: Path, server: Server) -> None:
    (work / "export" / "f").write_text("x")

    async def attack(link: Link) -> tuple[dict[str, Any], set[int]]:
        opened = await link.call(wire.Open(b"f", os.O_RDWR))
        assert isinstance(opened, wire.HandleReply)
        results: dict[str, Any] = {}
        generations = set()
        for name, request in {
            "read past 2**63": wire.Read(opened.handle, (1 << 64) - 1, 10),
            "write past 2**63": wire.Write(opened.handle, (1 << 64) - 1, b"x"),
            "truncate past 2**63": wire.Setattr(b"f", 0, wire.SET_SIZE, size=(1 << 64) - 1),
            "NUL in an xattr name": wire.Setxattr(b"f", b"user.a\0b", b"v"),
            "NUL in a link target": wire.Symlink(b"l", b"a\0b", 1000, 1000),
        }.items():
            try:
                reply, generation = await link.call_on(request, retry=False)
                results[name] = reply
            except OSError as exc:
                results[name] = errno.errorcode.get(exc.errno or 0)
            _, generation = await link.call_on(wire.Lookup(b"f"))
            generations.add(generation)
        return results, generations

    results, generations = peer(lab, work, work / "export", attack)
    assert generations == {1}, results  # one connection throughout: no call ended it
    assert results["NUL in an xattr name"] == "EINVAL" and results["read past 2**63"] == "EINVAL"


def test_malformed_hello_ends_only_that_link(lab: Lab, work: Path, server: Server) -> None:
    (work / "export" / "f").write_text("x")

    async def attack(link: Link) -> Any:
        transport = Transport(TlsConfig.load(lab.dir / "pki" / "dpu"))
        for payload in (b'{"node": "x", "version": Infinity}', b"[" * 200_000, b'"just a string"', b"\xff"):
            connected = await transport.connect(parse_address(f"unix://{work}/qtfs.sock"), timeout=5)
            async with connected.stream as stream:
                await stream.send_all(encode_frame(wire.T_HELLO, 0, payload, max_payload=wire.MAX_PAYLOAD))
                with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(65536):
                        pass  # the server's Hello, then its end of this link
        return await outcome(link, wire.Lookup(b"f"))

    after = peer(lab, work, work / "export", attack)
    assert isinstance(after, wire.AttrReply)
    assert server.process is not None and server.process.poll() is None
    assert "internal error" not in server.log()
