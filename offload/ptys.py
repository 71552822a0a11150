"""Ptys for a remote program's consoles: the system calls, on either machine.

qemu holds a pty master on the host, libvirt opens a pty by path on the
DPU: the DPU's side allocates one in libvirt's devpts (`allocate_in_root`),
the host's opens the other end of the program's own (`program_pty_peer`),
and a `PtyEnd` on each side relays them (ARCHITECTURE.md, "The data path").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import struct
import termios
from collections.abc import Sequence

from offload.fdinfo import closed_on_error, closing
from offload.resolve import libc, libc_error, openat2

# <asm-generic/ioctls.h>: not in the termios module.
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
#: The major and minor numbers of /dev/ptmx and of each devpts instance's ptmx.
PTMX_DEVICE = os.makedev(5, 2)
SYS_PIDFD_GETFD = 438  # asm-generic, the same everywhere


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
    with closing(os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as root:
        master = openat2(root, b"dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK, no_symlinks=True)
    with closed_on_error(master):
        info = os.fstat(master)
        if not stat.S_ISCHR(info.st_mode) or info.st_rdev != PTMX_DEVICE:
            raise OSError(errno.ENOTTY, f"/dev/pts/ptmx in the root of pid {pid} is not a ptmx")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt(3)
        make_raw(master)
        return master, pty_index(master)


def _checked(result: int) -> int:
    """A libc call's result; OSError with its errno if it failed."""
    if result < 0:
        raise libc_error()
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
    with closing(os.pidfd_open(pid)) as pidfd:
        for number in _ptmx_fds(pid, index):
            try:
                master = _checked(libc.syscall(SYS_PIDFD_GETFD, pidfd, number, 0))
            except OSError:
                continue
            with closing(master):
                info = os.fstat(master)
                if not stat.S_ISCHR(info.st_mode) or info.st_rdev != PTMX_DEVICE or pty_index(master) != index:
                    continue
                return int(fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC))
    raise PermissionError(errno.EPERM, f"pid {pid} holds no master of pty {index}")


def hung_up(master: int) -> bool:
    """True when no process has the pty's other end open (the master polls POLLHUP)."""
    poller = select.poll()
    poller.register(master, select.POLLOUT)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


IN_OPEN = 0x20
IN_CLOSE = 0x18  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
#: Events were lost: an open among them cannot be ruled out.
IN_Q_OVERFLOW = 0x4000


def _watch_opens(master: int) -> int:
    """An inotify fd that becomes readable when the pty of ``master`` is opened or closed."""
    with closing(fcntl.ioctl(master, TIOCGPTPEER, os.O_PATH | os.O_CLOEXEC)) as peer:  # not an opener itself
        watch = _checked(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        with closed_on_error(watch):
            _checked(libc.inotify_add_watch(watch, f"/proc/self/fd/{peer}".encode(), IN_OPEN | IN_CLOSE))
        return watch


def _masks(events: bytes) -> list[int]:
    """The mask of each inotify event in ``events`` (struct inotify_event: wd, mask, cookie, len, name)."""
    masks = []
    offset = 0
    while offset + 16 <= len(events):
        _, mask, _, length = struct.unpack_from("iIII", events, offset)
        masks.append(mask)
        offset += 16 + length
    return masks


class PtyEnd:
    """One pty fd as the local end of a relay thread (`offload.udsproxy.relay.Relay`), with the socket calls it makes.

    Owns ``fd`` (and its inotify fd).  Two kinds:

    - ``console=False``: the other end of a pty whose master a program holds
      (qemu's, on the host).  EIO means the master closed: end of file.
    - ``console=True``: the master of a pty that anyone may open, or nobody
      (the DPU's stand-in for the host pty, which libvirt opens).  It
      behaves as qemu's own pty: while nobody has the other end open, what
      arrives for it is dropped, not queued (a guest must not stall on its
      serial port because nobody reads the console, and a console opened
      later must not start with stale output), and nothing is read.  The
      master polls POLLHUP once the last opener closed it (a fresh pty's
      does not, until its first opener); an inotify watch on the other
      end's inode (``watch``) says when someone opens it again.
    """

    def __init__(self, fd: int, *, console: bool) -> None:
        self.fd = fd
        self.watch = -1
        if console:
            with closed_on_error(fd):
                self.watch = _watch_opens(fd)
        self.attached = not console  # a console's: until someone opens it

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.fd, flag)

    def setsockopt(self, *_: object) -> None:
        pass  # a pty has no socket options: its buffer is the line discipline's

    def opened(self) -> None:
        """The watch is readable: someone opened or closed the pty (a console's)."""
        opened = False
        with contextlib.suppress(BlockingIOError):
            while events := os.read(self.watch, 4096):
                opened |= any(mask & (IN_OPEN | IN_Q_OVERFLOW) for mask in _masks(events))
        if opened and not hung_up(self.fd):
            self.attached = True

    def recvmsg_into(self, buffers: Sequence[memoryview], *_: object) -> tuple[int, list, int, None]:
        if not self.attached:
            raise BlockingIOError(errno.EAGAIN, "nobody has the console open")
        try:
            count = os.readv(self.fd, buffers)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            if self.watch < 0:
                count = 0  # the program closed its master
            else:
                self.attached = False  # the last opener closed it
                raise BlockingIOError(errno.EAGAIN, "nobody has the console open") from None
        return count, [], 0, None

    def send(self, data: memoryview | bytes) -> int:
        if self.watch >= 0 and (not self.attached or hung_up(self.fd)):
            self.attached = False
            return len(data)  # nobody reads this console: dropped, as qemu drops it
        try:
            return os.write(self.fd, data)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            if self.watch < 0:
                raise BrokenPipeError(errno.EPIPE, "the program closed its pty") from None
            self.attached = False
            return len(data)

    def sendmsg(self, buffers: Sequence[memoryview | bytes], ancillary: object = ()) -> int:
        if ancillary:
            raise OSError(errno.EINVAL, "a pty carries no fds")
        return self.send(b"".join(buffers))

    def shutdown(self, _how: int) -> None:
        pass  # a pty has no half close: its end is the relay's end

    def close(self) -> None:
        for name in ("fd", "watch"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
