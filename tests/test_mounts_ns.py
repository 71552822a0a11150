"""Running a test body in a private mount namespace, so nothing it mounts reaches the machine.

`in_private_namespace(body)` forks; the child unshares its mount namespace
(with / made private, so nothing propagates back), puts a tmpfs over /run
(the default plan creates /run/rexec and /run/udsproxy when they are
missing) and runs ``body``.  When the child exits, the kernel drops the
namespace and every mount in it, whatever the body did or failed to do.
The body's return value or its traceback comes back through a pipe.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import TypeVar

import pytest

from offload.mounts import mountinfo, syscalls

T = TypeVar("T")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount namespaces and mounts (CI runs as root)")


def in_private_namespace(body: Callable[[], T], *, hide_run: bool = True) -> T:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        status = 1
        try:
            syscalls.unshare_mount_namespace()
            if hide_run:
                syscalls.mount("tmpfs", "/run", "tmpfs", 0, "mode=0755")
            payload = pickle.dumps(("ok", body()))
            status = 0
        except BaseException as exc:
            payload = pickle.dumps(("error", "".join(traceback.format_exception(exc))))
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        pytest.fail("the namespace child died without a report")
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"in the private mount namespace:\n{value}", pytrace=False)
    return value


@needs_root
def test_mounts_in_the_namespace_do_not_reach_the_machine(tmp_path) -> None:
    target = str(tmp_path)

    def body() -> list[str]:
        syscalls.mount("tmpfs", target, "tmpfs", 0, "")
        return [e.mount_point for e in mountinfo.read() if e.mount_point == target]

    assert in_private_namespace(body) == [target]
    assert not [e for e in mountinfo.read() if e.mount_point == target]


@needs_root
def test_a_failing_body_is_reported() -> None:
    def body() -> None:
        raise ValueError("boom")

    with pytest.raises(pytest.fail.Exception, match="boom"):
        in_private_namespace(body)
