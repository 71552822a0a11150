"""The Debian package: built from this checkout, installed with apt into a fresh Debian 12, purged without a trace.

The fresh system is `debootstrap --variant=minbase bookworm`, made once from
the mirror apt uses here and kept as a tarball under /var/cache/offload-lab/;
each run unpacks it into a temporary directory and runs apt there under
`systemd-nspawn` (no boot: one command per container, in its own mount and
pid namespaces, so no mount of it outlives the command).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc
from offload.lab import debian

ROOT = Path(__file__).parent.parent

#: The package's programs, where debian/rules puts them (proc.PROGRAMS names them all).
PROGRAMS = {
    "rexec": "/usr/bin/rexec",
    "offload": "/usr/bin/offload",
    "qtfs": "/usr/bin/qtfs",
    "rexec_server": "/usr/sbin/rexec_server",
    "udsproxyd": "/usr/sbin/udsproxyd",
}
UNITS = sorted(unit.name for unit in (ROOT / "systemd").glob("*.service"))
CONFFILES = {
    "/etc/offload/rexec.toml",
    "/etc/offload/prepare.toml",
    "/etc/offload/udsproxyd.env",
    "/etc/offload/qtfs.env",
    "/etc/rexec/whitelist",
}
#: What the package takes from Debian (debian/control); none of it is in minbase.
FROM_DEBIAN = (
    "python3",
    "python3-cryptography",
    "python3-psutil",
    "python3-systemd",
    "python3-outcome",
    "python3-sortedcontainers",
    "python3-idna",
    "libfuse3-3",
    "fuse3",
)
#: Recommends: (the lab's netlink library); apt installs it by default.
RECOMMENDED = ("python3-pyroute2",)
#: apt's and dpkg's own state and logs change with every install; the rest of the system must not.
STATE = ("var/lib/apt", "var/cache", "var/log", "var/lib/dpkg")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, systemd-nspawn)"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("debootstrap", "systemd-nspawn", "dpkg-buildpackage")),
        reason="needs debootstrap, systemd-nspawn and dpkg-dev (make setup installs them)",
    ),
]


def base_tarball() -> Path:
    """The cached minbase bookworm (offload.lab.debian); skips if it must be made and no mirror answers."""
    try:
        return debian.minbase()
    except debian.MirrorUnreachable as exc:
        pytest.skip(f"debootstrap cannot reach the Debian mirror: {exc}")


class Container:
    """A throw-away root unpacked from the base; each call runs one command in it under systemd-nspawn."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *argv: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        command = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--resolv-conf=replace-host",
            "--setenv=DEBIAN_FRONTEND=noninteractive",
            "--chdir=/srv",
            "-D",
            str(self.root),
            "--",
            *argv,
        ]
        child = proc.spawn(command, stdin=proc.DEVNULL, stdout=proc.PIPE, stderr=proc.PIPE, text=True)
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # nspawn ends its container on SIGTERM; SIGKILL if it does not.
            child.send_signal(signal.SIGTERM)
            try:
                child.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            raise AssertionError(f"timed out after {timeout} s: {proc.describe(argv)}") from None
        result = subprocess.CompletedProcess(argv, child.returncode, out, err)
        if check:
            assert result.returncode == 0, f"{proc.describe(argv)} failed ({result.returncode}):\n{out}\n{err}"
        return result

    def files(self) -> set[str]:
        """Every path in the root, but apt's and dpkg's state, caches and logs."""
        found = set()
        for directory, dirs, names in os.walk(self.root):
            relative = os.path.relpath(directory, self.root)
            if relative.startswith(STATE):
                dirs.clear()
                continue
            found.update(os.path.normpath(os.path.join("/", relative, name)) for name in dirs + names)
        return found

    def packages(self) -> set[str]:
        """The packages installed (or half-removed: anything dpkg still knows of)."""
        listing = self("dpkg-query", "-W", "-f=${binary:Package} ${db:Status-Abbrev}\n").stdout
        return {line.split()[0] for line in listing.splitlines() if line.split()[1:] and line.split()[1] != "un"}

    def installed(self, package: str) -> bool:
        status = self("dpkg-query", "-W", "-f=${Status}", package, check=False).stdout
        return status == "install ok installed"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("deb")
    try:
        built = proc.run(["bash", str(ROOT / "scripts" / "build-deb"), str(out)], timeout=360)
        yield Path(built.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    base = base_tarball()
    root = tmp_path / "root"
    root.mkdir()
    # systemd-nspawn's own directory, where it keeps its locks; removed again if
    # this made it and nothing else uses it by then.
    nspawn_state = Path("/run/systemd/nspawn")
    made = [p for p in (nspawn_state.parent, nspawn_state) if not p.exists()]
    try:
        proc.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(base)])
        yield Container(root)
    finally:
        debian.remove_tree(root)
        if nspawn_state in made:
            for directory in (nspawn_state / "locks", nspawn_state / "propagate", *reversed(made)):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def test_installs_with_its_dependencies_and_purges_without_a_trace(deb: Path, container: Container) -> None:
    started = time.monotonic()
    run = container
    # nspawn puts a tmpfs on the container's /tmp.
    shutil.copy(deb, container.root / "srv" / deb.name)
    run("apt-get", "update", "-q")
    assert not any(container.installed(package) for package in FROM_DEBIAN)
    before = container.files()
    packages_before = container.packages()

    run("apt-get", "install", "-y", "-q", f"./{deb.name}", timeout=300)
    missing = [package for package in (*FROM_DEBIAN, *RECOMMENDED) if not container.installed(package)]
    assert missing == [], f"not pulled in: {missing}"

    # The programs, where the units expect them, start on Debian's python3.
    assert set(PROGRAMS) == set(proc.PROGRAMS)
    for name, path in PROGRAMS.items():
        result = run(path, "--help")
        assert "usage" in result.stdout.lower(), (name, result.stdout)
    # The private environment: vendored trio and the patched pyfuse3 ahead of
    # Debian's dist-packages, everything else from Debian.
    where = run(
        "/usr/lib/offload/bin/python3",
        "-c",
        "import cryptography, psutil, pyfuse3, trio, offload.proc as p;"
        "assert hasattr(pyfuse3.FileInfo, 'cache_readdir');"
        "print(pyfuse3.__file__, trio.__file__, cryptography.__file__, psutil.__file__, p.exec_helper())",
    ).stdout.split()
    assert [w.split("/site-packages/")[0] for w in where[:2]] == ["/usr/lib/offload/lib/python3.11"] * 2, where
    assert all(w.startswith("/usr/lib/python3/dist-packages/") for w in where[2:4]), where
    assert os.path.realpath(container.root / where[4].lstrip("/")) == str(container.root / "usr/lib/offload/rexec-exec")
    # Debian's cryptography makes the PKI, and rexec_server starts with it
    # and the shipped configuration: no settings, an empty whitelist.
    run("offload", "pki", "init", "--dir", "/root/pki", "--node", "host", "--node", "dpu")
    run("cp", "-r", "/root/pki/host", "/etc/offload/pki")
    server = run("timeout", "4", "rexec_server", "--listen", "unix:///run/rexec-peer.sock", check=False)
    said = server.stdout + server.stderr
    assert server.returncode == 124 and "ready" in said and "0 whitelisted programs" in said, said
    run("rm", "-r", "/root/pki", "/etc/offload/pki")

    for unit in UNITS:
        text = (container.root / "lib/systemd/system" / unit).read_text()
        if "RootDirectory=" in text:
            continue  # its programs are the chroot's
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "ExecStop=")):
                program = line.split("=", 1)[1].split()[0]
                assert os.access(container.root / program.lstrip("/"), os.X_OK), (unit, program)
    for helper in ("libudsproxy.so", "rexec-exec"):
        assert (container.root / "usr/lib/offload" / helper).read_bytes()[:4] == b"\x7fELF"
    assert (container.root / "usr/share/doc/offload/examples/prepare.toml.example").is_file()
    conffiles = {
        line.split()[0] for line in run("dpkg-query", "-W", "-f=${Conffiles}", "offload").stdout.splitlines() if line
    }
    assert conffiles == CONFFILES
    # The shipped whitelist is one rexec_server accepts: empty, root's, not writable by others.
    whitelist = (container.root / "etc/rexec/whitelist").stat()
    assert whitelist.st_size == 0 and whitelist.st_uid == 0 and not whitelist.st_mode & 0o022

    run("apt-get", "remove", "--purge", "-y", "-q", "offload")
    # What the install pulled in goes too, recommended packages included:
    # minbase's apt recommends ca-certificates, which the install brought.
    run("apt-get", "autoremove", "--purge", "-y", "-q", "-o", "APT::AutoRemove::RecommendsImportant=false")
    left = sorted(container.packages() - packages_before)
    assert left == [], f"packages left: {left}"
    after = container.files()
    assert sorted(after - before) == []
    print(f"install, checks and purge: {time.monotonic() - started:.0f} s")
