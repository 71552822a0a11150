"""The LD_PRELOAD shim (native/qtfs_shim.c): its helpers in-process, the library in real programs.

udsproxyd itself is not part of these tests: a small stand-in here answers
the shim's request the way udsproxyd does (a connected socket by
SCM_RIGHTS, or an errno), so what is tested is the shim in real programs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc
from offload.protocol.framing import FrameDecoder, encode_frame

NATIVE = Path(__file__).resolve().parent.parent / "offload" / "_native"
LIBRARY = NATIVE / "libudsproxy.so"

try:
    from offload._native._shim import ffi, lib
except ImportError:  # pragma: no cover - make setup builds it
    ffi = lib = None

pytestmark = pytest.mark.skipif(lib is None or not LIBRARY.exists(), reason="the shim is not built (run make setup)")


@pytest.mark.parametrize(
    ("path", "prefixes", "allowed"),
    [
        ("/var/lib/libvirt/qemu/mon.sock", "/var/lib/libvirt", True),
        ("/var/lib/libvirt", "/var/lib/libvirt", True),
        ("/var/lib/libvirtd/x.sock", "/var/lib/libvirt", False),
        ("/var/lib/libvirt/qemu/x.sock", "/var/lib/libvirt/", True),  # the reference ignores this entry
        ("/run/a.sock", "/var/lib/libvirt:/run", True),
        ("/var/lib/libvirt/../../etc/x.sock", "/var/lib/libvirt", False),
        ("/var/lib/libvirt/..", "", False),
        ("/var/lib/libvirt/a..b.sock", "/var/lib/libvirt", True),
        ("relative.sock", "", False),
        ("/any/path.sock", "", True),
    ],
)
def test_path_allowed(path: str, prefixes: str, allowed: bool) -> None:
    assert bool(lib.shim_path_allowed(path.encode(), prefixes.encode())) is allowed


def test_request_is_a_project_frame() -> None:
    buffer = ffi.new("unsigned char[256]")
    length = lib.shim_encode_request(buffer, 256, socket.SOCK_STREAM, b"/run/x.sock")
    expected = encode_frame(0x50, 0, struct.pack("!H", socket.SOCK_STREAM) + b"/run/x.sock")
    assert ffi.buffer(buffer, length)[:] == expected
    assert lib.shim_encode_request(buffer, 256, 1, b"/" + b"x" * 200) == -1  # longer than sun_path
    assert lib.shim_encode_request(buffer, 10, 1, b"/run/x.sock") == -1  # does not fit


def test_reply_decoding() -> None:
    ok = encode_frame(0x51, 0, struct.pack("!I", 0))
    refused = encode_frame(0x51, 0, struct.pack("!I", errno.ECONNREFUSED))
    assert lib.shim_decode_reply(ok, len(ok)) == 0
    assert lib.shim_decode_reply(refused, len(refused)) == errno.ECONNREFUSED
    for bad in (ok[:-1], b"XX" + ok[2:], encode_frame(0x52, 0, bytes(4)), encode_frame(0x51, 0, bytes(5))):
        assert lib.shim_decode_reply(bad, len(bad)) == -1


class FakeProxy:
    """Answers shim requests as udsproxyd would; records what it was asked."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "udsproxy.sock")
        self.requests: list[tuple[int, str]] = []
        self.answer: int | str = 0  # 0: connect to self.target; an errno; or "silent" / "garbage"
        self.target = ""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                decoder = FrameDecoder()
                frame = None
                while frame is None or not hasattr(frame, "payload"):
                    data = conn.recv(4096)
                    if not data:
                        break
                    decoder.receive_data(data)
                    frame = decoder.next_frame()
                if frame is None or not hasattr(frame, "payload"):
                    continue
                (kind,) = struct.unpack("!H", frame.payload[:2])
                self.requests.append((kind, frame.payload[2:].decode()))
                if self.answer == "silent":
                    conn.recv(1)  # until the shim gives up
                elif self.answer == "garbage":
                    conn.sendall(b"nonsense-reply!!")
                elif self.answer:
                    conn.sendall(encode_frame(0x51, 0, struct.pack("!I", int(self.answer))))
                else:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as remote:
                        remote.connect(self.target)
                        reply = encode_frame(0x51, 0, struct.pack("!I", 0))
                        socket.send_fds(conn, [reply], [remote.fileno()])

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[FakeProxy]:
    echo_path = str(tmp_path / "echo.sock")
    echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    echo.bind(echo_path)
    echo.listen(8)

    def serve_echo() -> None:
        while True:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(b"echo:" + data)

    threading.Thread(target=serve_echo, daemon=True).start()
    fake = FakeProxy(tmp_path)
    fake.target = echo_path
    yield fake
    fake.close()
    echo.close()


def preload_env(proxy: FakeProxy | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UDSPROXY_")}
    env.update(LD_PRELOAD=str(LIBRARY), LD_BIND_NOW="1", **extra)
    if proxy is not None:
        env["UDSPROXY_SOCKET"] = proxy.path
    return env


CLIENT = textwrap.dedent(
    """
    import fcntl, os, socket, sys
    kind = socket.SOCK_DGRAM if sys.argv[2] == "dgram" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_UNIX, kind)
    if sys.argv[2] == "nonblocking":
        s.setblocking(False)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print("error", e.errno)
        sys.exit(0)
    flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
    print("nonblocking", bool(flags & os.O_NONBLOCK), "cloexec", not s.get_inheritable())
    s.setblocking(True)
    s.sendall(b"ping")
    print(s.recv(100).decode())
    """
)


def run_client(env: dict[str, str], path: str, mode: str = "blocking") -> list[str]:
    result = proc.run([sys.executable, "-c", CLIENT, path, mode], env=env, timeout=30)
    return result.stdout.split("\n")


def test_loads_under_bind_now_and_is_inert_without_configuration(tmp_path: Path) -> None:
    out = run_client(preload_env(None), str(tmp_path / "missing.sock"))
    assert out[0] == f"error {errno.ENOENT}"


def test_missing_socket_is_carried(proxy: FakeProxy, tmp_path: Path) -> None:
    remote_only = str(tmp_path / "elsewhere" / "monitor.sock")
    out = run_client(preload_env(proxy), remote_only)
    assert out[:2] == ["nonblocking False cloexec True", "echo:ping"]
    assert proxy.requests == [(socket.SOCK_STREAM, remote_only)]


def test_nonblocking_connect_keeps_its_flags(proxy: FakeProxy, tmp_path: Path) -> None:
    out = run_client(preload_env(proxy), str(tmp_path / "nb.sock"), "nonblocking")
    assert out[:2] == ["nonblocking True cloexec True", "echo:ping"]


def test_send_header_and_answers() -> None:
    buffer = ffi.new("unsigned char[12]")
    lib.shim_encode_send_header(buffer, 70000)
    assert ffi.buffer(buffer, 12)[:] == encode_frame(0x52, 0, bytes(70000))[:12]
    sent = encode_frame(0x53, 0, struct.pack("!I", errno.EOPNOTSUPP))
    assert lib.shim_decode_answer(sent, len(sent), 0x53) == errno.EOPNOTSUPP
    assert lib.shim_decode_answer(sent, len(sent), 0x51) == -1  # an answer to something else


def test_config_file_parsing() -> None:
    socket_out = ffi.new("char[108]")
    prefixes_out = ffi.new("char[64]")
    text = b"# udsproxy shim\n  socket = /var/run/udsproxy/udsproxy.sock \r\nprefixes=/var/lib/libvirt:/run/libvirt\nother = x\n"
    assert lib.shim_parse_config(text, socket_out, 108, prefixes_out, 64) == 0
    assert ffi.string(socket_out) == b"/var/run/udsproxy/udsproxy.sock"
    assert ffi.string(prefixes_out) == b"/var/lib/libvirt:/run/libvirt"
    socket_out[0] = b"\0"
    lib.shim_parse_config(b"socket=/" + b"x" * 200, socket_out, 108, prefixes_out, 64)  # does not fit: ignored
    assert ffi.string(socket_out) == b""


def test_config_file_instead_of_the_environment(proxy: FakeProxy, tmp_path: Path) -> None:
    config = tmp_path / "shim.conf"
    config.write_text(f"socket = {proxy.path}\nprefixes = {tmp_path}/carried\n")
    env = preload_env(None, UDSPROXY_CONFIG=str(config))
    assert run_client(env, str(tmp_path / "carried" / "x.sock"))[:2] == ["nonblocking False cloexec True", "echo:ping"]
    assert run_client(env, str(tmp_path / "elsewhere.sock"))[0] == f"error {errno.ENOENT}"  # not under prefixes
    assert [path for _, path in proxy.requests] == [str(tmp_path / "carried" / "x.sock")]


def test_not_carried_keeps_the_callers_own_error(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.answer = 0xFFFF  # udsproxyd's "not under my --allow prefixes"
    assert run_client(preload_env(proxy), str(tmp_path / "x.sock"))[0] == f"error {errno.ENOENT}"
    assert len(proxy.requests) == 1


def test_answer_status_is_not_an_errno() -> None:
    """udsproxyd's "not carried" (0xFFFF) is a status of its own, never handed out as errno."""
    assert lib.shim_answer_status(0) == lib.SHIM_CARRIED
    assert lib.shim_answer_status(0xFFFF) == lib.SHIM_NOT_CARRIED
    for code in (errno.ENOENT, errno.ECONNREFUSED, errno.EOPNOTSUPP):
        assert lib.shim_answer_status(code) == lib.SHIM_FAILED


def test_log_lines_carry_program_and_pid(proxy: FakeProxy, tmp_path: Path) -> None:
    program = textwrap.dedent(
        """
        import os, socket, sys
        print(os.getpid(), flush=True)
        for path in sys.argv[1:]:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except OSError:
                    pass
        """
    )
    name = Path(sys.executable).name  # what the program is called, as its argv[0] says
    for answer, path, line in [
        (0, str(tmp_path / "carried.sock"), "connected through udsproxyd"),
        (errno.EACCES, str(tmp_path / "refused.sock"), os.strerror(errno.EACCES)),
    ]:
        proxy.answer = answer
        env = preload_env(proxy, UDSPROXY_LOG="1")
        result = proc.run([sys.executable, "-c", program, path], env=env, timeout=30)
        pid = int(result.stdout.split()[0])
        assert result.stderr.splitlines() == [f"{name}[{pid}]: udsproxy: {path}: {line}"]


def test_local_fd_passing_is_untouched(proxy: FakeProxy) -> None:
    """sendmsg with SCM_RIGHTS on a socket the shim did not carry goes straight to libc."""
    program = textwrap.dedent(
        """
        import os, socket
        a, b = socket.socketpair()
        r, w = os.pipe()
        socket.send_fds(a, [b"x"], [w])
        _, fds, _, _ = socket.recv_fds(b, 10, 1)
        os.write(fds[0], b"local")
        print(os.read(r, 10).decode())
        """
    )
    result = proc.run([sys.executable, "-c", program], env=preload_env(proxy), timeout=30)
    assert result.stdout.strip() == "local"
    assert proxy.requests == []


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.ENOENT, errno.EACCES])
def test_remote_errno_reaches_the_caller(proxy: FakeProxy, tmp_path: Path, code: int) -> None:
    proxy.answer = code
    assert run_client(preload_env(proxy), str(tmp_path / "x.sock"))[0] == f"error {code}"


def test_unresponsive_proxy_times_out(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.answer = "silent"
    out = run_client(preload_env(proxy, UDSPROXY_TIMEOUT_MS="300"), str(tmp_path / "x.sock"))
    assert out[0] == f"error {errno.ETIMEDOUT}"


def test_malformed_reply_is_an_error_not_a_crash(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.answer = "garbage"
    assert run_client(preload_env(proxy), str(tmp_path / "x.sock"))[0] == f"error {errno.EPROTO}"


def test_prefixes_limit_what_is_carried(proxy: FakeProxy, tmp_path: Path) -> None:
    out = run_client(preload_env(proxy, UDSPROXY_PREFIXES="/var/lib/libvirt"), str(tmp_path / "x.sock"))
    assert out[0] == f"error {errno.ENOENT}"
    assert proxy.requests == []


def test_local_sockets_are_never_touched(proxy: FakeProxy) -> None:
    out = run_client(preload_env(proxy), proxy.target)  # exists locally
    assert out[:2] == ["nonblocking False cloexec True", "echo:ping"]
    assert proxy.requests == []


def test_datagram_sockets_refused_clearly(proxy: FakeProxy, tmp_path: Path) -> None:
    assert run_client(preload_env(proxy), str(tmp_path / "x.sock"), "dgram")[0] == f"error {errno.EPROTOTYPE}"


def test_socat_under_the_shim(proxy: FakeProxy, tmp_path: Path) -> None:
    path = str(tmp_path / "remote" / "qmp.sock")
    result = proc.run(
        ["socat", "-t", "2", "-", f"UNIX-CONNECT:{path}"], env=preload_env(proxy), input="hello", timeout=30
    )
    assert result.stdout == "echo:hello"


HOST_CGROUP = (
    "12:pids:/user.slice\n"
    "5:cpu,cpuacct:/lab/offload-lab-x-machine/qemu-1-vm.libvirt-qemu/emulator\n"
    "4:memory:/lab/offload-lab-x-machine/qemu-1-vm.libvirt-qemu\n"
    "3:cpuset:/lab/offload-lab-x-machine-other/qemu-1-vm.libvirt-qemu\n"
    "1:name=systemd:/lab\n"
    "0::/lab\n"
    "garbage\n"
)
PARTITIONS = "cpu=/lab/offload-lab-x-machine=/machine;memory=/lab/offload-lab-x-machine/=/machine;cpuset=/lab/offload-lab-x-machine=/machine"


def rewrite_cgroup(text: str, partitions: str, cap: int = 4096) -> str | int:
    out = ffi.new("char[]", cap)
    length = lib.shim_rewrite_cgroup(text.encode(), partitions.encode(), out, cap)
    return length if length < 0 else ffi.string(out).decode()


def test_cgroup_paths_below_a_partition_become_the_local_ones_and_others_are_hidden() -> None:
    assert rewrite_cgroup(HOST_CGROUP, PARTITIONS) == (
        "12:pids:/\n"
        "5:cpu,cpuacct:/machine/qemu-1-vm.libvirt-qemu/emulator\n"
        "4:memory:/machine/qemu-1-vm.libvirt-qemu\n"
        "3:cpuset:/\n"  # a sibling whose name starts alike is no part of the partition
        "1:name=systemd:/\n"
        "0::/\n"
    )
    assert (
        rewrite_cgroup(HOST_CGROUP, "")
        == "12:pids:/\n5:cpu,cpuacct:/\n4:memory:/\n3:cpuset:/\n1:name=systemd:/\n0::/\n"
    )
    assert rewrite_cgroup(HOST_CGROUP, "cpu=relative=/machine;=/lab=/machine;memory=/lab") == (
        "12:pids:/\n5:cpu,cpuacct:/\n4:memory:/\n3:cpuset:/\n1:name=systemd:/\n0::/\n"
    )
    assert rewrite_cgroup(HOST_CGROUP, PARTITIONS, cap=40) == -1


def test_only_proc_pid_cgroup_names_a_cgroup_file() -> None:
    assert lib.shim_proc_cgroup_pid(b"/proc/123/cgroup") == 123
    for path in (
        b"/proc/self/cgroup",
        b"/proc/0/cgroup",
        b"/proc/123/cgroupx",
        b"/proc/123/task/4/cgroup",
        b"/sys/123/cgroup",
    ):
        assert lib.shim_proc_cgroup_pid(path) == -1


def test_a_standins_cgroup_file_is_its_host_programs(tmp_path: Path) -> None:
    host_proc, pidmap = tmp_path / "host-proc", tmp_path / "pids"
    (host_proc / "4321").mkdir(parents=True)
    (host_proc / "4321" / "cgroup").write_text(HOST_CGROUP)
    pidmap.mkdir()
    standin = os.getpid()  # any live pid of this machine stands in
    (pidmap / str(standin)).write_text("4321")
    env = {
        "PATH": os.environ["PATH"],
        "LD_PRELOAD": str(LIBRARY),
        "OFFLOAD_HOST_PROC": str(host_proc),
        "OFFLOAD_PIDMAP": str(pidmap),
        "OFFLOAD_CGROUP_PARTITIONS": PARTITIONS,
    }
    shown = proc.run(["cat", f"/proc/{standin}/cgroup"], env=env).stdout
    fopened = proc.run(
        [
            "python3",
            "-c",
            f'import ctypes; c = ctypes.CDLL(None); c.fopen.restype = ctypes.c_void_p; f = c.fopen(b"/proc/{standin}/cgroup", b"r"); b = ctypes.create_string_buffer(4096); c.fread(b, 1, 4095, ctypes.c_void_p(f)); print(b.value.decode(), end="")',
        ],
        env=env,
    ).stdout
    assert fopened == shown
    assert "5:cpu,cpuacct:/machine/qemu-1-vm.libvirt-qemu/emulator\n" in shown and "offload-lab" not in shown
    # Without the partitions, or for a pid that is no stand-in, the file is this machine's.
    own = Path(f"/proc/{standin}/cgroup").read_text()
    assert proc.run(["cat", f"/proc/{standin}/cgroup"], env={**env, "OFFLOAD_CGROUP_PARTITIONS": ""}).stdout == own
    assert proc.run(["cat", "/proc/1/cgroup"], env=env).stdout == Path("/proc/1/cgroup").read_text()
    # A stand-in whose host file cannot be read fails; its own cgroups are never given instead.
    (host_proc / "4321" / "cgroup").unlink()
    assert proc.run(["cat", f"/proc/{standin}/cgroup"], env=env, check=False).returncode != 0


def test_affinity_of_an_unexeced_fork_is_left_and_a_host_task_is_never_this_machines(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned task from an unpinned one")
    host_proc = tmp_path / "host-proc"
    fork = proc.spawn([sys.executable, "-c", "import time; time.sleep(60)"])  # the caller's own executable
    other = proc.spawn(["sleep", "60"])
    try:
        for pid in (fork.pid, other.pid):  # the host serves a task of each number, on every CPU
            (host_proc / str(pid)).mkdir(parents=True)
            (host_proc / str(pid) / "status").write_text(f"Name:\tqemu\nCpus_allowed:\t{(1 << len(cpus)) - 1:x}\n")
        env = {"PATH": os.environ["PATH"], "LD_PRELOAD": str(LIBRARY), "OFFLOAD_HOST_PROC": str(host_proc)}

        def pin(pid: int, cpu: int) -> int:
            code = f"import os\ntry:\n    os.sched_setaffinity({pid}, {{{cpu}}})\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)"
            return int(proc.run([sys.executable, "-c", code], env=env).stdout)

        # libvirt pinning qemu's process before exec: the call succeeds, and neither this machine's
        # process nor the host's task of that number changes (the host task's mask would refuse it).
        assert pin(fork.pid, cpus[0]) == 0
        assert os.sched_getaffinity(fork.pid) == set(cpus)
        # Another program's number that the host serves is the host's: checked there (its mask is
        # all CPUs, so one CPU is refused), and this machine's process of that number is untouched.
        assert pin(other.pid, cpus[0]) == errno.EPERM
        assert os.sched_getaffinity(other.pid) == set(cpus)
        # A number the host does not serve is this machine's own.
        (host_proc / str(other.pid) / "status").unlink()
        assert pin(other.pid, cpus[0]) == 0
        assert os.sched_getaffinity(other.pid) == {cpus[0]}
    finally:
        proc.end_pid(fork.pid)
        proc.end_pid(other.pid)
