"""What `make demo` runs: the lab up, rexec from the DPU side to the host side, the lab down.

Each step prints its time; the last line says whether the demo succeeded
or which step failed and why.  (The VM demo, stock libvirtd on the DPU side
starting a guest on the host side, extends this once libvirt runs in the lab.)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from offload import proc
from offload.errors import OffloadError
from offload.lab.lab import Lab


def _step(title: str, action: Callable[[], str]) -> None:
    start = time.monotonic()
    detail = action()
    print(f"[{time.monotonic() - start:6.2f} s] {title}: {detail}", flush=True)


def main() -> None:
    lab = Lab("offload")

    def rexec(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        command = lab.command("dpu", ["rexec", *args])
        result = proc.run(command, env=lab.env("dpu"), check=False, input=stdin, timeout=60)
        return result.returncode, result.stdout, result.stderr

    def expect(condition: bool, message: str) -> None:
        if not condition:
            raise OffloadError(message)

    def where() -> str:
        code, out, err = rexec("/usr/bin/env", "sh", "-c", "readlink /proc/self/ns/net")
        expected = f"net:[{os.stat(f'/run/netns/{lab.host.netns}').st_ino}]"
        expect(code == 0 and out.strip() == expected, f"expected {expected}, got {out.strip() or err.strip()}")
        return f"the program ran in {lab.host.netns} ({out.strip()})"

    def pipe() -> str:
        code, out, _ = rexec("cat", stdin="hello from the DPU\n")
        expect((code, out) == (0, "hello from the DPU\n"), f"cat returned {code} {out!r}")
        return "stdin carried there and stdout back"

    def status() -> str:
        code, _, _ = rexec("/bin/sh", "-c", "exit 7")
        expect(code == 7, f"exit status {code}, not 7")
        code, _, err = rexec("/usr/bin/id")
        expect(code == 126, f"a program off the whitelist returned {code}")
        return f"exit status 7 carried; off-whitelist refused with 126 ({err.strip()})"

    try:
        _step("lab down (leftovers)", lambda: ", ".join(lab.down()) or "nothing left over")
        _step("lab up", lambda: "; ".join(lab.up()))
        _step("rexec from the DPU side", where)
        _step("stdio across the link", pipe)
        _step("exit status and whitelist", status)
    except (OffloadError, OSError) as exc:
        print(f"demo FAILED: {exc}", flush=True)
        lab.down()
        sys.exit(1)
    _step("lab down", lambda: f"removed {len(lab.down())} things")
    print("demo succeeded: programs started on the DPU side ran on the host side", flush=True)


if __name__ == "__main__":
    main()
