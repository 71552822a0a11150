"""qtfs across the lab: the server in the host's namespaces, FUSE mounts in the DPU's.

Each test starts its own `qtfs serve` on the host side (exports under the
test's tmp_path, which the test process sees as the host does) and a DPU
agent: a Python process in the DPU's network namespace and a private mount
namespace of its own that runs `qtfs mount` and then executes the test's
statements one by one (JSON lines over its stdin/stdout), so host-side
changes and DPU-side calls interleave as the test says.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.lab.lab import Lab

pytestmark = pytest.mark.lab

QTFS = str(Path(sys.executable).parent / "qtfs")
PORT = 7013

AGENT = r"""
import errno, json, os, socket, stat, subprocess, sys, threading, time
QTFS = sys.argv[1]
mounts = []
def mount(*args):
    result = subprocess.run([QTFS, "mount", *args], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        mounts.append(args[-1])
    return [result.returncode, result.stderr]
def umount(path):
    result = subprocess.run([QTFS, "umount", path], capture_output=True, text=True, timeout=60)
    if result.returncode == 0 and path in mounts:
        mounts.remove(path)
    return [result.returncode, result.stderr]
def read(path):
    with open(path, "rb") as f:
        return f.read().decode("latin-1")
def write(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data.encode("latin-1"))
def errname(call, *args):
    try:
        call(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return None
env = {"os": os, "socket": socket, "stat": stat, "time": time, "threading": threading, "errno": errno,
       "mount": mount, "umount": umount, "read": read, "write": write, "errname": errname, "json": json,
       "subprocess": subprocess}
try:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request.get("exec"):
                exec(request["code"], env)
                answer = {"ok": None}
            else:
                answer = {"ok": eval(request["code"], env)}
        except OSError as exc:
            answer = {"oserror": errno.errorcode.get(exc.errno, str(exc.errno)), "message": str(exc)}
        except Exception as exc:
            answer = {"error": repr(exc)}
        print(json.dumps(answer, default=repr), flush=True)
finally:
    for path in list(mounts):
        subprocess.run([QTFS, "umount", path], capture_output=True, timeout=60)
"""


class AgentError(Exception):
    pass


class Agent:
    """A Python process on the DPU side, in a private mount namespace."""

    def __init__(self, lab: Lab, tag: Path) -> None:
        self.tag = tag  # every mount point lives below it: how leftovers are found
        self.process = proc.spawn(
            lab.command("dpu", ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", AGENT, QTFS]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=lab.env("dpu"),
        )

    def __call__(self, code: str, timeout: float = 60) -> object:
        return self._send({"code": code}, timeout)

    def run(self, code: str, timeout: float = 60) -> None:
        self._send({"code": code, "exec": True}, timeout)

    def _send(self, request: dict, timeout: float) -> object:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AgentError(f"no answer to {request['code']!r} within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise AgentError(f"the agent ended (status {self.process.wait()})")
        answer = json.loads(line)
        if "oserror" in answer:
            raise OSError(getattr(__import__("errno"), answer["oserror"], 5), answer["message"])
        if "error" in answer:
            raise AgentError(answer["error"])
        return answer["ok"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.process.stdin
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Background qtfs clients the agent started and could not unmount.
        for leftover in psutil.process_iter(["pid", "cmdline"]):
            if any(str(self.tag) in arg for arg in leftover.info["cmdline"] or ()) and "mount" in (
                leftover.info["cmdline"] or ()
            ):
                proc.end_pid(leftover.info["pid"])


class Server:
    """`qtfs serve` in the host's namespaces, ready when it says READY=1."""

    def __init__(self, lab: Lab, work: Path, exports: list[str], *extra: str, port: int = PORT) -> None:
        self.lab = lab
        self.work = work
        self.argv = [
            QTFS,
            "serve",
            "--listen",
            f"tcp://{lab.host.link.address}:{port}",
            "--listen",
            f"unix://{work}/qtfs.sock",
            "--pki",
            str(lab.dir / "pki" / "host"),
            *(arg for export in exports for arg in ("--export", export)),
            *extra,
        ]
        self.address = f"{lab.host.link.address}:{port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        notify_path = self.work / "qtfs.notify"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            log = open(self.work / "server.log", "ab")  # noqa: SIM115 (the server's stderr)
            self.process = proc.spawn(
                self.lab.command("host", self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )
            log.close()
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(100):
                        return
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"qtfs serve did not start: {(self.work / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.work / "server.log").read_text()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    (tmp_path / "export").mkdir()
    (tmp_path / "mnt").mkdir()
    return tmp_path


@pytest.fixture
def server(lab: Lab, work: Path) -> Iterator[Server]:
    running = Server(lab, work, [str(work / "export")])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def agent(lab: Lab, work: Path) -> Iterator[Agent]:
    dpu = Agent(lab, work)
    try:
        yield dpu
    finally:
        dpu.close()


def pki(lab: Lab) -> str:
    return str(lab.dir / "pki" / "dpu")


def mount(agent: Agent, lab: Lab, source: str, where: Path, *options: str) -> None:
    status, error = agent(f"mount('--pki', {pki(lab)!r}, *{list(options)!r}, {source!r}, {str(where)!r})")  # type: ignore[misc]
    assert status == 0, error


def eventually(agent: Agent, code: str, expected: object, within: float = 5.0) -> None:
    """``code`` evaluates to ``expected`` on the DPU once the host's Invalidate has arrived.

    With the coherent cache a host-side change reaches the DPU's kernel one
    message later (milliseconds); ``within`` is far below the cache's
    lifetime, so only that message can make the new state visible in time.
    """
    deadline = time.monotonic() + within
    while (got := agent(code)) != expected:
        assert time.monotonic() < deadline, f"{code}: still {got!r}, expected {expected!r}"
        time.sleep(0.01)


def test_operations_both_ways(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    host, mnt = work / "export", work / "mnt"
    (host / "from-host.txt").write_text("host says hi\n")
    (host / "sub").mkdir()
    mount(agent, lab, f"{server.address}:{host}", mnt)
    assert agent(f"read({str(mnt / 'from-host.txt')!r})") == "host says hi\n"
    assert sorted(agent(f"os.listdir({str(mnt)!r})")) == ["from-host.txt", "sub"]  # type: ignore[arg-type]
    assert agent(f"stat.S_ISDIR(os.stat({str(mnt / 'sub')!r}).st_mode)") is True

    # DPU -> host: create, write at offsets, truncate, rename, mkdir, rmdir, unlink
    m = str(mnt)
    agent.run(
        f"fd = os.open({m + '/new'!r}, os.O_CREAT | os.O_RDWR, 0o640); os.pwrite(fd, b'0123456789', 0); "
        "os.pwrite(fd, b'AB', 4); os.fsync(fd); os.close(fd)"
    )
    assert (host / "new").read_bytes() == b"0123AB6789"
    assert stat.S_IMODE((host / "new").stat().st_mode) == 0o640
    agent.run(f"os.truncate({m + '/new'!r}, 3)")
    assert (host / "new").read_bytes() == b"012"
    agent.run(f"os.rename({m + '/new'!r}, {m + '/sub/moved'!r})")
    assert (host / "sub" / "moved").exists() and not (host / "new").exists()
    agent.run(f"os.mkdir({m + '/d'!r}, 0o750)")
    assert (host / "d").is_dir() and stat.S_IMODE((host / "d").stat().st_mode) == 0o750
    agent.run(f"os.rmdir({m + '/d'!r})")
    assert not (host / "d").exists()

    # attributes
    agent.run(f"os.chmod({m + '/sub/moved'!r}, 0o600); os.chown({m + '/sub/moved'!r}, 1234, 5678)")
    st = (host / "sub" / "moved").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    agent.run(f"os.utime({m + '/sub/moved'!r}, ns=(1_000_000_000, 2_000_000_000))")
    st = (host / "sub" / "moved").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.utime(host / "from-host.txt", ns=(3_000_000_000, 4_000_000_000))
    eventually(agent, f"os.stat({m + '/from-host.txt'!r}).st_mtime_ns", 4_000_000_000)

    # links
    agent.run(f"os.symlink('sub/moved', {m + '/sl'!r}); os.link({m + '/from-host.txt'!r}, {m + '/hard'!r})")
    assert os.readlink(host / "sl") == "sub/moved"
    assert (host / "hard").stat().st_ino == (host / "from-host.txt").stat().st_ino
    os.symlink("from-host.txt", host / "hostlink")
    assert agent(f"os.readlink({m + '/hostlink'!r})") == "from-host.txt"
    assert agent(f"os.stat({m + '/hard'!r}).st_nlink") == 2

    # xattrs (the host's tmpfs or ext4 allows user.* on regular files)
    agent.run(f"os.setxattr({m + '/hard'!r}, 'user.qtfs', b'v1')")
    assert os.getxattr(host / "hard", "user.qtfs") == b"v1"
    os.setxattr(host / "hard", "user.host", b"v2")
    assert agent(f"os.getxattr({m + '/hard'!r}, 'user.host')") == "b'v2'"
    assert set(agent(f"os.listxattr({m + '/hard'!r})")) >= {"user.qtfs", "user.host"}  # type: ignore[arg-type]
    agent.run(f"os.removexattr({m + '/hard'!r}, 'user.qtfs')")
    assert "user.qtfs" not in os.listxattr(host / "hard")
    assert agent(f"errname(os.getxattr, {m + '/hard'!r}, 'user.none')") == "ENODATA"

    # statfs is the host filesystem's
    host_fs = os.statvfs(host)
    assert agent(f"os.statvfs({m!r}).f_blocks") == host_fs.f_blocks

    # unlink both ways
    agent.run(f"os.unlink({m + '/hard'!r})")
    assert not (host / "hard").exists()
    (host / "from-host.txt").unlink()
    eventually(agent, f"errname(os.stat, {m + '/from-host.txt'!r})", "ENOENT")

    # no stale data: the host rewrites a file the DPU has open and has read
    (host / "live").write_text("one")
    agent.run(f"live = open({m + '/live'!r}, 'rb'); first = live.read()")
    (host / "live").write_text("two, longer")
    eventually(agent, "first.decode() + '|' + live.seek(0).__str__() + '|' + live.read().decode()", "one|0|two, longer")
    agent.run("live.close()")
    (host / "live").write_text("three")
    eventually(agent, f"read({m + '/live'!r})", "three")
    agent.run(f"write({m + '/live'!r}, 'four')")
    assert (host / "live").read_text() == "four"

    # errors travel by name
    assert agent(f"errname(os.rmdir, {m + '/sub'!r})") == "ENOTEMPTY"
    assert agent(f"errname(os.mkdir, {m + '/sub'!r})") == "EEXIST"
    assert agent(f"errname(os.open, {m + '/sub/moved'!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)") == "EEXIST"


def test_close_reaches_the_host(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    (work / "export" / "f").write_text("x")
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    assert server.process is not None
    host_pid = _child_pid(server.process.pid)

    def open_files() -> int:
        return sum(1 for f in psutil.Process(host_pid).open_files() if f.path == str(work / "export" / "f"))

    for how in (
        "'r+b'); ",
        "'rb'); held.read(); ",
    ):  # an open for writing asks the host at once, one for reading at its first read
        agent.run(f"held = open({str(work / 'mnt' / 'f')!r}, {how}")
        assert open_files() == 1
        agent.run("held.close()")
        deadline = time.monotonic() + 5
        while open_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_files() == 0


def _child_pid(pid: int) -> int:
    """The qtfs process itself (the lab runs it through nsenter)."""
    process = psutil.Process(pid)
    for candidate in [process, *process.children(recursive=True)]:
        if any(arg == "serve" for arg in candidate.cmdline()):
            return candidate.pid
    raise AssertionError("no qtfs serve process")


def test_sockets_and_fifos(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    host, m = work / "export", str(work / "mnt")
    mount(agent, lab, f"{server.address}:{host}", work / "mnt")
    # libvirt binds its monitor sockets in the mount: bind, listen, connect, all on the DPU side
    agent.run(
        f"srv = socket.socket(socket.AF_UNIX); srv.bind({m + '/mon.sock'!r}); srv.listen(1)\n"
        f"cli = socket.socket(socket.AF_UNIX); cli.connect({m + '/mon.sock'!r}); peer, _ = srv.accept()\n"
        "cli.sendall(b'ping'); got = peer.recv(4); peer.close(); cli.close(); srv.close()"
    )
    assert agent("got") == "b'ping'"
    assert stat.S_ISSOCK((host / "mon.sock").lstat().st_mode)
    assert agent(f"stat.S_ISSOCK(os.lstat({m + '/mon.sock'!r}).st_mode)") is True
    agent.run(f"os.mkfifo({m + '/dpu.fifo'!r})")
    assert stat.S_ISFIFO((host / "dpu.fifo").lstat().st_mode)
    os.mkfifo(host / "host.fifo")
    assert agent(f"stat.S_ISFIFO(os.lstat({m + '/host.fifo'!r}).st_mode)") is True
    assert agent(f"errname(os.mknod, {m + '/dev'!r}, stat.S_IFCHR | 0o600, os.makedev(1, 3))") == "EPERM"


def test_readdir_of_1000_entries(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    big = work / "export" / "big"
    big.mkdir()
    names = {f"entry-{i:04d}-{'x' * (i % 40)}" for i in range(1000)}
    for name in names:
        (big / name).write_text(name)
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    listed = agent(f"sorted(os.listdir({str(work / 'mnt' / 'big')!r}))")
    assert listed == sorted(names)
    sizes = agent(f"sorted({{e.name: e.stat().st_size for e in os.scandir({str(work / 'mnt' / 'big')!r})}}.items())")
    assert sizes == sorted([name, len(name)] for name in names)


def test_kernel_keeps_listings_and_drops_them_on_host_changes(
    lab: Lab, work: Path, server: Server, agent: Agent
) -> None:
    """The DPU kernel answers a repeated listing itself (no READDIR reaches the
    client), and a change on the host ends that at once, for a new open and
    for a handle held open and rewound."""
    host, m = work / "export", str(work / "mnt")
    (host / "dir").mkdir()
    (host / "dir" / "a").write_text("a")
    log_file = work / "client.log"
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--coherent-cache", "600",
          "--log-level", "DEBUG", "--log-file", str(log_file))  # fmt: skip

    def readdirs() -> int:
        return log_file.read_text().count("readdir b'dir'")

    assert agent(f"os.listdir({m + '/dir'!r})") == ["a"]
    served = readdirs()
    assert served >= 1
    for _ in range(3):
        assert agent(f"os.listdir({m + '/dir'!r})") == ["a"]
    assert readdirs() == served, "the kernel asked again for a listing it should keep"

    agent.run(f"held = os.open({m + '/dir'!r}, os.O_RDONLY | os.O_DIRECTORY)")
    assert agent("os.listdir(held)") == ["a"]  # listdir(fd) rewinds the open directory
    (host / "dir" / "b").write_text("b")
    eventually(agent, f"sorted(os.listdir({m + '/dir'!r}))", ["a", "b"])
    eventually(agent, "sorted(os.listdir(held))", ["a", "b"])
    assert readdirs() > served
    (host / "dir" / "a").unlink()
    eventually(agent, "os.listdir(held)", ["b"])
    eventually(agent, f"os.listdir({m + '/dir'!r})", ["b"])
    agent.run("os.close(held)")

    # A change that leaves the directory's mtime as it was (tar and rsync restore
    # it): the kernel's own check of the mtime cannot tell, the client must.
    agent.run("held = os.open(%r, os.O_RDONLY | os.O_DIRECTORY); os.listdir(held)" % (m + "/dir"))
    assert agent(f"os.listdir({m + '/dir'!r})") == ["b"]
    before = os.stat(host / "dir")
    (host / "dir" / "quiet").write_text("")
    os.utime(host / "dir", ns=(before.st_atime_ns, before.st_mtime_ns))
    eventually(agent, "sorted(os.listdir(held))", ["b", "quiet"])  # before any new open
    eventually(agent, f"sorted(os.listdir({m + '/dir'!r}))", ["b", "quiet"])
    (host / "dir" / "quiet").unlink()
    os.utime(host / "dir", ns=(before.st_atime_ns, before.st_mtime_ns))
    eventually(agent, "sorted(os.listdir(held))", ["b"])
    eventually(agent, f"sorted(os.listdir({m + '/dir'!r}))", ["b"])
    agent.run("os.close(held)")

    # A change made from the DPU is its kernel's own: seen by the very next listing.
    agent.run(f"write({m + '/dir/c'!r}, 'c')")
    assert sorted(agent(f"os.listdir({m + '/dir'!r})")) == ["b", "c"]  # type: ignore[arg-type]
    agent.run(f"os.unlink({m + '/dir/b'!r})")
    assert agent(f"os.listdir({m + '/dir'!r})") == ["c"]


def test_listings_settle_on_the_hosts_state_after_a_storm_of_changes(
    lab: Lab, work: Path, server: Server, agent: Agent
) -> None:
    """The DPU lists a directory over and over while the host changes it; once
    the host stops, every listing (new opens and a held, rewound handle) is
    the host's, however the changes fell between the kernel's cache fills."""
    host, m = work / "export", str(work / "mnt")
    (host / "dir").mkdir()
    for i in range(300):
        (host / "dir" / f"base-{i:03d}").write_text("")
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--coherent-cache", "600")
    agent.run(
        f"held = os.open({m + '/dir'!r}, os.O_RDONLY | os.O_DIRECTORY); listings = [0]; stop = threading.Event()\n"
        "def keep_listing():\n"
        "    while not stop.is_set():\n"
        f"        os.listdir({m + '/dir'!r}); os.listdir(held); listings[0] += 1\n"
        "lister = threading.Thread(target=keep_listing); lister.start()"
    )
    try:
        for i in range(400):
            (host / "dir" / f"new-{i:03d}").write_text("")
            if i % 3 == 0:
                (host / "dir" / f"base-{i % 300:03d}").unlink(missing_ok=True)
            if i % 7 == 0:
                os.rename(host / "dir" / f"new-{i:03d}", host / "dir" / f"renamed-{i:03d}")
            # Every 40 changes, wait for a listing to fall in between, however slow the machine.
            if i % 40 == 0:
                seen = agent("listings[0]")
                deadline = time.monotonic() + 60
                while agent("listings[0]") == seen:
                    assert time.monotonic() < deadline, "the DPU side stopped listing"
                    time.sleep(0.005)
    finally:
        agent.run("stop.set(); lister.join()")
    assert agent("listings[0]") >= 10  # type: ignore[operator]
    expected = sorted(os.listdir(host / "dir"))
    eventually(agent, f"sorted(os.listdir({m + '/dir'!r}))", expected)
    eventually(agent, "sorted(os.listdir(held))", expected)
    for _ in range(3):  # and it stays so, from the kernel's cache
        assert agent(f"sorted(os.listdir({m + '/dir'!r}))") == expected
        assert agent("sorted(os.listdir(held))") == expected
    agent.run("os.close(held)")


def test_proc_mode_prepared_tree(lab: Lab, work: Path, agent: Agent) -> None:
    tree = work / "fakeproc"
    (tree / "sys" / "vm").mkdir(parents=True)
    (tree / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Host CPU from the prepared tree\n")
    (tree / "meminfo").write_text("MemTotal:       123456 kB\n")
    (tree / "sys" / "vm" / "nr_hugepages").write_text("42\n")
    (tree / "4242").mkdir()
    (tree / "self").symlink_to("4242")
    (tree / "thread-self").symlink_to("4242/task/4242")
    running = Server(lab, work, [f"{tree}:ro"])
    try:
        staging = work / "mnt"
        mount(agent, lab, f"{running.address}:{tree}", staging, "--proc")
        s = str(staging)
        assert sorted(agent(f"os.listdir({s!r})")) == ["cpuinfo", "meminfo", "sys"]  # type: ignore[arg-type]
        assert agent(f"errname(os.stat, {s + '/self'!r})") == "ENOENT"
        assert agent(f"errname(os.stat, {s + '/4242'!r})") == "ENOENT"
        assert agent(f"errname(write, {s + '/cpuinfo'!r}, 'x')") == "EROFS"
        # LXCFS-style: bind the host's files over this side's procfs; per-process entries stay local
        agent.run(
            f"subprocess = __import__('subprocess')\n"
            f"for name in ('cpuinfo', 'meminfo', 'sys/vm/nr_hugepages'):\n"
            f"    subprocess.run(['mount', '--bind', {s!r} + '/' + name, '/proc/' + name], check=True)"
        )
        assert "Host CPU from the prepared tree" in agent("read('/proc/cpuinfo')")  # type: ignore[operator]
        assert agent("read('/proc/meminfo')") == "MemTotal:       123456 kB\n"
        assert agent("read('/proc/sys/vm/nr_hugepages')") == "42\n"
        assert agent("os.readlink('/proc/self') == str(os.getpid())") is True
        assert agent("read('/proc/%d/comm' % os.getpid()).strip()").startswith("python")  # type: ignore[union-attr]
        assert agent("'Name:' in read('/proc/self/status')") is True
        agent.run(
            "for name in ('cpuinfo', 'meminfo', 'sys/vm/nr_hugepages'): subprocess.run(['umount', '/proc/' + name], check=True)"
        )
    finally:
        running.stop()


def test_proc_mode_real_proc(lab: Lab, work: Path, agent: Agent) -> None:
    running = Server(lab, work, ["/proc:ro"])
    try:
        s = str(work / "mnt")
        mount(agent, lab, f"{running.address}:/proc", work / "mnt", "--proc")
        listing = agent(f"os.listdir({s!r})")
        assert "cpuinfo" in listing and "meminfo" in listing  # type: ignore[operator]
        assert not [n for n in listing if n.isdigit() or n in ("self", "thread-self")]  # type: ignore[union-attr]
        # size 0 in stat, yet read whole: as long as the host's own file
        assert agent(f"os.stat({s + '/cpuinfo'!r}).st_size") == 0
        cpuinfo = agent(f"read({s + '/cpuinfo'!r})")
        assert cpuinfo.count("processor") == Path("/proc/cpuinfo").read_text().count("processor") > 0  # type: ignore[union-attr]

        def steady(text: str) -> list[str]:
            return [line for line in text.splitlines() if "MHz" not in line and "bogomips" not in line]

        assert steady(cpuinfo) == steady(Path("/proc/cpuinfo").read_text())  # type: ignore[arg-type]
        keys = [line.split(":")[0] for line in agent(f"read({s + '/meminfo'!r})").splitlines()]  # type: ignore[union-attr]
        assert keys == [line.split(":")[0] for line in Path("/proc/meminfo").read_text().splitlines()]
        # only the facts libvirt reads are served: /proc/sys shows the way to them, nothing else
        assert "vm" in set(agent(f"os.listdir({s + '/sys'!r})")) <= {"crypto", "vm"}  # type: ignore[call-overload]
        assert agent(f"errname(os.listdir, {s + '/sys/net'!r})") == "ENOENT"
        assert agent(f"errname(read, {s + '/mounts'!r})") == "ENOENT"
    finally:
        running.stop()


def test_sys_mode(lab: Lab, work: Path, agent: Agent) -> None:
    tree = work / "fakesys"
    (tree / "devices" / "system" / "cpu").mkdir(parents=True)
    (tree / "devices" / "system" / "cpu" / "online").write_text("0-63\n")
    (tree / "devices" / "pci0000:00").mkdir(parents=True)
    (tree / "kernel" / "mm" / "hugepages" / "hugepages-2048kB").mkdir(parents=True)
    (tree / "kernel" / "mm" / "hugepages" / "hugepages-2048kB" / "nr_hugepages").write_text("7\n")
    (tree / "fs" / "cgroup").mkdir(parents=True)
    (tree / "module" / "kvm" / "parameters").mkdir(parents=True)
    (tree / "module" / "loop").mkdir(parents=True)
    running = Server(lab, work, [f"{tree}:ro", "/sys:ro"], port=PORT + 1)
    try:
        s = str(work / "mnt")
        mount(agent, lab, f"{running.address}:{tree}", work / "mnt", "--sys")
        assert sorted(agent(f"os.listdir({s!r})")) == ["devices", "kernel", "module"]  # type: ignore[arg-type]
        assert agent(f"os.listdir({s + '/devices'!r})") == ["system"]
        assert agent(f"os.listdir({s + '/module'!r})") == ["kvm"]
        assert agent(f"read({s + '/devices/system/cpu/online'!r})") == "0-63\n"
        assert agent(f"read({s + '/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages'!r})") == "7\n"
        assert agent(f"errname(os.stat, {s + '/fs/cgroup'!r})") == "ENOENT"
        agent(f"umount({s!r})")
        mount(agent, lab, f"{running.address}:/sys", work / "mnt", "--sys")
        assert (
            agent(f"read({s + '/devices/system/cpu/online'!r})") == Path("/sys/devices/system/cpu/online").read_text()
        )
        assert "cpu0" in agent(f"os.listdir({s + '/devices/system/cpu'!r})")  # type: ignore[operator]
        assert agent(f"os.path.exists({s + '/fs'!r})") is False
    finally:
        running.stop()


def test_whitelist_refusals(lab: Lab, work: Path, agent: Agent) -> None:
    export = work / "export"
    (export / "qemu").mkdir()
    (export / "other").mkdir()
    (export / "other" / "f").write_text("x")
    rules = work / "whitelist"
    rules.write_text(
        f"[Open]\nPath={export}\n[Read]\nPath={export}\n[Readdir]\nPath={export}\n"
        f"[Write]\nPath={export}/qemu\n[Create]\nPath={export}/qemu\n[Unlink]\nPath={export}/qemu\n"
        f"[Mkdir]\nPath={export}/qemu\n[Mount]\nPath={export}\n"
    )
    running = Server(lab, work, [str(export)], "--whitelist", str(rules))
    try:
        m = str(work / "mnt")
        mount(agent, lab, f"{running.address}:{export}", work / "mnt")
        agent.run(f"write({m + '/qemu/ok'!r}, 'fine'); os.mkdir({m + '/qemu/dir'!r})")
        assert (export / "qemu" / "ok").read_text() == "fine"
        assert agent(f"errname(write, {m + '/other/new'!r}, 'no')") == "EACCES"
        assert agent(f"errname(write, {m + '/other/f'!r}, 'no')") == "EACCES"
        assert agent(f"errname(os.unlink, {m + '/other/f'!r})") == "EACCES"
        assert agent(f"errname(os.mkdir, {m + '/other/d'!r})") == "EACCES"
        assert agent(f"errname(os.rmdir, {m + '/qemu/dir'!r})") == "EACCES"  # no [Rmdir] at all
        assert agent(f"errname(os.rename, {m + '/qemu/ok'!r}, {m + '/qemu/ok2'!r})") == "EACCES"
        assert agent(f"read({m + '/other/f'!r})") == "x"
        assert not (export / "other" / "new").exists() and (export / "other" / "f").read_text() == "x"
        # a path the [Mount] rules do not cover cannot be mounted; the reason reaches the caller
        status, error = agent(f"mount('--pki', {pki(lab)!r}, {running.address + ':' + str(work)!r}, {m + '/qemu'!r})")  # type: ignore[misc]
        assert status != 0 and "Permission denied" in error
    finally:
        running.stop()


def test_escapes_refused(lab: Lab, work: Path, server: Server) -> None:
    """`..` and symlinks leaving the export, sent by a client that does not play by the rules."""
    import trio

    from offload.net import Transport, parse_address
    from offload.pki import TlsConfig
    from offload.protocol import qtfs as wire
    from offload.protocol.framing import encode_frame
    from offload.qtfs.client import Link

    export = work / "export"
    (work / "secret").write_text("host secret")
    (export / "dir").mkdir()
    os.symlink("/etc", export / "abs")
    os.symlink("../../secret", export / "dir" / "up")
    transport = Transport(TlsConfig.load(lab.dir / "pki" / "dpu"))

    async def probe() -> dict[str, str]:
        results = {}
        link = Link(transport, parse_address(f"unix://{work}/qtfs.sock"), os.fsencode(export))
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            for path in (b"abs/passwd", b"dir/up", b"dir/up/x"):
                try:
                    await link.call(wire.Open(path, os.O_RDONLY))
                    results[path.decode()] = "opened"
                except OSError as exc:
                    results[path.decode()] = os.strerror(exc.errno or 0)
            # a '..' component, sent raw (our own messages refuse to carry it)
            current = link._current
            assert current is not None
            body = b"\x02" + len(b"dir/../..").to_bytes(4, "big") + b"dir/../.."
            current.conn.pending[99] = wire.Op.LOOKUP
            await current.stream.send_all(encode_frame(wire.T_REQUEST, 99, body))
            deadline = trio.current_time() + 5
            while 99 in current.conn.pending and trio.current_time() < deadline:
                await trio.sleep(0.05)
            results[".."] = "answered" if 99 not in current.conn.pending else "no answer"
            try:
                await link.call(wire.Lookup(b"dir"))
                results["after"] = "connection alive"
            except OSError as exc:
                results["after"] = str(exc)
            nursery.cancel_scope.cancel()
        return results

    results = trio.run(probe)
    assert results["abs/passwd"] == "Permission denied"
    assert results["dir/up/x"] == "Permission denied"
    # the link itself is a symlink in the export; opening it never follows it
    assert results["dir/up"] != "opened"
    assert results[".."] == "answered" and results["after"] == "connection alive"
    assert "refused a request" in server.log()


def test_server_restart_during_read_loop(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    (work / "export" / "data").write_bytes(bytes(range(256)) * 64)
    m = str(work / "mnt")
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt", "--keepalive", "3")
    agent.run(
        "results = []; stop = False\n"
        f"held = os.open({m + '/data'!r}, os.O_RDONLY)\n"
        "def loop():\n"
        "    while not stop:\n"
        "        try:\n"
        f"            whole = read({m + '/data'!r})\n"
        "            part = os.pread(held, 256, 256)\n"
        "            results.append('ok' if len(whole) == 16384 and part == bytes(range(256)).decode('latin-1').encode('latin-1') else 'bad')\n"
        "        except OSError as exc:\n"
        "            results.append(errno.errorcode[exc.errno])\n"
        "        time.sleep(0.01)\n"
        "reader = threading.Thread(target=loop); reader.start()"
    )

    def until(condition: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while not agent(condition):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    until("results.count('ok') >= 10", "reads before the restart")
    server.stop()
    stopped_at = agent("len(results)")
    until(f"len(results) >= {stopped_at} + 5", "reads while the server is down")
    server.start()
    started_at = agent("len(results)")
    until(f"len(results) >= {started_at} + 10 and results[-10:] == ['ok'] * 10", "good reads after the restart")
    agent.run("stop = True; reader.join(); os.close(held)")
    results: list[str] = agent("results")  # type: ignore[assignment]
    assert results[0] == "ok" and results[-1] == "ok", results[-5:]
    failures = {r for r in results if r != "ok"}
    assert failures <= {"EIO"}, failures  # never ENOTCONN, never wrong data


def test_link_loss_gives_eio_in_bounded_time(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    (work / "export" / "f").write_text("x")
    m = str(work / "mnt")
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt", "--keepalive", "2")
    assert agent(f"read({m + '/f'!r})") == "x"
    lab.set_link(False)
    try:
        agent.run(f"t0 = time.monotonic(); failure = errname(os.stat, {m + '/f'!r}); took = time.monotonic() - t0")
        assert agent("failure") == "EIO"
        assert agent("took") < 10  # type: ignore[operator]
    finally:
        lab.set_link(True)
    deadline = time.monotonic() + 15
    while agent(f"errname(os.stat, {m + '/f'!r})") is not None:
        assert time.monotonic() < deadline, "the mount did not come back after the link did"
        time.sleep(0.2)
    assert agent(f"read({m + '/f'!r})") == "x"


def test_mount_failures_and_umount(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    m = str(work / "mnt")
    # nothing listens there: non-zero, with the reason
    status, error = agent(f"mount('--pki', {pki(lab)!r}, '{lab.host.link.address}:7999:/x', {m!r})")  # type: ignore[misc]
    assert status != 0 and "7999" in error
    # not exported
    status, error = agent(f"mount('--pki', {pki(lab)!r}, '{server.address}:/etc', {m!r})")  # type: ignore[misc]
    assert status != 0 and "Permission denied" in error
    assert agent(f"os.path.ismount({m!r})") is False
    # a good mount, then umount: the background process ends
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    pids = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if m in (p.info["cmdline"] or ()) and "mount" in p.info["cmdline"]
    ]
    assert len(pids) == 1
    status, error = agent(f"umount({m!r})")  # type: ignore[misc]
    assert status == 0, error
    assert agent(f"os.path.ismount({m!r})") is False
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


def test_client_crash_is_recovered_by_remounting(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    (work / "export" / "f").write_text("x")
    m = str(work / "mnt")
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    (pid,) = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if m in (p.info["cmdline"] or ()) and "mount" in p.info["cmdline"]
    ]
    os.kill(pid, 9)
    # The client's guard aborts the connection and detaches the dead mount
    # (tests/test_qtfs_death.py: also while a thread of the client is stuck).
    deadline = time.monotonic() + 15
    # (os.path.ismount cannot tell: a dead FUSE mount fails its stat.)
    mounted = f"any(line.split()[4] == {m!r} for line in open('/proc/self/mountinfo'))"
    while agent(mounted):
        assert time.monotonic() < deadline, "the killed client's mount is still there"
        time.sleep(0.05)
    mount(agent, lab, f"{server.address}:{work / 'export'}", work / "mnt")
    assert agent(f"read({m + '/f'!r})") == "x"


@contextlib.contextmanager
def _stopped(server: Server) -> Iterator[None]:
    """The server process frozen (SIGSTOP): whatever the DPU gets meanwhile comes from its own cache."""
    assert server.process is not None
    frozen = psutil.Process(_child_pid(server.process.pid))
    frozen.suspend()
    try:
        yield
    finally:
        frozen.resume()


def test_coherent_cache_sees_every_host_change(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    host, m = work / "export", str(work / "mnt")
    (host / "file").write_text("one")
    (host / "dir").mkdir()
    (host / "dir" / "a").write_text("a")
    # A lifetime far longer than `eventually` waits: only the host's Invalidate can refresh in time.
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--coherent-cache", "600")
    assert agent(f"read({m + '/file'!r})") == "one"
    assert agent(f"sorted(os.listdir({m + '/dir'!r}))") == ["a"]
    mode = agent(f"stat.S_IMODE(os.stat({m + '/file'!r}).st_mode)")

    # It caches: with the server frozen, the stat, the lookups and the file's pages are still answered.
    with _stopped(server):
        assert agent(f"stat.S_IMODE(os.stat({m + '/file'!r}).st_mode)", timeout=5) == mode
        assert agent(f"os.stat({m + '/dir/a'!r}).st_size", timeout=5) == 1
    agent.run(f"held = open({m + '/file'!r}, 'rb'); held.read()")
    with _stopped(server):
        assert agent("held.seek(0) or held.read()", timeout=5) == "b'one'"

    # Data: a rewrite on the host is seen by the next read, through an open file too.
    (host / "file").write_text("two, longer")
    eventually(agent, "held.seek(0) or held.read()", "b'two, longer'")
    eventually(agent, f"read({m + '/file'!r})", "two, longer")
    with open(host / "file", "r+b") as f:  # same size, new content: only the data event tells
        f.write(b"TWO")
    eventually(agent, f"read({m + '/file'!r})", "TWO, longer")
    agent.run("held.close()")

    # Attributes.
    os.chmod(host / "file", 0o600)
    eventually(agent, f"stat.S_IMODE(os.stat({m + '/file'!r}).st_mode)", 0o600)
    os.utime(host / "file", ns=(5_000_000_000, 6_000_000_000))
    eventually(agent, f"os.stat({m + '/file'!r}).st_mtime_ns", 6_000_000_000)

    # Entries: create, delete, rename, in a directory the DPU has listed and looked into.
    (host / "dir" / "b").write_text("b")
    eventually(agent, f"sorted(os.listdir({m + '/dir'!r}))", ["a", "b"])
    eventually(agent, f"read({m + '/dir/b'!r})", "b")
    (host / "dir" / "a").unlink()
    eventually(agent, f"errname(os.stat, {m + '/dir/a'!r})", "ENOENT")
    os.rename(host / "dir" / "b", host / "dir" / "c")
    eventually(agent, f"errname(os.stat, {m + '/dir/b'!r})", "ENOENT")
    eventually(agent, f"read({m + '/dir/c'!r})", "b")
    (host / "other").write_text("replaced")
    os.rename(host / "other", host / "dir" / "c")  # over an entry the DPU has cached
    eventually(agent, f"read({m + '/dir/c'!r})", "replaced")

    # A directory made on the host and filled at once (before the server could watch it).
    (host / "fresh").mkdir()
    (host / "fresh" / "inner").mkdir()
    (host / "fresh" / "inner" / "x").write_text("x1")
    eventually(agent, f"read({m + '/fresh/inner/x'!r})", "x1")
    (host / "fresh" / "inner" / "x").write_text("x2")
    eventually(agent, f"read({m + '/fresh/inner/x'!r})", "x2")
    # ... and a tree moved in from outside the export, then changed.
    outside = work / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "y").write_text("y1")
    os.rename(outside, host / "moved-in")
    eventually(agent, f"read({m + '/moved-in/deep/y'!r})", "y1")
    (host / "moved-in" / "deep" / "y").write_text("y2")
    eventually(agent, f"read({m + '/moved-in/deep/y'!r})", "y2")
    (host / "fresh" / "inner" / "x").unlink()
    eventually(agent, f"os.listdir({m + '/fresh/inner'!r})", [])

    # Writes from the DPU are on the host at once and read back fresh here.
    agent.run(f"write({m + '/dir/c'!r}, 'from the dpu')")
    assert (host / "dir" / "c").read_text() == "from the dpu"
    assert agent(f"read({m + '/dir/c'!r})") == "from the dpu"


def test_coherent_cache_dropped_on_reconnect(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    host, m = work / "export", str(work / "mnt")
    (host / "file").write_text("before")
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--coherent-cache", "600", "--keepalive", "2")
    assert agent(f"read({m + '/file'!r})") == "before"
    assert agent(f"stat.S_IMODE(os.stat({m + '/file'!r}).st_mode)") == 0o644
    # Changes made while no server watches are announced by no one: the reconnect drops the cache.
    server.stop()
    (host / "file").write_text("after the restart")
    os.chmod(host / "file", 0o640)
    (host / "new").write_text("new")
    server.start()
    eventually(agent, f"errname(read, {m + '/file'!r}) or read({m + '/file'!r})", "after the restart", within=20)
    assert agent(f"stat.S_IMODE(os.stat({m + '/file'!r}).st_mode)") == 0o640
    assert agent(f"read({m + '/new'!r})") == "new"


def test_no_cache_mode(lab: Lab, work: Path, server: Server, agent: Agent) -> None:
    host, m = work / "export", str(work / "mnt")
    (host / "file").write_text("one")
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--no-cache")
    assert agent(f"read({m + '/file'!r})") == "one"
    # Nothing cached: every call asks the host, so a frozen server holds up even a stat.
    with _stopped(server), pytest.raises(AgentError):
        agent(f"os.stat({m + '/file'!r})", timeout=1.5)
    assert agent.process.stdout is not None
    late = json.loads(agent.process.stdout.readline())  # the stat's answer, once the server went on
    assert stat.S_ISREG(late["ok"][0]), late
    assert agent("1") == 1
    (host / "file").write_text("two")
    assert agent(f"read({m + '/file'!r})") == "two"  # and with no window at all


def test_coherent_cache_dropped_when_the_hosts_event_queue_overflows(
    lab: Lab, work: Path, server: Server, agent: Agent
) -> None:
    host, m = work / "export", str(work / "mnt")
    (host / "file").write_text("before")
    (host / "a").write_text("")
    (host / "b").write_text("")
    mount(agent, lab, f"{server.address}:{host}", work / "mnt", "--coherent-cache", "600")
    assert agent(f"read({m + '/file'!r})") == "before"
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with _stopped(server):
        # Fill the server's inotify queue (alternating files: the kernel merges only repeats),
        # then change the file the DPU has cached: that event is lost.
        for i in range(limit // 2 + 10):
            os.utime(host / "a", ns=(i, i))
            os.utime(host / "b", ns=(i, i))
        (host / "file").write_text("after the overflow")
    eventually(agent, f"read({m + '/file'!r})", "after the overflow")
    assert "overflowed" in server.log()


# pjdfstest-style: the same steps run on the DPU against a local directory of
# the host's filesystem and against that filesystem through qtfs; every
# step's result (value or errno) must be the same.  Device nodes are left
# out: qtfs refuses them by design (test_sockets_and_fifos).
POSIX_STEPS = r"""
def posix_steps(base):
    import os, socket, stat, time
    def p(name):
        return os.path.join(base, name)
    def close(fd):
        os.close(fd)
    def st(name, follow=True):
        s = os.stat(p(name), follow_symlinks=follow)
        size = None if stat.S_ISDIR(s.st_mode) else s.st_size
        return [stat.S_IFMT(s.st_mode), oct(stat.S_IMODE(s.st_mode)), s.st_nlink, s.st_uid, s.st_gid, size]
    def lst(name):
        return st(name, follow=False)
    def times(name, follow=True):
        s = os.stat(p(name), follow_symlinks=follow)
        return [s.st_atime_ns, s.st_mtime_ns]
    def rd(name):
        with open(p(name), "rb") as f:
            return f.read().hex()
    def pw(name, pieces, flags=os.O_WRONLY):
        fd = os.open(p(name), flags)
        try:
            return [os.pwrite(fd, data, offset) if offset is not None else os.write(fd, data) for data, offset in pieces]
        finally:
            os.close(fd)
    def pr(name, size, offset):
        fd = os.open(p(name), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset).hex()
        finally:
            os.close(fd)
    def ls(name):
        return sorted(os.listdir(p(name)))
    def same(a, b):
        return os.stat(p(a)).st_ino == os.stat(p(b)).st_ino
    def changes(name, action):
        before = os.stat(p(name))
        time.sleep(0.02)  # past the filesystem's timestamp granularity
        action()
        after = os.stat(p(name))
        return [after.st_mtime_ns != before.st_mtime_ns, after.st_ctime_ns != before.st_ctime_ns]
    def bind(name):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(p(name))
        return st(name)
    def on_fd(name, flags, action):
        fd = os.open(p(name), flags)
        try:
            return action(fd)
        finally:
            os.close(fd)

    def fsync(name):
        fd = os.open(p(name), os.O_RDWR)
        try:
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    steps = [
        ("mkdir", "os.mkdir(p('d'), 0o755) or st('d')"),
        ("mkdir of an existing name", "os.mkdir(p('d'))"),
        ("mkdir under the process umask", "os.mkdir(p('m'), 0o777) or st('m')"),
        ("create O_EXCL", "close(os.open(p('d/f'), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)) or st('d/f')"),
        ("create O_EXCL of an existing name", "os.open(p('d/f'), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)"),
        ("O_CREAT of an existing name keeps it", "close(os.open(p('d/f'), os.O_CREAT | os.O_WRONLY, 0o600)) or st('d/f')"),
        ("a directory's link count", "os.mkdir(p('d/sub')) or st('d')"),
        ("rmdir of a non-empty directory", "os.rmdir(p('d'))"),
        ("rmdir of a missing name", "os.rmdir(p('nothing'))"),
        ("rmdir of a file", "os.rmdir(p('d/f'))"),
        ("rmdir of '.'", "os.rmdir(p('d/.'))"),
        ("unlink of a directory", "os.unlink(p('d'))"),
        ("a path through a file", "os.open(p('d/f/x'), os.O_RDONLY)"),
        ("O_DIRECTORY of a file", "os.open(p('d/f'), os.O_RDONLY | os.O_DIRECTORY)"),
        ("a directory opened for writing", "os.open(p('d'), os.O_WRONLY)"),
        ("stat of a 256-byte name", "os.stat(p('x' * 256))"),
        ("create of a 256-byte name", "os.open(p('x' * 256), os.O_CREAT | os.O_WRONLY)"),
        ("a 255-byte name", "close(os.open(p('y' * 255), os.O_CREAT | os.O_WRONLY)) or os.unlink(p('y' * 255))"),
        ("pwrite at offsets, with a hole", "[pw('d/f', [(b'hello', 0), (b'XY', 10)]), st('d/f'), rd('d/f')]"),
        ("pread past the end", "pr('d/f', 100, 4)"),
        ("pread at the end", "pr('d/f', 10, 12)"),
        ("O_APPEND", "[pw('d/f', [(b'++', None)], os.O_WRONLY | os.O_APPEND), rd('d/f')]"),
        ("truncate to grow", "os.truncate(p('d/f'), 20) or [st('d/f'), rd('d/f')]"),
        ("truncate to shrink", "os.truncate(p('d/f'), 3) or rd('d/f')"),
        ("truncate of a directory", "os.truncate(p('d'), 0)"),
        ("O_TRUNC", "close(os.open(p('d/f'), os.O_WRONLY | os.O_TRUNC)) or st('d/f')"),
        ("ftruncate of a read-only fd", "on_fd('d/f', os.O_RDONLY, lambda fd: os.ftruncate(fd, 0))"),
        ("write to a read-only fd", "on_fd('d/f', os.O_RDONLY, lambda fd: os.write(fd, b'x'))"),
        ("fsync and fdatasync", "fsync('d/f')"),
        ("symlink", "os.symlink('f', p('d/s')) or [os.readlink(p('d/s')), lst('d/s'), st('d/s')]"),
        ("symlink over an existing name", "os.symlink('g', p('d/s'))"),
        ("O_NOFOLLOW of a symlink", "os.open(p('d/s'), os.O_RDONLY | os.O_NOFOLLOW)"),
        ("a symlink loop", "os.symlink('loop', p('loop')) or os.stat(p('loop'))"),
        ("a dangling symlink", "os.symlink('nowhere', p('dangling')) or [lst('dangling'), os.path.exists(p('dangling'))]"),
        ("create through a dangling symlink", "close(os.open(p('dangling'), os.O_CREAT | os.O_WRONLY, 0o600)) or st('nowhere')"),
        ("readlink of a file", "os.readlink(p('d/f'))"),
        ("hard link", "os.link(p('d/f'), p('d/h')) or [st('d/f'), st('d/h'), same('d/f', 'd/h')]"),
        ("hard link over an existing name", "os.link(p('d/f'), p('d/h'))"),
        ("hard link of a directory", "os.link(p('d'), p('d2'))"),
        ("hard link of a missing name", "os.link(p('nothing'), p('d2'))"),
        ("rename onto a link of the same file", "os.rename(p('d/f'), p('d/h')) or [ls('d'), st('d/f')]"),
        ("rename", "os.rename(p('d/h'), p('d/g')) or [ls('d'), st('d/g'), st('d/f')]"),
        ("rename over an existing file", "os.rename(p('d/f'), p('d/g')) or [ls('d'), st('d/g')]"),
        ("rename into its own subdirectory", "os.rename(p('d'), p('d/sub/x'))"),
        ("rename of a directory over a non-empty one",
         "os.mkdir(p('e')) or close(os.open(p('e/x'), os.O_CREAT | os.O_WRONLY)) or os.rename(p('d/sub'), p('e'))"),
        ("rename of a directory over an empty one", "os.mkdir(p('empty')) or os.rename(p('d/sub'), p('empty')) or ls('.')"),
        ("rename of a file over a directory", "os.rename(p('d/g'), p('e'))"),
        ("rename of a directory over a file", "os.rename(p('empty'), p('d/g'))"),
        ("rename of a missing name", "os.rename(p('nothing'), p('x'))"),
        ("rename of a directory, link counts", "os.rename(p('empty'), p('d/moved')) or [st('.'), st('d')]"),
        ("chmod with setuid", "os.chmod(p('d/g'), 0o4751) or st('d/g')"),
        ("chown clears setuid", "os.chown(p('d/g'), 1000, 1000) or st('d/g')"),
        ("chown of the group only", "os.chown(p('d/g'), -1, 2000) or st('d/g')"),
        ("lchown of a symlink", "os.lchown(p('d/s'), 3000, 3000) or lst('d/s')"),
        ("chmod of a missing name", "os.chmod(p('nothing'), 0o644)"),
        ("utimensat", "os.utime(p('d/g'), ns=(1_000_000_123, 2_000_000_456)) or times('d/g')"),
        ("utimensat of a symlink itself", "os.utime(p('d/s'), ns=(5, 6), follow_symlinks=False) or times('d/s', False)"),
        ("write changes mtime and ctime", "changes('d/g', lambda: pw('d/g', [(b'z', 0)]))"),
        ("chmod changes ctime only", "changes('d/g', lambda: os.chmod(p('d/g'), 0o600))"),
        ("create changes the directory's times", "changes('d', lambda: close(os.open(p('d/new'), os.O_CREAT | os.O_WRONLY)))"),
        ("mkfifo", "os.mkfifo(p('fifo'), 0o600) or st('fifo')"),
        ("a UNIX socket bound in the tree", "bind('sock')"),
        ("xattr set and get", "os.setxattr(p('d/g'), 'user.k', b'v1') or os.getxattr(p('d/g'), 'user.k')"),
        ("xattr create of an existing name", "os.setxattr(p('d/g'), 'user.k', b'v2', os.XATTR_CREATE)"),
        ("xattr replace of a missing name", "os.setxattr(p('d/g'), 'user.n', b'v', os.XATTR_REPLACE)"),
        ("xattr list", "sorted(a for a in os.listxattr(p('d/g')) if a.startswith('user.'))"),
        ("xattr remove, then get", "os.removexattr(p('d/g'), 'user.k') or os.getxattr(p('d/g'), 'user.k')"),
        ("statvfs", "[os.statvfs(p('.')).f_bsize, os.statvfs(p('.')).f_namemax]"),
        ("unlink", "os.unlink(p('d/g')) or ls('d')"),
        ("unlink of a missing name", "os.unlink(p('d/g'))"),
        ("unlink of a symlink leaves its target", "os.unlink(p('dangling')) or st('nowhere')"),
        ("rmdir", "os.rmdir(p('d/moved')) or ls('d')"),
        ("the whole tree", "sorted((r[len(base):], sorted(ds), sorted(fs)) for r, ds, fs in os.walk(base))"),
    ]
    names = {**globals(), **locals()}  # the helpers, also for the lambdas in the steps
    results = []
    for name, code in steps:
        try:
            results.append([name, eval(code, names)])
        except OSError as exc:
            results.append([name, errno.errorcode[exc.errno]])
    return results
"""


@pytest.mark.parametrize("cache", [[], ["--no-cache"]], ids=["coherent-cache", "no-cache"])
def test_posix_steps_match_the_hosts_filesystem(lab: Lab, work: Path, agent: Agent, cache: list[str]) -> None:
    # DPU root stays root on the host here, so owners compare equal (root squash is
    # tests/security's); setuid bits are never set for the DPU, whatever the options.
    running = Server(lab, work, [str(work / "export")], "--no-root-squash")
    try:
        mount(agent, lab, f"{running.address}:{work / 'export'}", work / "mnt", *cache)
        (work / "local").mkdir()
        local = str(work / "local")
        # Every qtfs mount is nosymfollow (no symlink the host serves is
        # followed on the DPU), so the reference is too (in the agent's own
        # mount namespace: gone with it).
        for argv in (["mount", "--bind", local, local], ["mount", "-o", "remount,bind,nosymfollow", local]):
            agent(f"subprocess.run({argv!r}, check=True).returncode")
        agent.run(POSIX_STEPS)
        # The same filesystem as the export's, reached directly: what qtfs must reproduce.
        reference = agent(f"posix_steps({local!r})")
        through_qtfs = agent(f"posix_steps({str(work / 'mnt')!r})")
    finally:
        running.stop()
    assert isinstance(reference, list) and isinstance(through_qtfs, list)
    assert len(reference) == len(through_qtfs) > 70
    errnos = {result for _, result in reference if isinstance(result, str) and result.startswith("E")}
    assert {"EEXIST", "ENOTEMPTY", "ENOTDIR", "EISDIR", "ELOOP", "ENAMETOOLONG", "EINVAL", "EPERM"} <= errnos
    differences = [
        (name, local, remote)
        for (name, local), (_, remote) in zip(reference, through_qtfs, strict=True)
        if local != remote
    ]
    # The one difference by design: the host keeps no setuid bit a peer asked for.
    setuid = [d for d in differences if d[0] == "chmod with setuid"]
    assert [(local[1], remote[1]) for _, local, remote in setuid] == [("0o4751", "0o751")]
    differences.remove(setuid[0])
    assert differences == [], "\n".join(
        f"{name}: local {local!r}, qtfs {remote!r}" for name, local, remote in differences
    )
