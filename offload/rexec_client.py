"""rexec: run a program on the other machine behind a local stand-in (`offload.rexec.standin`).

The name is the reference's, and the one libvirt's emulator wrapper and
operators run; the stand-in itself is `offload.rexec.standin` (ARCHITECTURE.md).
"""

from offload.rexec.standin import main

if __name__ == "__main__":
    main()
