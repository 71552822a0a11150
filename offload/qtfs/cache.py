"""The coherent cache's rules, without I/O: which reply the kernel may keep, and what a host change drops.

The server sends an Invalidate for every change made on the host, ahead of
any reply that followed it.  `changes` counts them (and resets of the
link): a reply to a request sent before the latest one may describe the
state before that change, and the kernel may have applied the Invalidate
already, so such a reply is given to the caller but not kept (timeouts of
0, no keep_cache, no listing kept).  The FUSE layer asks `changed` with the
count it read before sending, and applies the `Drops` that `heard` returns.

Whole directory listings are kept here by path (`listing`), and so is the
listing each directory's kernel cache was last filled from
(`kernel_filled`): an open keeps the kernel's listing only while that is
still the listing held here.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from typing import Generic, TypeVar

from offload.protocol import qtfs as wire

log = logging.getLogger(__name__)

#: Directory listings kept, the oldest dropped first.
LISTINGS = 256

ListingT = TypeVar("ListingT")


@dataclass(frozen=True)
class Drops:
    """What the kernel must forget after a change on the host (paths relative to the mount root)."""

    everything: bool = False
    attributes: tuple[bytes, ...] = ()
    pages: tuple[bytes, ...] = ()  # a file's data, or a directory's cached listing
    entries: tuple[tuple[bytes, bytes], ...] = ()  # (parent, name)


class CachePolicy(Generic[ListingT]):
    """``coherent``: the host announces its changes, so the kernel may cache for ``timeout`` seconds.

    Otherwise entries and attributes live ``timeout`` seconds (0 unless the
    operator traded coherence for speed), a directory's attributes
    ``dir_attr_timeout``: the kernel checks them at every step of a path
    walk, and the LOOKUP of each step refreshes them anyway.
    ``kernel_listings``: the kernel can keep directory listings (pyfuse3's
    cache_readdir), which it checks against the directory's mtime only.
    """

    def __init__(self, coherent: bool, timeout: float, dir_attr_timeout: float, kernel_listings: bool) -> None:
        self.coherent = coherent
        self.timeout = timeout
        self.dir_attr_timeout = max(timeout, dir_attr_timeout)
        self.kernel_listings = kernel_listings
        self.changes = 0
        self._listings: dict[bytes, ListingT] = {}
        self._kernel_filled: dict[bytes, ListingT] = {}

    # -- replies -------------------------------------------------------------------------

    def changed(self, since: int) -> bool:
        """A change was heard of after ``since`` (`changes` when the request was sent)."""
        return since != self.changes

    def timeouts(self, mode: int, since: int) -> tuple[float, float]:
        """(entry, attribute) timeouts of a reply about a file of ``mode``."""
        if self.coherent and self.changed(since):
            return 0.0, 0.0
        return self.timeout, self.dir_attr_timeout if stat.S_ISDIR(mode) else self.timeout

    def keeps_pages(self, since: int) -> bool:
        """An open answered after ``since`` keeps the file's cached pages."""
        return self.coherent and not self.changed(since)

    # -- listings ------------------------------------------------------------------------

    def listing(self, path: bytes) -> ListingT | None:
        return self._listings.get(path)

    def keep_listing(self, path: bytes, listing: ListingT, since: int) -> None:
        if not self.changed(since):
            _put(self._listings, path, listing)

    def kernel_filled(self, path: bytes, listing: ListingT) -> None:
        """The kernel's listing of ``path`` was filled from ``listing``."""
        if self._kernel_filled.get(path) is not listing:
            _put(self._kernel_filled, path, listing)

    def kernel_current(self, path: bytes, listing: ListingT) -> bool:
        """The kernel's listing of ``path`` was filled from ``listing``, and nothing changed since."""
        return self._kernel_filled.get(path) is listing

    # -- changes ---------------------------------------------------------------------------

    def reset(self) -> bool:
        """The link went or came back, and what the host did meanwhile was not announced.

        True: the kernel must forget everything.
        """
        self.changes += 1
        self._listings.clear()
        self._kernel_filled.clear()
        return self.coherent

    def heard(self, invalidate: wire.Invalidate) -> Drops:
        """What ``invalidate`` makes stale."""
        kind, path = invalidate.change, invalidate.path
        if kind is wire.Change.ALL or kind is wire.Change.UNWATCHED:
            self.reset()
            if kind is wire.Change.UNWATCHED and self.coherent:
                log.warning("the host can no longer watch the whole tree: caching stops")
                self.coherent = False
                self.timeout, self.dir_attr_timeout = 0.0, 0.0
            return Drops(everything=True)
        self.changes += 1
        parent, _, name = path.rpartition(b"/")
        for listings in (self._listings, self._kernel_filled):
            # The parent's listing holds this entry's name and attributes.
            listings.pop(parent, None)
            if kind is wire.Change.ENTRY:
                # A directory that went or moved: its listings and those below are stale.
                prefix = path + b"/"
                for stale in [p for p in listings if p == path or p.startswith(prefix)]:
                    del listings[stale]
        pages = (path,) if kind is wire.Change.DATA else ()
        if kind is not wire.Change.ENTRY:
            return Drops(attributes=(path,), pages=pages)
        # The parent's times and link count changed too.  The kernel checks its
        # listing against the directory's mtime only, which a change need not
        # move (coarse timestamps; tar and rsync restore it): drop it, also
        # for a handle opened earlier that starts over (rewinddir).
        parent_pages = (parent,) if self.kernel_listings else ()
        return Drops(attributes=(path, parent), pages=pages + parent_pages, entries=((parent, name),))


def _put(listings: dict[bytes, ListingT], path: bytes, listing: ListingT) -> None:
    if path not in listings and len(listings) >= LISTINGS:
        del listings[next(iter(listings))]
    listings[path] = listing
