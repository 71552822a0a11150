"""Path prefixes matched on whole components: ``/a/b`` covers ``/a/b/c``, not ``/a/bc``.

The one test of "this path lies under that one", for text and bytes
alike: the mount code, the export and whitelist rules of qtfs, and the
shared prefixes of rexec and udsproxy all ask it here.

A string match proves nothing about what the kernel reaches: a symlink
inside the prefix (which the DPU may plant through a shared qtfs tree) can
point anywhere.  So a peer's path is opened by `open_beneath`, which
resolves the rest of it beneath the prefix directory with openat2
RESOLVE_BENEATH (`offload.resolve`, as qtfs serves its exports): a link
leading out is refused by the kernel, race-free.  The prefix itself is the
operator's configuration and is followed as written (``/var/run`` is often
a link to ``/run``).
"""

from __future__ import annotations

import errno
import os
import posixpath
from typing import AnyStr

from offload.protocol.messages import check_path
from offload.resolve import openat2


def is_under(path: AnyStr, ancestor: AnyStr, *, strict: bool = False) -> bool:
    """``path`` is ``ancestor`` or lies inside it; not ``ancestor`` itself if ``strict``.

    A trailing slash on ``ancestor`` does not matter, and ``/`` covers
    every absolute path.
    """
    separator = "/" if isinstance(path, str) else b"/"
    top = ancestor.rstrip(separator)
    if path == ancestor or (top and path == top):
        return not strict
    return path.startswith(top + separator)


def is_shared(path: str, prefixes: tuple[str, ...]) -> bool:
    """``path`` is one we carry (`check_path`: absolute, no NUL, no ``..``) and one of ``prefixes`` covers it."""
    try:
        check_path(path, "path")
    except ValueError:
        return False
    return any(is_under(path, prefix) for prefix in prefixes)


def _split(path: str, prefixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(the directory to start from, the rest below it) for the longest prefix covering ``path``."""
    covering = [p.rstrip("/") or "/" for p in prefixes if is_shared(path, (p,))]
    if not covering:
        return None
    prefix = max(covering, key=len)
    if path == prefix:  # the prefix names the object itself: start from its directory
        return posixpath.dirname(prefix), posixpath.basename(prefix)
    return prefix, path[len(prefix) :].lstrip("/")


def open_beneath(path: str, prefixes: tuple[str, ...], flags: int) -> int:
    """open ``path`` with ``flags`` (plus O_NOFOLLOW and O_CLOEXEC), resolved beneath its prefix.

    PermissionError (EACCES) when no prefix covers it or a link on the way
    leads out; the last component is never followed, so a link there is
    refused by the caller's type check (or ELOOP).  Called with the
    requester's credentials (`offload.users.run_as`), so each directory on
    the way is searched as that user.
    """
    where = _split(path, prefixes)
    if where is None:
        raise PermissionError(errno.EACCES, "not under an allowed prefix here", path)
    start, rest = where
    directory = os.open(start, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(directory, os.fsencode(rest), flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        os.close(directory)
