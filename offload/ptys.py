"""Ptys for a remote program's consoles: the system calls, on either machine.

qemu's ``-chardev pty`` holds a pty master on the host; libvirt on the DPU
opens the pty's other end by path (``virsh console``).  So the DPU's side
of a session owns a pty of its own for each such host pty
(`allocate_in_root`, in the devpts instance the stand-in's root sees,
which is libvirt's), and the host's side opens the other end of a pty only
if the session's program holds its master (`program_pty_peer`); the two
are relayed on a channel of the session.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import stat
import struct
import termios

from offload.qtfs.resolve import openat2

# <asm-generic/ioctls.h>: not in the termios module.
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
#: The major and minor numbers of /dev/ptmx and of each devpts instance's ptmx.
PTMX_DEVICE = os.makedev(5, 2)
SYS_PIDFD_GETFD = 438  # asm-generic, the same everywhere

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pty_index(master: int) -> int:
    """The number of the pty whose master is ``master`` (/dev/pts/N)."""
    (index,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))
    return int(index)


def make_raw(fd: int) -> None:
    """cfmakeraw(3) on a pty; through its master this sets the slave's modes.

    A pty whose slave still echoes would send what the guest printed back
    to the guest as keystrokes, while nobody has the console open.
    """
    attrs = termios.tcgetattr(fd)
    iflag, oflag, cflag, lflag = attrs[:4]
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    attrs[:4] = [iflag, oflag, cflag, lflag]
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def allocate_in_root(pid: int) -> tuple[int, int]:
    """A new raw pty in the devpts instance of process ``pid``'s root: (master fd, its number there).

    The root is the stand-in's (libvirt's chroot), whose /dev/pts is the one
    libvirt will open the pty's path in.  We are root and the root is
    another process's: its ``dev/pts/ptmx`` is opened without following any
    link and used only if it is a ptmx.
    """
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK
        master = openat2(root, b"dev/pts/ptmx", flags, no_symlinks=True)
    finally:
        os.close(root)
    try:
        info = os.fstat(master)
        if not stat.S_ISCHR(info.st_mode) or info.st_rdev != PTMX_DEVICE:
            raise OSError(errno.ENOTTY, f"/dev/pts/ptmx in the root of pid {pid} is not a ptmx")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt(3)
        make_raw(master)
        return master, pty_index(master)
    except BaseException:
        os.close(master)
        raise


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    result = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def _ptmx_fds(pid: int, index: int) -> list[int]:
    """The fd numbers at which ``pid`` holds a ptmx whose pty is number ``index`` (by /proc/PID/fdinfo)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/fdinfo/{name}", "rb") as info:
                fields = dict(line.split(b":", 1) for line in info.read().splitlines() if b":" in line)
            if fields.get(b"tty-index", b"").strip() == str(index).encode():
                found.append(int(name))
    return found


def program_pty_peer(pid: int, index: int) -> int:
    """The other end of pty ``index`` whose master process ``pid`` holds; PermissionError if it holds none.

    The master is taken from the program itself (pidfd_getfd), and the end
    opened from it (TIOCGPTPEER), so no path is involved: whatever a pty
    number names in some devpts instance, only the program's own pty is
    ever opened.  The copy is checked again (the program may have closed
    that fd number and opened another since /proc was read).
    """
    pidfd = os.pidfd_open(pid)
    try:
        for number in _ptmx_fds(pid, index):
            try:
                master = _pidfd_getfd(pidfd, number)
            except OSError:
                continue
            try:
                info = os.fstat(master)
                if not stat.S_ISCHR(info.st_mode) or info.st_rdev != PTMX_DEVICE or pty_index(master) != index:
                    continue
                flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
                peer = fcntl.ioctl(master, TIOCGPTPEER, flags)
                return int(peer)
            finally:
                os.close(master)
    finally:
        os.close(pidfd)
    raise PermissionError(errno.EPERM, f"pid {pid} holds no master of pty {index}")


def hung_up(master: int) -> bool:
    """True when no process has the pty's other end open (the master polls POLLHUP)."""
    poller = select.poll()
    poller.register(master, select.POLLOUT)
    return any(events & select.POLLHUP for _, events in poller.poll(0))
