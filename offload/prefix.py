"""Path prefixes matched on whole components: ``/a/b`` covers ``/a/b/c``, not ``/a/bc``.

The one test of "this path lies under that one", for text and bytes
alike: the mount code, the export and whitelist rules of qtfs, and the
shared prefixes of rexec and udsproxy all ask it here.  A string match
proves nothing about what the kernel reaches through a link: callers that
open the path resolve it beneath the prefix (`offload.resolve`).
"""

from __future__ import annotations

from typing import AnyStr

from offload.protocol.messages import check_path


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
