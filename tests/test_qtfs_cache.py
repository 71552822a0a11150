"""The coherent cache's rules (offload.qtfs.cache), without a mount: Invalidates in, drops and verdicts out."""

from __future__ import annotations

import stat

import pytest

from offload.protocol import qtfs as wire
from offload.qtfs.cache import LISTINGS, CachePolicy, Drops


def coherent(kernel_listings: bool = True) -> CachePolicy[str]:
    return CachePolicy(True, 10.0, 10.0, kernel_listings)


LISTING_OF: dict[bytes, str] = {}


def listing(path: bytes) -> str:
    """One listing object per path: the cache tells listings apart by identity."""
    return LISTING_OF.setdefault(path, f"listing of {path!r}")


def with_listings(cache: CachePolicy[str], *paths: bytes) -> CachePolicy[str]:
    for path in paths:
        cache.keep_listing(path, listing(path), cache.changes)
        cache.kernel_filled(path, listing(path))
    return cache


@pytest.mark.parametrize(
    ("cache", "mode", "changed", "expected"),
    [
        (coherent(), stat.S_IFREG, False, (10.0, 10.0)),
        (coherent(), stat.S_IFDIR, False, (10.0, 10.0)),
        # A reply overtaken by an Invalidate must not outlive it in the kernel.
        (coherent(), stat.S_IFREG, True, (0.0, 0.0)),
        (coherent(), stat.S_IFDIR, True, (0.0, 0.0)),
        # Without the host's news only a directory's attributes live on (path walks).
        (CachePolicy(False, 0.0, 1.0, True), stat.S_IFREG, False, (0.0, 0.0)),
        (CachePolicy(False, 0.0, 1.0, True), stat.S_IFDIR, False, (0.0, 1.0)),
        (CachePolicy(False, 0.0, 1.0, True), stat.S_IFDIR, True, (0.0, 1.0)),
        (CachePolicy(False, 2.0, 1.0, True), stat.S_IFDIR, False, (2.0, 2.0)),
    ],
)
def test_timeouts(cache: CachePolicy[str], mode: int, changed: bool, expected: tuple[float, float]) -> None:
    since = cache.changes
    if changed:
        cache.heard(wire.Invalidate(wire.Change.ATTR, b"elsewhere"))
    assert cache.timeouts(mode, since) == expected


def test_pages_are_kept_only_by_a_coherent_cache_and_only_without_news() -> None:
    cache = coherent()
    since = cache.changes
    assert cache.keeps_pages(since)
    cache.heard(wire.Invalidate(wire.Change.DATA, b"f"))
    assert not cache.keeps_pages(since)
    assert cache.keeps_pages(cache.changes)
    assert not CachePolicy(False, 0.0, 1.0, True).keeps_pages(0)


def test_a_listing_read_across_a_change_is_not_kept() -> None:
    cache = coherent()
    since = cache.changes
    cache.heard(wire.Invalidate(wire.Change.ENTRY, b"d/new"))
    cache.keep_listing(b"d", "stale", since)
    assert cache.listing(b"d") is None
    cache.keep_listing(b"d", "fresh", cache.changes)
    assert cache.listing(b"d") == "fresh"


def test_listings_are_bounded_oldest_first() -> None:
    cache = coherent()
    for number in range(LISTINGS + 1):
        cache.keep_listing(b"%d" % number, str(number), cache.changes)
    assert cache.listing(b"0") is None
    assert cache.listing(b"1") == "1"
    assert cache.listing(b"%d" % LISTINGS) == str(LISTINGS)


def test_the_kernel_listing_is_current_only_while_it_is_the_one_held() -> None:
    cache = coherent()
    cache.kernel_filled(b"d", "first")
    assert cache.kernel_current(b"d", "first")
    assert not cache.kernel_current(b"d", "second")
    cache.heard(wire.Invalidate(wire.Change.ATTR, b"d/f"))
    assert not cache.kernel_current(b"d", "first")


@pytest.mark.parametrize(
    ("change", "path", "kernel_listings", "drops"),
    [
        (wire.Change.ATTR, b"d/f", True, Drops(attributes=(b"d/f",))),
        (wire.Change.DATA, b"d/f", True, Drops(attributes=(b"d/f",), pages=(b"d/f",))),
        (wire.Change.ATTR, b"", True, Drops(attributes=(b"",))),
        (
            wire.Change.ENTRY,
            b"d/f",
            True,
            Drops(attributes=(b"d/f", b"d"), pages=(b"d",), entries=((b"d", b"f"),)),
        ),
        # Without the kernel's listing cache there are no listing pages to drop.
        (wire.Change.ENTRY, b"f", False, Drops(attributes=(b"f", b""), entries=((b"", b"f"),))),
        (wire.Change.ALL, b"", True, Drops(everything=True)),
        (wire.Change.UNWATCHED, b"", True, Drops(everything=True)),
    ],
)
def test_what_an_invalidate_drops(change: wire.Change, path: bytes, kernel_listings: bool, drops: Drops) -> None:
    cache = coherent(kernel_listings)
    before = cache.changes
    assert cache.heard(wire.Invalidate(change, path)) == drops
    assert cache.changed(before)


@pytest.mark.parametrize(
    ("change", "path", "kept"),
    [
        # The parent's listing names the entry and holds its attributes.
        (wire.Change.ATTR, b"d/f", {b"", b"d/sub", b"e"}),
        (wire.Change.DATA, b"d/sub", {b"", b"d/sub", b"e"}),
        # A directory that went or moved takes its own listings and those below.
        (wire.Change.ENTRY, b"d", {b"e"}),
        (wire.Change.ENTRY, b"e/x", {b"", b"d", b"d/sub"}),
        (wire.Change.ALL, b"", set()),
    ],
)
def test_which_listings_an_invalidate_drops(change: wire.Change, path: bytes, kept: set[bytes]) -> None:
    every = (b"", b"d", b"d/sub", b"e")
    cache = with_listings(coherent(), *every)
    cache.heard(wire.Invalidate(change, path))
    assert {p for p in every if cache.listing(p) is not None} == kept
    assert {p for p in every if cache.kernel_current(p, listing(p))} == kept


def test_an_unwatchable_tree_stops_the_caching() -> None:
    cache = with_listings(coherent(), b"d")
    cache.heard(wire.Invalidate(wire.Change.UNWATCHED))
    assert not cache.coherent
    assert cache.timeouts(stat.S_IFDIR, cache.changes) == (0.0, 0.0)
    assert cache.listing(b"d") is None


def test_a_lost_link_forgets_everything_and_overtakes_replies_in_flight() -> None:
    cache = with_listings(coherent(), b"d")
    since = cache.changes
    assert cache.reset()  # a coherent kernel cache must be dropped
    assert cache.changed(since)
    assert cache.listing(b"d") is None
    assert not cache.kernel_current(b"d", listing(b"d"))
    assert not CachePolicy(False, 0.0, 1.0, True).reset()  # nothing was cached for long
