"""The FUSE filesystem of `qtfs mount`: kernel requests -> qtfs requests over the link.

README.md ("qtfs", Caching) says what each way to cache promises.  With the
coherent cache, `offload.qtfs.cache` decides what each Invalidate drops and
which reply may be kept; attributes are dropped in the link's reader, in
wire order, pages in a worker thread (that kernel call may wait for a
request we are serving).  Without it (``--no-cache``, /proc, /sys, an
unwatchable tree) timeouts are 0 (see `CachePolicy`) and files direct_io,
so every read and write(2) reaches the host whole and as issued.

Handlers fail the caller's syscall through `errors`, never the mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
import trio

from offload.mounts import mountinfo
from offload.protocol import qtfs as wire
from offload.protocol.qtfs.messages import ReplyT
from offload.qtfs import facts, tasks
from offload.qtfs.cache import CachePolicy
from offload.qtfs.client import Link, LinkDown, Mounted
from offload.qtfs.inodes import InodeTable, join

if TYPE_CHECKING:
    from offload.qtfs.mount import MountOptions

MODES = ("", "proc", "sys", "cgroup")
#: Re-opens after a lost link before a read or write gives up with EIO.
ATTEMPTS = 3
_REOPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
#: How long a LOOKUP's attributes may answer the GETATTR that follows it (see getattr).
LOOKUP_REUSE = 0.001
#: The generation of a file opened for reading without asking the host yet (see open).
LAZY = -1
#: Entries one directory listing may hold: a bound on what a host's pages may fill.
MAX_LISTING = 1 << 20
#: pyfuse3 lets opendir switch on the kernel's listing cache (FOPEN_CACHE_DIR).
KERNEL_LISTINGS = hasattr(pyfuse3.FileInfo, "cache_readdir")
#: The host's attributes the kernel is given: all but the host's inode and device numbers.
ENTRY_FIELDS = tuple(name for name in wire.Attr._fields if name not in ("ino", "dev"))
#: SETATTR's fields: pyfuse3's SetattrFields flag, the ``valid`` bit, the field it sets (``st_<name>``).
SET_FIELDS = (
    ("update_mode", wire.SET_MODE, "mode"),
    ("update_uid", wire.SET_UID, "uid"),
    ("update_gid", wire.SET_GID, "gid"),
    ("update_size", wire.SET_SIZE, "size"),
    ("update_atime", wire.SET_ATIME, "atime_ns"),
    ("update_mtime", wire.SET_MTIME, "mtime_ns"),
)

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)


def errors(function: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """OSError (remote errno or EIO) becomes the FUSEError that fails the caller's syscall.

    So does anything else: an exception that leaves a handler ends
    pyfuse3.main, the process and its mount, and most of what a handler
    works on came from the host (a reply that decodes but does not fit, an
    attribute block of the wrong size).  One bad reply fails one call with
    EIO, never the mount.
    """

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            log.warning("%s: the host's reply does not fit (%s: %s): EIO", function.__name__, type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclasses.dataclass
class OpenFile:
    inode: int
    path: bytes
    flags: int
    handle: int
    generation: int


@dataclasses.dataclass
class OpenDir:
    path: bytes
    entries: list[ListedEntry]
    handle: int
    eof: bool
    generation: int
    since: int  # `Filesystem.changes` before the listing was asked for
    server_count: int = 0  # entries the host has sent (before --proc/--sys filtering)
    coherent: bool = False  # ``entries`` is the coherent cache's listing (the host keeps nothing open)


#: A directory entry as listed: name, path, host key, the kernel's entry (its inode set as it is listed).
ListedEntry = tuple[bytes, bytes, tuple[int, int], pyfuse3.EntryAttributes]


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, link: Link, mounted: Mounted, options: MountOptions) -> None:
        super().__init__()
        if options.mode not in MODES:
            raise ValueError(f"mode {options.mode!r}")
        self.host = link
        self.mode = options.mode
        #: cgroup mode: rexec's pidmap directory, and the open tasks files -> the pid that opened each.
        self.pidmap = options.pidmap
        self.task_files: dict[int, int] = {}
        #: Placements of libvirt's fork before it execs the stand-in: (tasks file, pid), carried once mapped.
        self._placements_in, self._placements_out = trio.open_memory_channel[tuple[bytes, int]](256)
        self.mountpoint = os.fsencode(options.mountpoint.rstrip("/"))
        coherent = mounted.watched and not options.mode and options.coherent_timeout > 0
        timeout, dir_attr_timeout = options.cache_timeout, options.dir_attr_timeout
        if coherent:
            timeout = dir_attr_timeout = options.coherent_timeout
        self.cache = CachePolicy[list[ListedEntry]](coherent, timeout, dir_attr_timeout, KERNEL_LISTINGS)
        #: Opens for reading need no round trip (the host's file is opened at
        #: the first read the page cache cannot answer), unless the host
        #: checks opens against a whitelist.
        self.lazy_open = coherent and not mounted.open_checked
        #: pyfuse3.init has run: the kernel may be told to invalidate.
        self.live = False
        self._stale_pages: set[int] = set()
        self._pages_wanted = trio.Event()
        link.on_invalidate = self._invalidated
        link.on_reset = self._reset
        self.table = InodeTable((mounted.root.dev, mounted.root.ino))
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self._numbers = itertools.count(1)
        self._just_looked_up: dict[int, tuple[int, float, pyfuse3.EntryAttributes]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _entry(self, inode: int, attr: wire.Attr, since: int = -1) -> pyfuse3.EntryAttributes:
        """The kernel's entry for ``attr``; ``since``: the cache's `changes` before the request was sent."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout, entry.attr_timeout = self.cache.timeouts(attr.mode, since)
        for name in ENTRY_FIELDS:
            setattr(entry, "st_" + name, getattr(attr, name))
        return entry

    async def _made(
        self, parent_inode: int, name: bytes, request: Callable[[bytes], wire.Request[wire.AttrReply]]
    ) -> pyfuse3.EntryAttributes:
        """The entry of ``name`` from the host's answer to ``request(its path)`` (a lookup, or what made it)."""
        path = self._child(parent_inode, name)
        since = self.cache.changes
        reply = await self.host.call(request(path))
        return self._remember(path, reply.attr, since)

    def _remember(self, path: bytes, attr_bytes: bytes, since: int) -> pyfuse3.EntryAttributes:
        attr = wire.Attr.decode_from(attr_bytes)
        return self._entry(self.table.remember(path, (attr.dev, attr.ino)).inode, attr, since)

    # -- the host's changes ----------------------------------------------------------------------

    def _invalidated(self, change: wire.Invalidate) -> None:
        """An Invalidate from the server (called by the link's reader, in wire order)."""
        drops = self.cache.heard(change)
        if not self.live:
            return
        if drops.everything:
            self._drop_all()
            return
        for path in drops.attributes:
            if (node := self.table.find(path)) is not None:
                self._drop_attributes(node.inode)
        for parent_path, name in drops.entries:
            if (parent := self.table.find(parent_path)) is not None:
                pyfuse3.invalidate_entry_async(parent.inode, name, ignore_enoent=True)
        for path in drops.pages:
            if (node := self.table.find(path)) is not None:
                self._drop_pages(node.inode)

    def _reset(self) -> None:
        """The link went or came back: what happened on the host meanwhile was not announced."""
        if self.cache.reset() and self.live:
            self._drop_all()

    def _drop_all(self) -> None:
        # Dropping a directory's entry detaches whatever is mounted below it
        # (d_invalidate), even where nothing changed: spare the mount points
        # under ours and the directories leading to them.
        spared = self._mounted_below()
        for node in self.table.nodes():
            self._drop_attributes(node.inode)
            self._drop_pages(node.inode)
            if node.path and node.path not in spared:
                parent_path, _, name = node.path.rpartition(b"/")
                if (parent := self.table.find(parent_path)) is not None:
                    pyfuse3.invalidate_entry_async(parent.inode, name, ignore_enoent=True)

    def _mounted_below(self) -> set[bytes]:
        """Paths (relative to the mount root) of the mount points below ours, and their ancestors."""
        spared: set[bytes] = set()
        if not self.mountpoint:
            return spared
        top = os.fsdecode(self.mountpoint)
        try:
            entries = mountinfo.read()
        except OSError:
            return spared
        for entry in mountinfo.under(entries, top):
            parts = os.fsencode(entry.mount_point)[len(self.mountpoint) + 1 :].split(b"/")
            spared.update(b"/".join(parts[: i + 1]) for i in range(len(parts)))
        return spared

    @staticmethod
    def _drop_attributes(inode: int) -> None:
        # Attributes only: the kernel bumps the inode's attr_version and
        # forgets them under a spinlock, never waiting for a request, so this
        # is safe in the event loop (a reply that raced it is discarded by
        # the kernel for its older attr_version).
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(inode, True)

    def _drop_pages(self, inode: int) -> None:
        # Dropping pages waits for page locks that a read we are serving may
        # hold: done by `drop_pages_forever` in a thread.
        self._stale_pages.add(inode)
        self._pages_wanted.set()

    async def drop_pages_forever(self) -> None:
        """Hand the kernel the page invalidations `_invalidated` queued (a task of the mount)."""
        while True:
            await self._pages_wanted.wait()
            self._pages_wanted = trio.Event()
            inodes, self._stale_pages = self._stale_pages, set()
            # Abandoned at unmount: a page lock it waits for is released when
            # the kernel aborts the connection, not by us.
            await trio.to_thread.run_sync(_invalidate_pages, inodes, abandon_on_cancel=True)

    def _visible(self, parent: bytes, name: bytes) -> bool:
        if self.mode == "proc":
            # A pid is looked up by number (the host serves only its programs'); self is the host server's.
            return bool(parent) or name not in facts.PER_PROCESS
        if self.mode == "sys":
            return facts.sys_visible(join(parent, name))
        return True

    def _child(self, parent_inode: int, name: bytes) -> bytes:
        parent = self.table.path(parent_inode)
        if not self._visible(parent, name):
            raise OSError(errno.ENOENT, "not served")
        return join(parent, name)

    async def _handle(self, opened: OpenFile) -> int:
        """The server's handle for ``opened`` on the current connection (re-opened after a reconnect)."""
        if opened.generation != self.host.generation:
            if opened.generation == LAZY:
                # Opened without asking the host: open the file where it is now.
                with contextlib.suppress(OSError):
                    opened.path = self.table.path(opened.inode)
            reply, generation = await self.host.call_on(wire.Open(opened.path, opened.flags & _REOPEN_MASK), retry=True)
            opened.handle, opened.generation = reply.handle, generation
        return opened.handle

    async def _on_file(self, fh: int, make: Callable[[int], wire.Request[ReplyT]], retry: bool) -> ReplyT:
        opened = self.files.get(fh)
        if opened is None:
            raise OSError(errno.EBADF, "no such open file")
        for attempt in range(ATTEMPTS):
            handle = await self._handle(opened)
            try:
                return await self.host.call(make(handle), retry=False)
            except LinkDown:
                if not retry or attempt == ATTEMPTS - 1:
                    raise
        raise OSError(errno.EIO, "unreachable")

    # -- names and attributes -----------------------------------------------------------------

    @errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        entry = await self._made(parent_inode, name, wire.Lookup)
        if ctx is not None:
            self._just_looked_up[entry.st_ino] = (ctx.pid, time.monotonic(), entry)
        return entry

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.table.forget(inode, count)

    @errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        # With attribute timeouts of 0 the kernel follows every LOOKUP of a
        # stat(2) with a GETATTR of the same inode.  The LOOKUP's attributes,
        # read on the host an instant ago for the same process's same call,
        # answer it: once, and only within LOOKUP_REUSE seconds, so the
        # answer is as fresh as a round trip would make it.
        recent = self._just_looked_up.pop(inode, None)
        if recent is not None and ctx is not None:
            pid, when, entry = recent
            if pid == ctx.pid and time.monotonic() - when < LOOKUP_REUSE:
                return entry
        if len(self._just_looked_up) > 1024:
            self._just_looked_up.clear()
        path = self.table.path(inode)
        since = self.cache.changes
        reply = await self.host.call(wire.Getattr(path))
        attr = wire.Attr.decode_from(reply.attr)
        key = (attr.dev, attr.ino)
        if inode != pyfuse3.ROOT_INODE:
            known = self.table.get(inode)
            if self.cache.coherent and known is not None and known.key != key:
                # The host replaced the file at this path, and the kernel still
                # maps the name to the old inode until the Invalidate already on
                # its way lands.  Until then the old inode stands for the path
                # (what the host has there now, uncached): moving the path to a
                # new node would leave the kernel's entry naming a file we no
                # longer know (ESTALE).
                since = -2
            else:
                self.table.node_at(path, key)
        return self._entry(inode, attr, since)  # the kernel asked about this inode

    @errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        chosen = [(bit, name) for flag, bit, name in SET_FIELDS if getattr(fields, flag)]
        valid = sum(bit for bit, _ in chosen)
        values = {name: getattr(attr, "st_" + name) for _, name in chosen}  # the others stay 0
        if "mode" in values:
            values["mode"] &= 0o7777
        request = functools.partial(wire.Setattr, self.table.path(inode), valid=valid, **values)
        since = self.cache.changes
        if fh is not None and fh in self.files:
            reply = await self._on_file(fh, request, retry=True)
        else:
            reply = await self.host.call(request(handle=0), retry=True)
        return self._entry(inode, wire.Attr.decode_from(reply.attr), since)

    @errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return (await self.host.call(wire.Readlink(self.table.path(inode)))).data

    # -- files -------------------------------------------------------------------------------------

    def _register(self, opened: OpenFile, since: int) -> pyfuse3.FileInfo:
        """Number ``opened`` for the kernel, which is told how to treat the file's cached pages."""
        fh = next(self._numbers)
        self.files[fh] = opened
        # Cached pages stay valid unless the host changed something since the
        # open was sent (the kernel then drops them now, in open(2)).
        coherent, keep = self.cache.coherent, self.cache.keeps_pages(since)
        return pyfuse3.FileInfo(fh=fh, direct_io=not coherent, keep_cache=keep, nonseekable=False)

    @errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        path = self.table.path(inode)
        if self.lazy_open and flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            # With the coherent cache an open for reading needs nothing from the
            # host: the kernel checked the (coherent) permissions and the
            # entry, and the pages it keeps are current.  The host's file is
            # opened when a read misses the page cache (`_handle`).
            return self._register(OpenFile(inode, path, flags, 0, LAZY), self.cache.changes)
        since = self.cache.changes
        reply, generation = await self.host.call_on(wire.Open(path, flags), retry=not flags & os.O_TRUNC)
        info = self._register(OpenFile(inode, path, flags, reply.handle, generation), since)
        if self.mode == "cgroup" and path.rpartition(b"/")[2] in tasks.TASK_FILES:
            self.task_files[info.fh] = tasks.process_of(ctx.pid) if ctx is not None else 0
        return info

    @errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        since = self.cache.changes
        reply, generation = await self.host.call_on(wire.Create(path, flags, mode, ctx.uid, ctx.gid), retry=False)
        entry = self._remember(path, reply.attr, since)
        return self._register(OpenFile(entry.st_ino, path, flags, reply.handle, generation), since), entry

    @errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self.task_files:
            # The listing is translated whole (see offload.qtfs.tasks), then cut at the offset.
            reply = await self._on_file(fh, lambda handle: wire.Read(handle, 0, wire.MAX_IO), retry=True)
            return tasks.incoming(self.pidmap, reply.data)[off : off + size]
        reply = await self._on_file(fh, lambda handle: wire.Read(handle, off, min(size, wire.MAX_IO)), retry=True)
        return reply.data

    @errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        writer = self.task_files.get(fh)
        if writer is not None:
            carried = tasks.outgoing(self.pidmap, writer, buf)
            if carried is not None:
                await self._on_file(fh, lambda handle: wire.Write(handle, 0, carried), retry=False)
            else:
                # libvirt placed its fork, which keeps its pid when it execs the stand-in:
                # the host program goes where the stand-in would have been.
                with contextlib.suppress(trio.WouldBlock):
                    self._placements_in.send_nowait((self.files[fh].path, int(buf.strip())))
            return len(buf)
        opened = self.files.get(fh)
        # A write at an offset may be sent twice with the same result; an append may not.
        retry = opened is not None and not opened.flags & os.O_APPEND
        written = 0
        view = memoryview(buf)
        while written < len(buf):
            chunk = bytes(view[written : written + wire.MAX_IO]) if len(buf) > wire.MAX_IO else buf
            reply = await self._on_file(fh, functools.partial(wire.Write, offset=off + written, data=chunk), retry)
            count = reply.count
            written += count
            if count < len(chunk):
                break
        return written

    async def carry_placements_forever(self) -> None:
        """Place each host program where libvirt placed the fork that became its stand-in."""
        async for path, pid in self._placements_out:
            remote = None
            # The stand-in maps its pid once its program runs on the host,
            # shortly after libvirt lets the fork exec; a fork that ends first is dropped.
            with trio.move_on_after(tasks.PLACEMENT_WAIT):
                while remote is None and os.path.exists(f"/proc/{pid}"):
                    remote = tasks.host_pid(self.pidmap, pid)
                    if remote is None:
                        await trio.sleep(tasks.PLACEMENT_POLL)
            if remote is None:
                continue
            try:
                reply = await self.host.call(wire.Open(path, os.O_WRONLY), retry=True)
                try:
                    await self.host.call(wire.Write(reply.handle, 0, b"%d" % remote), retry=False)
                finally:
                    with contextlib.suppress(OSError):
                        await self.host.call(wire.Release(reply.handle), retry=False)
            except OSError as exc:
                log.warning("host program %d (stand-in %d) not placed in %s: %s", remote, pid, os.fsdecode(path), exc)

    async def flush(self, fh: int) -> None:
        # Nothing is buffered here (direct I/O); ENOSYS tells the kernel to stop
        # sending FLUSH on every close, which saves a trip through userspace.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        self.task_files.pop(fh, None)
        opened = self.files.pop(fh, None)
        if opened is not None and opened.generation == self.host.generation and self.host.is_up:
            # On failure the connection, and the host's fd with it, is gone anyway.
            with contextlib.suppress(OSError):
                await self.host.call(wire.Release(opened.handle), retry=False)

    @errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._on_file(fh, lambda handle: wire.Fsync(handle, int(bool(datasync))), retry=True)

    # -- directories ----------------------------------------------------------------------------------

    @errors
    async def opendir(self, inode: int, ctx: Any = None) -> int | pyfuse3.FileInfo:
        path = self.table.path(inode)
        since = self.cache.changes
        if self.cache.coherent:
            cached = self.cache.listing(path)
            if cached is None:
                cached = await self._whole_listing(path, since)
            fh = next(self._numbers)
            self.dirs[fh] = OpenDir(path, cached, 0, True, self.host.generation, since, coherent=True)
            if not KERNEL_LISTINGS:
                return fh
            # The kernel keeps the listing in the directory's page cache.
            # What it holds from earlier opens is kept only if it is this
            # very listing: otherwise (the host changed the directory since,
            # perhaps while the kernel was filling its cache) it is dropped
            # here, at open, in order with the readdirs that follow.
            current = self.cache.kernel_current(path, cached)
            return pyfuse3.FileInfo(fh=fh, keep_cache=current, cache_readdir=True)
        fh = next(self._numbers)
        self.dirs[fh] = await self._list(path, since, until=-1)
        return fh

    async def _list(self, path: bytes, since: int, until: int = MAX_LISTING) -> OpenDir:
        """The host's listing of ``path``, read on one connection until the host has sent more than ``until``
        entries or all of them (-1: the first page only)."""
        reply, generation = await self.host.call_on(wire.Opendir(path))
        listing = OpenDir(path, [], reply.handle, bool(reply.eof), generation, since)
        self._add_page(listing, reply)
        while not listing.eof and listing.server_count <= until:
            page, generation = await self.host.call_on(wire.Readdir(listing.handle, listing.server_count))
            if generation != listing.generation:
                raise OSError(errno.EIO, "the link was lost while listing a directory")
            self._add_page(listing, page)
        return listing

    async def _whole_listing(self, path: bytes, since: int) -> list[ListedEntry]:
        """A directory's listing, kept unless the host changed something while it was read."""
        listing = await self._list(path, since)
        if self.cache.changed(since):
            # Its entries were made as their pages came: after a change heard of since, none is cached.
            for *_, entry in listing.entries:
                entry.entry_timeout = entry.attr_timeout = 0.0
        self.cache.keep_listing(path, listing.entries, since)
        return listing.entries

    def _add_page(self, listing: OpenDir, reply: wire.DirReply) -> None:
        entries = wire.decode_entries(reply.entries)
        if listing.server_count + len(entries) > MAX_LISTING:
            # A host that never says end-of-file must not fill this process's memory.
            raise OSError(errno.EIO, f"the host's listing of {listing.path!r} exceeds {MAX_LISTING} entries")
        listing.server_count += len(entries)
        listing.eof, listing.handle = bool(reply.eof), reply.handle
        for name, attr in entries:
            if not self.mode or self._visible(listing.path, name):
                entry = self._entry(0, attr, listing.since)
                listing.entries.append((name, join(listing.path, name), (attr.dev, attr.ino), entry))

    @errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs.get(fh)
        if listing is None:
            raise OSError(errno.EBADF, "no such directory handle")
        log.debug("readdir %r from %d", listing.path, start_id)
        if listing.coherent:
            if start_id == 0 and self.cache.listing(listing.path) is not listing.entries:
                # A new pass over a handle opened earlier (rewinddir) shows
                # the directory as it is now, as POSIX asks.
                fresh = self.cache.listing(listing.path)
                if fresh is None:
                    fresh = await self._whole_listing(listing.path, self.cache.changes)
                listing.entries = fresh
            if KERNEL_LISTINGS:
                self.cache.kernel_filled(listing.path, listing.entries)
        # Without the coherent cache the host's pages are asked for as the kernel takes the entries.
        while self._reply_entries(listing.entries, start_id, token) and not listing.eof:
            start_id = max(start_id, len(listing.entries))
            await self._more(listing)

    def _reply_entries(self, entries: list[ListedEntry], start: int, token: pyfuse3.ReaddirToken) -> bool:
        """Give the kernel ``entries`` from ``start`` on; False once its buffer is full."""
        node_at, reply = self.table.node_at, pyfuse3.readdir_reply
        for index in range(start, len(entries)):
            name, path, key, entry = entries[index]
            node = node_at(path, key)
            entry.st_ino = node.inode  # the node may have been forgotten and made anew
            if not reply(token, name, entry, index + 1):
                self.table.drop_unused(node)
                return False
            node.lookups += 1
        return True

    async def _more(self, listing: OpenDir) -> None:
        if listing.generation != self.host.generation:
            # The host's listing went with the old connection: list again from
            # the start and keep what follows the entries already returned.
            fresh = await self._list(listing.path, listing.since, until=listing.server_count)
            fresh.entries[: len(listing.entries)] = listing.entries
            listing.entries, listing.handle, listing.eof = fresh.entries, fresh.handle, fresh.eof
            listing.generation, listing.server_count = fresh.generation, fresh.server_count
            return
        reply = await self.host.call(wire.Readdir(listing.handle, listing.server_count))
        self._add_page(listing, reply)

    async def releasedir(self, fh: int) -> None:
        listing = self.dirs.pop(fh, None)
        if listing is not None and listing.handle and listing.generation == self.host.generation and self.host.is_up:
            with contextlib.suppress(OSError):
                await self.host.call(wire.Releasedir(listing.handle), retry=False)

    # -- changing the namespace ------------------------------------------------------------------

    @errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._made(parent_inode, name, lambda path: wire.Mkdir(path, mode, ctx.uid, ctx.gid))

    @errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._made(parent_inode, name, lambda path: wire.Mknod(path, mode, rdev, ctx.uid, ctx.gid))

    @errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._made(parent_inode, name, lambda path: wire.Symlink(path, target, ctx.uid, ctx.gid))

    @errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        source = self.table.path(inode)
        return await self._made(new_parent_inode, new_name, lambda path: wire.Link(source, path))

    @errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await self.host.call(wire.Unlink(path))
        self.table.removed(path)

    @errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await self.host.call(wire.Rmdir(path))
        self.table.removed(path)

    @errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: Any
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self.host.call(wire.Rename(old, new, flags))
        if flags & pyfuse3.RENAME_EXCHANGE:
            self.table.exchanged(old, new)
        else:
            self.table.moved(old, new)

    # -- the rest ------------------------------------------------------------------------------------------

    @errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        reply = await self.host.call(wire.Statfs(b""))
        data = pyfuse3.StatvfsData()
        for field in dataclasses.fields(reply):
            setattr(data, "f_" + field.name, getattr(reply, field.name))
        data.f_favail = reply.ffree
        return data

    @errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        return (await self.host.call(wire.Getxattr(self.table.path(inode), name))).data

    @errors
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        reply = await self.host.call(wire.Listxattr(self.table.path(inode)))
        return [name for name in reply.data.split(b"\0") if name]

    @errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        await self.host.call(wire.Setxattr(self.table.path(inode), name, value))

    @errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        await self.host.call(wire.Removexattr(self.table.path(inode), name))


def _invalidate_pages(inodes: set[int]) -> None:
    for inode in inodes:
        # ENOENT: the kernel has forgotten the inode already.
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(inode, False)
